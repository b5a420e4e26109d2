"""Speculative decoding on the default transformer or Mamba, greedy, one request at a time (speculation's
case: latency of a lone request). Prompts are code-editing chat tasks ("Rewrite this code",
"Fix this code") on blocks of held-out stdlib files the models never trained on.

Methods, each prompt run by every method in turn (side by side, so machine noise hits all alike):
  none, prompt_lookup, draft      the hf engine (models/speculative.py's loop) on the backend's model,
                                  with its engine_kwargs where the backend runs the hf engine
  hf_prompt_lookup, hf_draft      transformers' own generate(prompt_lookup_num_tokens=...) and
                                  generate(assistant_model=...), for comparison

    python -m bench.speculative [--prompts 12] [--tokens 128] [--backend transformer|mamba]

--backend mamba: the Mamba backend, methods none (on the reference path a request goes through the
engine's continuous batching, alone here, models/hf_engine.py) and prompt_lookup (its speculation rolls
the SSM state back, models/mamba.py), and hf_generate: transformers' own greedy generate(), which has no
speculative path for Mamba, for comparison with the engine's plain path.

Last line: one JSON object: tokens/s of each engine method (total tokens over total seconds),
speedups over plain decoding, acceptance rate (kept guesses over guesses), `identical` (both
speculating methods gave plain greedy decoding's text on every prompt), the same speedups for
transformers' generate(), and median seconds per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import torch

from deployments.config import AppConfig
from models.engine import GenerationRequest
from models.hf_engine import HFEngine
from training import corpus
from models.checkpoints import resolve_model

ENGINE_METHODS = ("none", "prompt_lookup", "draft")
HF_METHODS = ("hf_prompt_lookup", "hf_draft")


def prompts(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    return corpus.code_chats(corpus.heldout_blocks(n, seed, max_lines=12), seed)


async def run(n: int, tokens: int, backend: str = "transformer") -> dict:
    cfg = AppConfig.from_serve_config().backend(backend)
    kwargs = dict(cfg.engine_kwargs) if cfg.engine == "hf" else {}  # the hf engine's own loop, on this model
    engine = HFEngine(resolve_model(cfg.model), **kwargs)
    await engine.start()
    model, tok, draft = engine.model, engine.tokenizer, engine.draft
    k_draft, k_lookup = kwargs.get("draft_tokens"), kwargs.get("prompt_lookup_tokens", engine.prompt_lookup_tokens)
    methods = ENGINE_METHODS + HF_METHODS if draft is not None else ("none", "prompt_lookup", "hf_generate")

    def hf(method: str, messages: list[dict[str, str]]) -> tuple[str, int]:
        """transformers' own generate(): plain (hf_generate), prompt lookup or assisted by the draft."""
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
        extra = {"hf_generate": {}, "hf_prompt_lookup": {"prompt_lookup_num_tokens": k_lookup},
                 "hf_draft": {"assistant_model": draft, "num_assistant_tokens": k_draft,
                              "num_assistant_tokens_schedule": "constant"}}[method]
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **extra)
        new = out[0, ids.shape[1]:].tolist()
        if new and new[-1] == tok.eos_token_id:
            new = new[:-1]
        return tok.decode(new, skip_special_tokens=True), len(new)

    seconds = {m: [] for m in methods}
    made = {m: 0 for m in seconds}
    texts = {m: [] for m in seconds}
    accepted = {m: [0, 0] for m in ENGINE_METHODS if m in methods}
    for i, messages in enumerate(prompts(n)):
        for method in seconds:
            before = (engine.spec_stats.accepted, engine.spec_stats.proposed)
            start = time.perf_counter()
            if method in ENGINE_METHODS:
                done = await engine.generate(GenerationRequest(
                    f"bench-{i}", messages=messages, max_tokens=tokens, temperature=0, speculation=method))
                text, count = done.text, done.completion_tokens
                accepted[method][0] += engine.spec_stats.accepted - before[0]
                accepted[method][1] += engine.spec_stats.proposed - before[1]
            else:
                text, count = await engine.on_engine_thread(hf, method, messages)  # its thread: see there
            seconds[method].append(time.perf_counter() - start)
            made[method] += count
            texts[method].append(text)
    rate = {m: made[m] / sum(seconds[m]) for m in seconds}
    same = {m: texts[m] == texts["none"] for m in seconds if m != "none"}
    if draft is None:
        return {
            "plain_tok_s": round(rate["none"], 1),
            "prompt_lookup_tok_s": round(rate["prompt_lookup"], 1),
            "prompt_lookup_speedup": round(rate["prompt_lookup"] / rate["none"], 2),
            "acceptance_rate": round(accepted["prompt_lookup"][0] / max(1, accepted["prompt_lookup"][1]), 3),
            "identical": same["prompt_lookup"],
            # transformers' generate(), which the engine's continuous batching replaces for a Mamba
            "hf_generate_tok_s": round(rate["hf_generate"], 1),
            "prompt_lookup_speedup_over_hf_generate": round(rate["prompt_lookup"] / rate["hf_generate"], 2),
            "hf_generate_identical": same["hf_generate"],
            "median_s": {m: round(statistics.median(s), 3) for m, s in seconds.items()},
            "backend": backend, "model": cfg.model, "kernel": engine.info()["kernel"], "prompts": n,
            "max_tokens": tokens, "tokens": made["none"], "prompt_lookup_tokens": k_lookup,
            "torch_threads": torch.get_num_threads(),
        }
    return {
        "plain_tok_s": round(rate["none"], 1),
        "prompt_lookup_tok_s": round(rate["prompt_lookup"], 1),
        "draft_tok_s": round(rate["draft"], 1),
        "prompt_lookup_speedup": round(rate["prompt_lookup"] / rate["none"], 2),
        "draft_speedup": round(rate["draft"] / rate["none"], 2),
        "acceptance_rate": {m: round(a / p, 3) for m, (a, p) in accepted.items() if p},
        "identical": same["prompt_lookup"] and same["draft"],
        # transformers' own generate() with the same model, draft and k, for comparison
        "hf_prompt_lookup_speedup": round(rate["hf_prompt_lookup"] / rate["none"], 2),
        "hf_draft_speedup": round(rate["hf_draft"] / rate["none"], 2),
        "hf_identical": same["hf_prompt_lookup"] and same["hf_draft"],
        "median_s": {m: round(statistics.median(s), 3) for m, s in seconds.items()},
        "prompts": n, "max_tokens": tokens, "tokens": made["none"], "draft_tokens": k_draft,
        "prompt_lookup_tokens": k_lookup, "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--backend", default="transformer")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.prompts, args.tokens, args.backend))))


if __name__ == "__main__":
    main()
