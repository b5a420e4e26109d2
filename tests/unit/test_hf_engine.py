"""HFEngine on tiny seeded models (no Ray): dynamic batching, speculation, streaming, cancellation,
the adapter LRU. Greedy output must not depend on how requests were batched or speculated."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import (AutoTokenizer, LlamaConfig, LlamaForCausalLM, Mamba2Config, Mamba2ForCausalLM, MambaConfig,
                          MambaForCausalLM)

from models.engine import GenerationRequest, InvalidRequest, fit_prompt
from models.hf_engine import HFEngine
from training.defaults import build_tokenizer

PROMPTS = ["def add(a, b):", "import os\nimport sys\n", "class Foo:\n    def bar(self):", "x = [1, 2, 3]\nfor"]


def _llama(out: Path, tok_dir: Path, seed: int, hidden: int, layers: int) -> Path:
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("hf_engine")
    build_tokenizer(root / "tok", files=20)
    main = _llama(root / "main", root / "tok", seed=0, hidden=64, layers=2)
    draft = _llama(root / "draft", root / "tok", seed=1, hidden=32, layers=1)
    from peft import LoraConfig, get_peft_model

    adapters = {}
    for i, name in enumerate(("a", "b", "c")):
        torch.manual_seed(10 + i)
        base = LlamaForCausalLM.from_pretrained(main)
        lora = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(base, lora).save_pretrained(root / name)
        adapters[name] = str(root / name)
    tok = AutoTokenizer.from_pretrained(root / "tok")
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    torch.manual_seed(2)
    MambaForCausalLM(MambaConfig(hidden_size=64, state_size=8, num_hidden_layers=2, **ids)).save_pretrained(root / "mamba")
    torch.manual_seed(3)
    Mamba2ForCausalLM(Mamba2Config(hidden_size=64, num_heads=4, head_dim=32, state_size=8, num_hidden_layers=2,
                                   n_groups=1, **ids)).save_pretrained(root / "mamba2")
    for name in ("mamba", "mamba2"):
        tok.save_pretrained(root / name)
    return {"main": str(main), "draft": str(draft), "mamba": str(root / "mamba"), "mamba2": str(root / "mamba2"),
            **adapters}


def run(coro):
    return asyncio.run(coro)


def req(prompt: str, max_tokens: int = 12, **kw) -> GenerationRequest:
    return GenerationRequest("t", prompt=prompt, max_tokens=max_tokens, temperature=kw.pop("temperature", 0), **kw)


@pytest.mark.parametrize("model", ["main", "mamba", "mamba2"])
def test_batched_greedy_equals_one_at_a_time(models, model):
    async def go():
        engine = HFEngine(models[model])
        await engine.start()
        solo = [await engine.generate(req(p, 8 + 3 * i)) for i, p in enumerate(PROMPTS)]
        before = engine.batches
        together = await asyncio.gather(*(engine.generate(req(p, 8 + 3 * i)) for i, p in enumerate(PROMPTS)))
        await asyncio.sleep(0.05)
        return solo, together, engine.batches - before

    solo, together, batches = run(go())
    assert batches == 1  # four requests, one generate() call
    assert [c.text for c in together] == [c.text for c in solo]
    assert [c.completion_tokens for c in together] == [c.completion_tokens for c in solo]
    assert [c.completion_tokens for c in solo] == [8, 11, 14, 17]  # each row stops at its own max_tokens


@pytest.mark.parametrize("method", ["prompt_lookup", "draft"])
def test_speculation_keeps_greedy_output(models, method):
    async def go():
        engine = HFEngine(models["main"], draft_model=models["draft"], draft_tokens=4)
        await engine.start()
        plain = [await engine.generate(req(p * 3, 24)) for p in PROMPTS]
        spec = [await engine.generate(req(p * 3, 24, speculation=method)) for p in PROMPTS]
        return plain, spec

    plain, spec = run(go())
    assert [c.text for c in spec] == [c.text for c in plain]


def test_mamba_speculation_keeps_greedy_output(models):
    async def go():
        engine = HFEngine(models["mamba"])
        await engine.start()
        plain = [await engine.generate(req(p * 3, 24)) for p in PROMPTS]
        spec = [await engine.generate(req(p * 3, 24, speculation="prompt_lookup")) for p in PROMPTS]
        return plain, spec, engine.info(), engine.spec_stats

    plain, spec, info, stats = run(go())
    assert [c.text for c in spec] == [c.text for c in plain]
    assert stats.accepted > 0 and info["kernel"] == "reference"  # guesses were kept, so states were rolled back


def test_mamba2_refuses_speculation_per_request_and_in_the_config(models):
    async def go():
        engine = HFEngine(models["mamba2"])
        await engine.start()
        with pytest.raises(InvalidRequest, match="not available for this backend's mamba2 model"):
            await engine.generate(req("x", speculation="prompt_lookup"))
        assert engine.info()["architecture"] == "mamba2"

    run(go())
    with pytest.raises(ValueError, match="not available for mamba2"):
        run(HFEngine(models["mamba2"], speculation="prompt_lookup").start())


def test_speculation_that_is_not_configured_is_a_request_error(models):
    async def go():
        engine = HFEngine(models["main"])
        await engine.start()
        with pytest.raises(InvalidRequest, match="no draft model"):
            await engine.generate(req("x", speculation="draft"))
        with pytest.raises(InvalidRequest, match="speculation must be one of"):
            await engine.generate(req("x", speculation="medusa"))

    run(go())
    with pytest.raises(ValueError, match="needs draft_model"):
        HFEngine(models["main"], speculation="draft")


def test_stream_matches_generate_and_stop_strings_cut(models):
    async def go():
        engine = HFEngine(models["main"])
        await engine.start()
        full = await engine.generate(req(PROMPTS[0], 20))
        pieces = [d async for d in engine.stream(req(PROMPTS[0], 20))]
        stop = full.text[5:8]
        stopped = await engine.generate(req(PROMPTS[0], 20, stop=[stop]))
        return full, pieces, stop, stopped

    full, pieces, stop, stopped = run(go())
    assert "".join(d.text for d in pieces) == full.text
    assert pieces[-1].finish_reason == full.finish_reason and pieces[-1].completion_tokens == full.completion_tokens
    assert stopped.finish_reason == "stop" and stopped.text == full.text[: full.text.find(stop)]


def test_a_consumer_that_goes_away_stops_its_generation(models):
    async def go():
        engine = HFEngine(models["main"])
        await engine.start()
        full = await engine.generate(req(PROMPTS[1], 300, temperature=0.9, seed=3, ignore_eos=True))
        before = engine.generated
        stream = engine.stream(req(PROMPTS[1], 300, temperature=0.9, seed=3, ignore_eos=True))
        async for _ in stream:
            break
        await stream.aclose()  # what Serve does when the client disconnects
        for _ in range(100):
            if engine.running == 0:
                break
            await asyncio.sleep(0.01)
        return full, engine.generated - before, engine.running

    full, made, running = run(go())
    assert full.completion_tokens == 300  # without cancellation it runs to max_tokens
    assert running == 0 and made < 50


def test_adapters_are_kept_in_an_lru(models):
    async def go():
        engine = HFEngine(models["main"], adapters={k: models[k] for k in "abc"}, max_loaded_adapters=2)
        await engine.start()
        base = await engine.generate(req(PROMPTS[0]))
        outs = {a: (await engine.generate(req(PROMPTS[0], adapter=a))).text for a in "abc"}
        loaded = list(engine.info()["adapters_loaded"])
        again = (await engine.generate(req(PROMPTS[0], adapter="a"))).text
        base_again = (await engine.generate(req(PROMPTS[0]))).text
        with pytest.raises(InvalidRequest, match="unknown adapter"):
            await engine.generate(req(PROMPTS[0], adapter="zzz"))
        return base.text, outs, loaded, again, base_again, engine.info()["adapters_loaded"]

    base, outs, loaded, again, base_again, loaded_after = run(go())
    assert loaded == ["b", "c"]  # a was evicted when c came
    assert loaded_after == ["c", "a"]
    assert len({base, *outs.values()}) == 4  # every adapter changes the output
    assert again == outs["a"] and base_again == base


def test_mixed_adapters_in_flight_each_get_their_own(models):
    async def go():
        engine = HFEngine(models["main"], adapters={k: models[k] for k in "ab"})
        await engine.start()
        solo = [(await engine.generate(req(PROMPTS[0], adapter=a))).text for a in (None, "a", "b")]
        mixed = await asyncio.gather(*(engine.generate(req(PROMPTS[0], adapter=a)) for a in (None, "a", "b", "a")))
        return solo, [c.text for c in mixed]

    solo, mixed = run(go())
    assert mixed == [solo[0], solo[1], solo[2], solo[1]]


def test_ignore_eos_runs_to_max_tokens(models):
    async def go():
        engine = HFEngine(models["main"])
        await engine.start()
        return await asyncio.gather(*(engine.generate(req(p, 40, ignore_eos=True, temperature=1.0, seed=None))
                                      for p in PROMPTS))

    assert [c.completion_tokens for c in run(go())] == [40] * len(PROMPTS)


def test_a_temperature_near_zero_is_greedy(models):
    assert req("x", 4, temperature=1e-300).temperature == 0.0 and req("x", 4, temperature=1e-5).temperature == 1e-5

    async def go():  # 1e-300 used to overflow the logits to NaN probabilities and fail the backend
        engine = HFEngine(models["main"], max_context=64)
        await engine.start()
        return [await engine.generate(req("hello there", 4, temperature=t)) for t in (1e-300, 0)]

    tiny, greedy = run(go())
    assert tiny.text == greedy.text and tiny.completion_tokens == 4


def test_fit_prompt_keeps_head_and_tail_only_when_asked():
    ids = list(range(100))
    assert fit_prompt(ids, req("x", 4), None) == (ids, 0)
    assert fit_prompt(ids, req("x", 4), 104) == (ids, 0)
    with pytest.raises(InvalidRequest, match="prompt of 100 tokens plus max_tokens 4 exceeds this model's context of 20"):
        fit_prompt(ids, req("x", 4), 20)
    assert fit_prompt(ids, req("x", 4, truncate=True), 20) == (list(range(8)) + list(range(92, 100)), 84)
    for context in (None, 20):  # an empty prompt is the request's fault, not the model's (it used to crash it)
        with pytest.raises(InvalidRequest, match="the prompt is empty"):
            fit_prompt([], req("", 4, truncate=True), context)


def test_a_truncated_request_is_answered_and_says_how_much_was_cut(models):
    async def go():
        engine = HFEngine(models["main"], max_context=64)
        await engine.start()
        prompt = " ".join(f"word{i}" for i in range(100))
        with pytest.raises(InvalidRequest, match="exceeds"):
            await engine.generate(req(prompt, 8))
        done = await engine.generate(req(prompt, 8, truncate=True))
        pieces = [d async for d in engine.stream(req(prompt, 8, truncate=True))]
        return done, pieces[-1]

    done, last = run(go())
    assert done.prompt_tokens == 56 and done.truncated_tokens > 100 and done.completion_tokens == 8
    assert (last.prompt_tokens, last.truncated_tokens) == (56, done.truncated_tokens)
