"""Quality per task of each language-model backend, measured on held-out text: bits per byte of
reference answers, and a task score where the task has one. The router ranks by latency only among
the backends within `routing.quality_margin` bits per byte of the best (routing/policy.py).

Bits per byte: -log2 p(reference | prompt), summed over the reference's tokens under the backend's own
tokenizer and chat template, over the reference's UTF-8 bytes. It does not depend on the tokenizer,
so a Mamba with a 4096-token vocabulary and SmolLM2 with 49152 are compared on the same text.

Sets (text none of the project's models trained on; SmolLM2's own pretraining data is not known):
- text_generation: bench/data/facts.jsonl, 40 short factual questions written for this bench, as chats;
  the reference is a one-sentence answer. Score: exact match, greedy, 24 tokens at most: the answer
  holds one of the accepted words.
- streaming: the text_generation figures (streaming is how an answer is delivered, not a kind of text).
- code_generation: held-out stdlib blocks (training.corpus), raw text: the first third of the lines,
  then the rest as the reference.
- code_analysis: training/data/pydoc.eval.jsonl (held-out stdlib files): "Write the docstring for
  this function", chats; the reference is the function's docstring.
- code_repair: held-out blocks broken by training.corpus.corrupt, in the router's prompt (FIX_PROMPT),
  chats; the reference is the block as it was.
- long_context: held-out stdlib files joined, a 12,000-character prompt (3,000 to 4,000 tokens) and
  the next 1,000 characters as the reference.

    python -m bench.quality [--config serve_config.yaml] [--limit 40] [--write]

--write stores each backend's figures as its one-line `capability.quality` in the config (and in
k8s/rayservice-cpu.yaml when it is serve_config.yaml). Last line: one JSON object, backend -> task ->
bits per byte, with the scores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import random
import re
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.capability import CONFIGS, configs_for, write_lines
from deployments.config import AppConfig
from models.checkpoints import resolve_model
from models.code_grid import FIX_PROMPT
from training import corpus

ROOT = Path(__file__).resolve().parents[1]
FACTS = ROOT / "bench" / "data" / "facts.jsonl"
PYDOC_EVAL = ROOT / "training" / "data" / "pydoc.eval.jsonl"
LONG_PROMPT_CHARS, LONG_REFERENCE_CHARS = 12_000, 1_000


def sets(limit: int) -> dict[str, list[dict]]:
    """Each task's examples: {"messages"} (a chat) or {"prompt"} (raw text), a "reference", and for
    facts the accepted "answers"."""
    facts = [json.loads(line) for line in FACTS.read_text().splitlines()][:limit]
    text = [{"messages": [{"role": "user", "content": f["question"]}], "reference": f["reference"],
             "answers": f["answers"]} for f in facts]
    blocks = corpus.heldout_blocks(limit, seed=1)
    code = []
    for b in blocks:
        lines = b.splitlines(keepends=True)
        head = max(1, len(lines) // 3)
        code.append({"prompt": "".join(lines[:head]), "reference": "".join(lines[head:])})
    docs = []
    for line in PYDOC_EVAL.read_text().splitlines()[:limit]:
        m = json.loads(line)["messages"]
        docs.append({"messages": m[:-1], "reference": m[-1]["content"]})
    repair = []
    for i, b in enumerate(corpus.heldout_blocks(4 * limit, seed=2)):
        if (broken := corpus.corrupt(b, seed=i)) is not None and len(repair) < limit:
            repair.append({"messages": [{"role": "user", "content": f"{FIX_PROMPT}\n{broken[0]}"}],
                           "reference": b})
    joined = "\n\n".join(corpus.texts("heldout"))
    step = LONG_PROMPT_CHARS + LONG_REFERENCE_CHARS
    long = [{"prompt": joined[i:i + LONG_PROMPT_CHARS], "reference": joined[i + LONG_PROMPT_CHARS:i + step]}
            for i in range(0, min(len(joined) - step, 8 * step), step)][: max(1, limit // 5)]
    return {"text_generation": text, "code_generation": code, "code_analysis": docs, "code_repair": repair,
            "long_context": long}


def prompt_ids(tokenizer, example: dict) -> list[int]:
    if "messages" in example:
        text = tokenizer.apply_chat_template(example["messages"], tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(example["prompt"])["input_ids"]


@torch.inference_mode()
def bits_per_byte(model, tokenizer, examples: list[dict]) -> float:
    """Summed over the set: bits of every reference over its bytes."""
    bits, nbytes = 0.0, 0
    for ex in examples:
        head = prompt_ids(tokenizer, ex)
        ref = tokenizer(ex["reference"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([head + ref])
        logits = model(input_ids=ids).logits[0, len(head) - 1:-1].float()  # (len(ref), vocab)
        nll = torch.nn.functional.cross_entropy(logits, ids[0, len(head):], reduction="sum")
        bits += float(nll) / math.log(2)
        nbytes += len(ex["reference"].encode())
    return bits / nbytes


@torch.inference_mode()
def exact_match(model, tokenizer, examples: list[dict]) -> float:
    hits = 0
    for ex in examples:
        ids = torch.tensor([prompt_ids(tokenizer, ex)])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).lower()
        hits += any(re.search(rf"\b{re.escape(a.lower())}\b", answer) for a in ex["answers"])
    return hits / len(examples)


def measure(ref: str, data: dict[str, list[dict]]) -> dict:
    path = resolve_model(ref)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    start = time.perf_counter()
    bpb = {task: round(bits_per_byte(model, tokenizer, examples), 4) for task, examples in data.items()}
    bpb["streaming"] = bpb["text_generation"]
    score = {"text_generation": round(exact_match(model, tokenizer, data["text_generation"]), 3)}
    return {"bits_per_byte": bpb, "score": score, "seconds": round(time.perf_counter() - start, 1),
            "parameters": sum(p.numel() for p in model.parameters())}


def write_quality(quality: dict[str, dict], paths=CONFIGS) -> None:
    """Sets each backend's one-line `quality: {...}` in the config files (after `cost:`, comments stay)."""
    write_lines("quality", {name: f"{{bits_per_byte: {json.dumps(q['bits_per_byte'])}, score: {json.dumps(q['score'])}, "
                                  f"measured: {json.dumps(q['measured'])}}}" for name, q in quality.items()}, paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIGS[0])
    parser.add_argument("--limit", type=int, default=40, help="examples per task (long_context: a fifth)")
    parser.add_argument("--write", action="store_true", help="store the figures in the config's capability.quality")
    args = parser.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    cfg = AppConfig.from_serve_config(args.config)
    data = sets(args.limit)
    when = datetime.date.today().isoformat()
    report = {}
    for b in cfg.backends:
        if b.kind == "lm":
            report[b.name] = measure(b.model, data)
            report[b.name]["measured"] = f"python -m bench.quality --limit {args.limit}, {when}"
            print(b.name, json.dumps(report[b.name]), flush=True)
    if args.write:
        write_quality(report, configs_for(args.config))
    print(json.dumps({"examples": {t: len(e) for t, e in data.items()}, **report}))


if __name__ == "__main__":
    main()
