"""JSONL datasets for adapter training, made offline from the stdlib corpus.

One example per line: {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}, the shape
of OpenAI's fine-tuning files (training/lora.py also reads {"prompt", "completion"} lines).

    python -m training.datasets pydoc     # training/data/pydoc.{train,eval}.jsonl

`pydoc`: "Write the docstring for this function" with the function's code (its docstring removed)
as the prompt and the docstring's first paragraph as the answer. Train examples come from the
corpus's train split and eval examples from its held-out files, so eval measures generalisation.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
from pathlib import Path

from training import corpus

DATA_DIR = Path(__file__).resolve().parent / "data"
PYDOC_TASK = "Write the docstring for this function:"


def _docstring_examples(text: str, max_code_lines: int = 12, max_doc_chars: int = 240) -> list[dict]:
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []
    lines = text.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(node.body) < 2:
            continue
        answer = doc.split("\n\n")[0].strip()
        if not 20 <= len(answer) <= max_doc_chars:
            continue
        first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
        doc_node = node.body[0]
        code = lines[first - 1:doc_node.lineno - 1] + lines[doc_node.end_lineno:node.end_lineno]
        indent = len(code[0]) - len(code[0].lstrip())
        code = [line[indent:] for line in code[:max_code_lines]]
        out.append({"messages": [
            {"role": "user", "content": f"{PYDOC_TASK}\n" + "\n".join(code)},
            {"role": "assistant", "content": answer},
        ]})
    return out


def pydoc(train_n: int = 300, eval_n: int = 150, seed: int = 0) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    splits = {}
    for split, n in (("train", train_n), ("heldout", eval_n)):
        examples = [ex for text in corpus.texts(split) for ex in _docstring_examples(text)]
        splits["eval" if split == "heldout" else "train"] = rng.sample(examples, min(n, len(examples)))
    return splits


DATASETS = {"pydoc": pydoc}


def write(name: str, out: Path = DATA_DIR) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, examples in DATASETS[name]().items():
        paths[split] = out / f"{name}.{split}.jsonl"
        paths[split].write_text("".join(json.dumps(ex) + "\n" for ex in examples))
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", choices=sorted(DATASETS))
    for split, path in write(parser.parse_args().name).items():
        print(f"{split}: {sum(1 for _ in path.open())} examples -> {path}")
