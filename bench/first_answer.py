"""From `serve run serve_config.yaml` to the first answered chat, and what the router decides for ten
prompts of different tasks and lengths.

Starts `serve run serve_config.yaml` as `make serve` does (deployments/serve_env.py's settings), with an
empty SWITCHYARD_CACHE unless --keep-cache (so the first start converts SmolLM2's GGUF file), and sends the
README's chat example (greedy) every half second until the transformer answers. Until the transformer's
replica is live the router falls back to the Mamba; both times are reported. Then `POST /v1/route` for ten
prompts, printed as a markdown table. Stops the app.

    python -m bench.first_answer [--keep-cache]

Last line: one JSON object with first_answer_s, first_transformer_answer_s, the answers and the decisions.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from deployments.serve_env import SERVE_ENV

ROOT = Path(__file__).resolve().parents[1]
URL = "http://127.0.0.1:8000"
CHAT = {"model": "auto", "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0, "max_tokens": 32}
_DOC = "The appellate court reviewed the record of the case and the lower court's reasoning. " * 300
PROMPTS = [
    ("chat", {"messages": [{"role": "user", "content": "What is the capital of France?"}]}),
    ("chat, longer answer", {"messages": [{"role": "user", "content": "Tell me a story about a dragon."}],
                             "max_tokens": 512}),
    ("code generation", {"messages": [{"role": "user", "content": "Implement a python function that reverses a list."}]}),
    ("code repair (as text)", {"messages": [{"role": "user", "content": "Fix this bug: def add(a, b) return a + b"}]}),
    ("completion of code", {"prompt": "def fibonacci(n):", "max_tokens": 64}),
    ("explicit task code_analysis", {"messages": [{"role": "user", "content": "What does this do? x = [i*i for i in range(10)]"}],
                                     "task": "code_analysis"}),
    ("legal keyword, short", {"messages": [{"role": "user", "content": "Summarise the verdict of the supreme court."}]}),
    ("long document, within 8192 tokens", {"prompt": _DOC + "\nSummarise.", "max_tokens": 64}),
    ("long document, beyond 8192 tokens", {"prompt": _DOC * 2 + "\nSummarise.", "max_tokens": 64}),
    ("pinned mamba", {"model": "mamba", "messages": [{"role": "user", "content": "hello"}]}),
]


def wait_for_answers(start: float, timeout: float = 600) -> tuple[dict, dict]:
    first = None
    with httpx.Client(base_url=URL, timeout=60) as c:
        while time.monotonic() - start < timeout:
            try:
                r = c.post("/v1/chat/completions", json=CHAT)
            except httpx.HTTPError:
                r = None
            if r is not None and r.status_code == 200:
                body = r.json()
                answer = {"seconds": round(time.monotonic() - start, 1), "backend": body["switchyard"]["backend"],
                          "text": body["choices"][0]["message"]["content"]}
                first = first or answer
                if answer["backend"] == "transformer":
                    return first, answer
            time.sleep(0.5)
    raise TimeoutError(f"no answer from the transformer within {timeout} s")


def routes() -> list[dict]:
    out = []
    with httpx.Client(base_url=URL, timeout=60) as c:
        for name, body in PROMPTS:
            r = c.post("/v1/route", json=body).json()
            out.append({"prompt": name, "tokens": r["features"]["tokens"], "task": r["task"], "backend": r["backend"],
                        "quality_bits_per_byte": r["quality_bits_per_byte"], "predicted_s": r["predicted_s"],
                        "reason": r["reason"]})
    return out


def table(rows: list[dict]) -> str:
    lines = ["| prompt | tokens | task | backend | bits/byte for the task | predicted latency | reason |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        q = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["quality_bits_per_byte"].items()))
        p = ", ".join(f"{k} {v:.2f} s" for k, v in sorted(r["predicted_s"].items()))
        lines.append(f"| {r['prompt']} | {r['tokens']} | {r['task']} | {r['backend']} | {q} | {p} | {r['reason']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep-cache", action="store_true", help="use SWITCHYARD_CACHE as it is (a later start)")
    args = parser.parse_args()
    env = os.environ | SERVE_ENV
    cache = None
    if not args.keep_cache:
        cache = tempfile.TemporaryDirectory(prefix="switchyard-cache-")
        env["SWITCHYARD_CACHE"] = cache.name
    start = time.monotonic()
    serve = subprocess.Popen([str(Path(sys.executable).parent / "serve"), "run", "serve_config.yaml"], cwd=ROOT,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        first, transformer = wait_for_answers(start)
        print(f"first answer after {first['seconds']} s from {first['backend']}: {first['text']!r}")
        print(f"first answer from the transformer after {transformer['seconds']} s: {transformer['text']!r}")
        decisions = routes()
        print(table(decisions))
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True)
        if cache is not None:
            cache.cleanup()
    print(json.dumps({"first_answer_s": first["seconds"], "first_answer_backend": first["backend"],
                      "first_transformer_answer_s": transformer["seconds"], "answer": transformer["text"],
                      "empty_cache": not args.keep_cache, "routes": decisions}))


if __name__ == "__main__":
    main()
