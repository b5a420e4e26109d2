"""HFEngine on tiny seeded models (no Ray): dynamic batching, speculation, streaming, cancellation,
the adapter LRU, continuing another engine's stream. Greedy output must not depend on how requests
were batched, speculated or cut and continued."""

from __future__ import annotations

import asyncio
import functools
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import (AutoTokenizer, LlamaConfig, LlamaForCausalLM, Mamba2Config, Mamba2ForCausalLM, MambaConfig,
                          MambaForCausalLM)

from models.checkpoints import resolve_model
from models.engine import (Answer, Continuation, Delta, GenerationRequest, InvalidRequest, Prompt, fit_prompt,
                           prompt_text, tokenizer_fingerprint)
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


async def idle(engine: HFEngine) -> None:
    """Until the engine's batch has ended: a request answered in full may leave a continuous batch that
    is still looking for rows to take, which a request sent now would join."""
    for _ in range(500):
        if engine.running == 0:
            return
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("model", ["main", "mamba", "mamba2"])
def test_batched_greedy_equals_one_at_a_time(models, model):
    async def go():
        engine = HFEngine(models[model])
        await engine.start()
        solo = [await engine.generate(req(p, 8 + 3 * i)) for i, p in enumerate(PROMPTS)]
        await idle(engine)
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


def test_stream_interval_sends_the_first_token_alone_then_pieces_of_that_many(models):
    """vLLM's stream_interval, on the tokens as the engine hands them over: the first at once, then a
    piece once 4 are waiting (all of those waiting), the rest at the end."""
    async def go():
        engine = HFEngine(models["main"], stream_interval=4)
        job = SimpleNamespace(queue=asyncio.Queue(), done=False, cancel=threading.Event())
        pieces = engine._tokens(job)
        job.queue.put_nowait(7)
        got = [await anext(pieces)]
        for token in (8, 9, 10):
            job.queue.put_nowait(token)
        waiting = asyncio.ensure_future(anext(pieces))
        await asyncio.sleep(0.01)
        held = not waiting.done()  # three tokens wait for a fourth
        for token in (11, 12):
            job.queue.put_nowait(token)
        got.append(await waiting)
        job.queue.put_nowait(13)
        job.done = True
        job.queue.put_nowait(None)
        got += [piece async for piece in pieces]
        return held, got

    held, got = run(go())
    assert held and got == [[7], [8, 9, 10, 11, 12], [13]]


@pytest.mark.parametrize("kind", ["main", "mamba"])
def test_a_stream_in_pieces_has_the_tokens_and_text_of_generate(models, kind):
    async def go():
        engine = HFEngine(models[kind], stream_interval=4, threads=1)
        await engine.start()
        full = await engine.generate(req(PROMPTS[2], 23, ignore_eos=True))
        pieces = [d async for d in engine.stream(req(PROMPTS[2], 23, ignore_eos=True))]
        return full, pieces, engine.info()

    full, pieces, info = run(go())
    sizes = [len(d.token_ids) for d in pieces if d.token_ids]  # the finishing piece may carry none
    assert all(n >= 4 for n in sizes[1:-1]) and sum(sizes) == 23  # the first may come alone, the last has the rest
    assert "".join(d.text for d in pieces) == full.text
    assert info["stream_interval"] == 4 and info["threads"] == 1
    with pytest.raises(ValueError, match="stream_interval"):
        HFEngine(models[kind], stream_interval=0)


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


# --- continuing a stream another engine started ---------------------------------------------------

CHAT = {"messages": [{"role": "user", "content": "Write a docstring for def parse(path):"}]}
COMPLETION = {"prompt": "def add(a, b):"}
NEVER = "@@@@"  # a stop string the answers never hold: the stream holds back its last 3 characters


def greedy(max_tokens: int, **kw) -> GenerationRequest:
    return GenerationRequest("t", max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


async def collect(engine: HFEngine, request: GenerationRequest) -> list[Delta]:
    return [d async for d in engine.stream(request)]


def text_of(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


def ids_of(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def decode(engine: HFEngine, ids: list[int]) -> str:
    return engine.tokenizer.decode(ids, skip_special_tokens=True)


def test_prompt_text_continues_the_assistant_turn():
    tok = AutoTokenizer.from_pretrained(resolve_model("embedded:tiny-llama"))
    cont = Continuation(" so far", [], None)
    chat, completion = GenerationRequest("t", **CHAT), GenerationRequest("t", **COMPLETION)
    assert prompt_text(GenerationRequest("t", **CHAT, continuation=cont), tok) == prompt_text(chat, tok) + " so far"
    assert prompt_text(GenerationRequest("t", **COMPLETION, continuation=cont), tok) == "def add(a, b): so far"
    assert prompt_text(completion, tok) == "def add(a, b):"


def test_tokenizer_fingerprint_follows_the_vocabulary(models):
    llama = AutoTokenizer.from_pretrained(resolve_model("embedded:tiny-llama"))
    mamba = AutoTokenizer.from_pretrained(resolve_model("embedded:tiny-mamba"))  # the same tokenizer files
    other = AutoTokenizer.from_pretrained(models["main"])  # trained on other files
    fingerprint = tokenizer_fingerprint(llama)
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert tokenizer_fingerprint(mamba) == fingerprint != tokenizer_fingerprint(other)
    llama("a b c", padding="max_length", max_length=8, truncation=True)  # per-call state leaves it alone
    assert tokenizer_fingerprint(llama) == fingerprint


@pytest.mark.parametrize("kind", [CHAT, COMPLETION], ids=["chat", "completion"])
def test_a_stream_continues_exactly_where_another_was_cut(kind):
    """A greedy stream cut after k tokens and continued with those tokens is the uninterrupted one:
    cut at a token (all its text delivered) or where a stream holding back text for a stop string was
    cut (the continuation must send what the client never got), batched together or one at a time."""

    async def go():
        engine = HFEngine(resolve_model("embedded:tiny-llama"))
        await engine.start()
        fingerprint = engine.info()["tokenizer"]
        full = await collect(engine, greedy(40, **kind))
        held = await collect(engine, greedy(40, **kind, stop=[NEVER]))
        ids = ids_of(full)
        cuts = [(decode(engine, ids[:13]), ids[:13])]  # all of the first 13 tokens' text delivered
        for j in (4, len(held) // 2):  # the client has the pieces before j
            cuts.append((text_of(held[:j]), ids_of(held[:j])))
        conts = [Continuation(text, cut, fingerprint) for text, cut in cuts]
        continued = await asyncio.gather(*(collect(engine, greedy(40 - len(c.token_ids), **kind, continuation=c))
                                           for c in conts))
        one = await engine.generate(greedy(40 - 13, **kind, continuation=conts[0]))
        spec = await engine.generate(greedy(40 - 13, **kind, continuation=conts[0], speculation="prompt_lookup"))
        return fingerprint, engine, full, held, conts, continued, one, spec

    fingerprint, engine, full, held, conts, continued, one, spec = run(go())
    whole, ids = text_of(full), ids_of(full)
    assert len(ids) == 40 and text_of(held) == whole and ids_of(held) == ids
    assert any(len(decode(engine, c.token_ids)) > len(c.text) for c in conts)  # a cut with text held back
    for cont, deltas in zip(conts, continued):
        assert cont.text + text_of(deltas) == whole
        assert cont.token_ids + ids_of(deltas) == ids
        assert deltas[-1].completion_tokens == 40 - len(cont.token_ids) and deltas[-1].finish_reason == "length"
        assert deltas[-1].prompt_tokens > len(cont.token_ids)
        assert all(d.tokenizer == fingerprint for d in deltas)
    assert conts[0].text + one.text == conts[0].text + spec.text == whole
    assert one.completion_tokens == 27


def test_a_stop_string_across_the_boundary_ends_the_continuation():
    """The previous engine held back the start of a stop string; the new tokens complete it."""

    async def go():
        engine = HFEngine(resolve_model("embedded:tiny-llama"))
        await engine.start()
        ids = ids_of(await collect(engine, greedy(40, **COMPLETION)))
        whole = decode(engine, ids)

        def stop_at(k: int) -> str:  # the last 2 characters of the first k tokens' text and the next 2
            head = decode(engine, ids[:k])
            return head[-2:] + whole[len(head):len(head) + 2]

        # the first cut where that stop string first occurs across the boundary
        k = next(k for k in range(10, 30) if len(stop_at(k)) == 4
                 and whole.find(stop_at(k)) == len(decode(engine, ids[:k])) - 2)
        head, stop = decode(engine, ids[:k]), stop_at(k)
        cont = Continuation(head[:-3], ids[:k], engine.fingerprint)  # 3 = len(stop) - 1 held back
        request = greedy(40 - k, **COMPLETION, stop=[stop], continuation=cont)
        needed = next(n for n in range(1, 40 - k) if stop in decode(engine, ids[:k + n]))
        return whole, cont, stop, needed, await collect(engine, request), await engine.generate(request)

    whole, cont, stop, needed, deltas, done = run(go())
    assert text_of(deltas) == done.text == whole[len(cont.text):whole.find(stop)]
    assert deltas[-1].finish_reason == done.finish_reason == "stop"
    assert deltas[-1].completion_tokens == done.completion_tokens == needed  # the job stopped there too


@pytest.mark.parametrize("kind", [CHAT, COMPLETION], ids=["chat", "completion"])
def test_a_text_continuation_when_the_tokenizers_differ(kind):
    """Token ids from another tokenizer are not used: the text is tokenized again after the prompt.
    For completions that is the request with the text appended to its prompt."""

    async def go():
        engine = HFEngine(resolve_model("embedded:tiny-llama"))
        await engine.start()
        full = await collect(engine, greedy(40, **kind))
        cont = Continuation(text_of(full[:10]), ids_of(full[:10]), "other")
        request = greedy(40 - len(cont.token_ids), **kind, continuation=cont)
        deltas = await collect(engine, request)
        appended = await engine.generate(greedy(40 - len(cont.token_ids), prompt=kind.get("prompt", "") + cont.text))
        return request, deltas, appended, engine.tokenizer

    request, deltas, appended, tok = run(go())
    last = deltas[-1]
    assert last.completion_tokens == request.max_tokens == len(ids_of(deltas))  # ignore_eos: all of them
    assert last.prompt_tokens == len(tok.encode(prompt_text(request, tok), add_special_tokens=False))
    if request.prompt is not None:
        assert text_of(deltas) == appended.text


@pytest.mark.parametrize("kind", [CHAT, COMPLETION], ids=["chat", "completion"])
def test_mamba_continues_the_text_of_a_llama(kind):
    """A stream moved to another architecture (the same tokenizer files, but sent as text)."""

    async def go():
        llama = HFEngine(resolve_model("embedded:tiny-llama"))
        await llama.start()
        cut = (await collect(llama, greedy(40, **kind)))[:10]
        mamba = HFEngine(resolve_model("embedded:tiny-mamba"))
        await mamba.start()
        cont = Continuation(text_of(cut), [], None)
        request = greedy(16, **kind, continuation=cont)
        deltas = await collect(mamba, request)
        appended = await mamba.generate(greedy(16, prompt=kind.get("prompt", "") + cont.text))
        return request, deltas, appended, mamba.tokenizer

    request, deltas, appended, tok = run(go())
    assert deltas[-1].completion_tokens == 16 == len(ids_of(deltas))
    assert deltas[-1].prompt_tokens == len(tok.encode(prompt_text(request, tok), add_special_tokens=False))
    if request.prompt is not None:
        assert text_of(deltas) == appended.text


def test_an_answer_completes_a_character_the_previous_engine_cut():
    """The previous engine's tokens end inside a character, which it did not send: the new one does."""
    tok = AutoTokenizer.from_pretrained(resolve_model("embedded:tiny-llama"))
    text = " naïve café ☃ snowman – done"
    ids = tok.encode(text, add_special_tokens=False)
    text_of_ids = functools.partial(tok.decode, skip_special_tokens=True)
    k = next(k for k in range(1, len(ids)) if text_of_ids(ids[:k]).endswith("\ufffd"))
    sent = len(text_of_ids(ids[:k])) - 1
    answer = Answer(GenerationRequest("t"), Prompt([1] + ids[:k], answer_ids=ids[:k], sent=sent), text_of_ids)
    pieces = [answer.add([t]) for t in ids[k:]]
    assert "".join(pieces) + answer.rest() == text[sent:] and not any("\ufffd" in p for p in pieces)


# --- continuous batching: a Mamba-1 on the reference path -----------------------------------------

MAMBA = "embedded:tiny-mamba"


def _rows_per_step(monkeypatch) -> list[int]:
    """Records the rows of every decoding step (one token per row) that models.mamba.forward runs."""
    from models import mamba

    sizes: list[int] = []
    forward = mamba.forward

    def recording(model, ids, *args, **kwargs):
        if ids.shape[1] == 1:
            sizes.append(ids.shape[0])
        return forward(model, ids, *args, **kwargs)

    monkeypatch.setattr(mamba, "forward", recording)
    return sizes


def test_mamba_requests_join_a_running_batch_and_leave_it_when_done(monkeypatch):
    """A long request runs; two others of other prompt lengths and max_tokens arrive when it is 10
    tokens in and join its batch; each leaves at its own max_tokens while the rest go on; the long one
    is then cancelled. Every row's greedy output is the one it gets alone, which is transformers'."""

    async def go():
        engine = HFEngine(resolve_model(MAMBA))
        await engine.start()
        first = greedy(1000, prompt=PROMPTS[2])
        late = [greedy(12, prompt=PROMPTS[0]), greedy(40, prompt=PROMPTS[1] * 2)]
        solo_first = ids_of(await collect(engine, greedy(64, prompt=PROMPTS[2])))
        solo = [await engine.generate(r) for r in late]
        prompt = engine.tokenizer.encode(PROMPTS[2], add_special_tokens=False)
        reference = await engine.on_engine_thread(lambda: engine.model.generate(
            torch.tensor([prompt]), max_new_tokens=64, min_new_tokens=64, do_sample=False)[0, len(prompt):].tolist())
        sizes = _rows_per_step(monkeypatch)
        await idle(engine)
        before, half_way, leave, got = engine.batches, asyncio.Event(), asyncio.Event(), []

        async def consume():
            stream = engine.stream(first)
            async for delta in stream:
                got.extend(delta.token_ids)
                if len(got) >= 10:
                    half_way.set()
                if leave.is_set():
                    break
            await stream.aclose()  # the client goes away: the row is cancelled

        consumer = asyncio.create_task(consume())
        await half_way.wait()
        together = await asyncio.gather(*(engine.generate(r) for r in late))
        leave.set()
        await consumer
        await idle(engine)
        return solo_first, reference, solo, together, got, sizes, engine.batches - before

    solo_first, reference, solo, together, got, sizes, batches = run(go())
    assert solo_first == reference  # the loop's prefill and steps are transformers' greedy decoding
    assert batches == 1  # the late requests joined the running batch
    assert [c.text for c in together] == [c.text for c in solo]
    assert [c.completion_tokens for c in together] == [12, 40]
    assert 10 <= len(got) < 1000  # cancelled
    assert got[:64] == solo_first[:len(got)]
    peak = sizes.index(3)
    assert set(sizes[:peak]) <= {1, 2} and sizes[0] == 1  # the late ones joined a batch of one
    after = sizes[peak:]  # each left when done while the others went on, the long one alone at the end
    assert after == sorted(after, reverse=True) and after[-1] == 1 and 2 in after


def test_mamba_rows_keep_their_own_stop_strings_eos_and_sampling():
    """Rows of one batch with a stop string, eos, ignore_eos, greedy and seeded sampling each end as
    they do alone; a seed gives the same draws in a batch as alone."""
    ends = [{"role": "user", "content": "Fix this code: x = = 1"}]  # the embedded Mamba answers it with eos

    async def go():
        engine = HFEngine(resolve_model(MAMBA))
        await engine.start()
        full = await engine.generate(req(PROMPTS[0], 30))
        stop = full.text[6:9]
        requests = [req(PROMPTS[0], 30, stop=[stop]), req(PROMPTS[1], 40, ignore_eos=True),
                    GenerationRequest("t", messages=ends, max_tokens=60, temperature=0),
                    GenerationRequest("t", messages=ends, max_tokens=60, temperature=0, ignore_eos=True),
                    req(PROMPTS[2], 24, temperature=0.8, top_p=0.9, seed=7),
                    req(PROMPTS[2], 24, temperature=0.8, top_p=0.9, seed=8)]
        solo = [await engine.generate(r) for r in requests]
        await idle(engine)
        before = engine.batches
        together = await asyncio.gather(*(engine.generate(r) for r in requests))
        return full, stop, solo, together, engine.batches - before

    full, stop, solo, together, batches = run(go())
    assert batches == 1
    assert [(c.text, c.completion_tokens, c.finish_reason) for c in together] == \
        [(c.text, c.completion_tokens, c.finish_reason) for c in solo]
    assert together[0].finish_reason == "stop" and together[0].text == full.text[:full.text.find(stop)]
    assert together[1].completion_tokens == 40
    assert together[2].finish_reason == "stop" and together[2].completion_tokens < 60  # eos
    assert together[3].completion_tokens == 60 and together[3].text.startswith(together[2].text)
    assert together[4].text != together[5].text  # the seeds drew differently


def test_mamba_another_adapter_and_speculation_wait_for_the_batch_to_drain():
    """Requests for another adapter, or speculating, do not join the running batch: they run after
    it (the base rows together, then the adapter's, then the speculating one), each answering as alone.
    Prompt-lookup speculation on a lone request gives the greedy answer."""

    async def go():
        engine = HFEngine(resolve_model(MAMBA), adapters={"pydoc": resolve_model("embedded:tiny-mamba-pydoc-lora")})
        await engine.start()
        requests = [req(PROMPTS[0], 16), req(PROMPTS[0], 16, adapter="pydoc"), req(PROMPTS[3], 20),
                    req(PROMPTS[1] * 3, 24, speculation="prompt_lookup"), req(PROMPTS[3], 20, adapter="pydoc")]
        solo = [await engine.generate(r) for r in requests]
        plain = await engine.generate(req(PROMPTS[1] * 3, 24))
        await idle(engine)
        before = engine.batches
        together = await asyncio.gather(*(engine.generate(r) for r in requests))
        return solo, plain, together, engine.batches - before, engine.spec_stats

    solo, plain, together, batches, stats = run(go())
    assert [c.text for c in together] == [c.text for c in solo]
    assert solo[0].text != solo[1].text  # the adapter changes the answer
    assert solo[3].text == plain.text and stats.accepted > 0
    assert batches == 3


def test_mamba_a_failing_step_fails_the_rows_in_flight_and_the_engine_goes_on(monkeypatch):
    """A step that raises ends every row in flight with the error; the next request is served."""
    from models import mamba

    forward = mamba.forward

    def failing(model, ids, *args, **kwargs):
        if ids.shape[0] == 2:  # the first step of the two rows together
            raise RuntimeError("no memory left")
        return forward(model, ids, *args, **kwargs)

    async def go():
        engine = HFEngine(resolve_model(MAMBA))
        await engine.start()
        monkeypatch.setattr(mamba, "forward", failing)
        failed = await asyncio.gather(*(engine.generate(req(p, 8)) for p in PROMPTS[:2]), return_exceptions=True)
        monkeypatch.setattr(mamba, "forward", forward)
        after = await engine.generate(req(PROMPTS[0], 8))
        await idle(engine)
        return failed, after, engine.info()

    failed, after, info = run(go())
    assert all(isinstance(f, RuntimeError) and "no memory left" in str(f) for f in failed)
    assert after.completion_tokens == 8 and info["running"] == 0 and info["continuous_batching"]


# --- logprobs and structured outputs ------------------------------------------------------------------

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.mark.parametrize("model", ["embedded:tiny-llama", "embedded:tiny-mamba"])
def test_logprobs_are_the_models_own_and_do_not_depend_on_batching(model):
    """Each token's logprob is log_softmax of the model's logits for it, computed here by a plain forward
    over prompt + answer; alone or batched beside other requests the values are the same."""

    async def go():
        engine = HFEngine(resolve_model(model))
        await engine.start()
        alone = await engine.generate(greedy(6, prompt="def add(a, b):", logprobs=3))
        together = await asyncio.gather(*(engine.generate(greedy(6, prompt=p, logprobs=3)) for p in PROMPTS))
        return engine, alone, together

    engine, alone, together = run(go())
    ids = engine.tokenizer.encode("def add(a, b):", add_special_tokens=False)
    answer = engine.tokenizer.encode(alone.text, add_special_tokens=False)
    with torch.inference_mode():
        logits = engine.model(torch.tensor([ids + answer])).logits[0, len(ids) - 1:-1]
    expected = torch.log_softmax(logits.float(), -1)
    assert len(alone.logprobs) == 6 and answer == [expected[i].argmax().item() for i in range(6)]
    for i, p in enumerate(alone.logprobs):
        assert p.logprob == pytest.approx(expected[i, answer[i]].item(), abs=1e-4)
        assert [t.logprob for t in p.top] == pytest.approx(expected[i].topk(3).values.tolist(), abs=1e-4)
    assert b"".join(bytes(p.bytes) for p in alone.logprobs).decode() == alone.text
    assert [p.logprob for p in together[0].logprobs] == pytest.approx([p.logprob for p in alone.logprobs], abs=1e-4)


@pytest.mark.parametrize("model", ["embedded:tiny-llama", "embedded:tiny-mamba"])
def test_constrained_rows_share_a_batch_with_free_ones_and_validate(model):
    import json

    import jsonschema

    async def go():
        engine = HFEngine(resolve_model(model))
        await engine.start()
        asks = [req("a person:", 80, temperature=1, json_schema=PERSON) for _ in range(4)]  # no seed: one batch
        free = [req(p, 8) for p in PROMPTS]
        before = engine.batches
        answers = await asyncio.gather(*(engine.generate(r) for r in asks + free))
        return answers, engine.batches - before

    answers, batches = run(go())
    for a in answers[:4]:
        assert a.finish_reason == "stop"
        jsonschema.validate(json.loads(a.text), PERSON)
    assert all(a.completion_tokens == 8 or a.finish_reason == "stop" for a in answers[4:])
    assert batches <= 2  # the constrained rows did not each run alone


@pytest.mark.parametrize("same_tokenizer", [True, False], ids=["token ids", "text"])
def test_a_constrained_stream_continues_inside_its_json(same_tokenizer):
    """A JSON answer cut half-way and continued (with its token ids, or as text from another tokenizer) is
    still one valid document: the grammar first consumes what was sent."""
    import json

    import jsonschema

    async def go():
        engine = HFEngine(resolve_model("embedded:tiny-mamba"))
        await engine.start()
        first = await collect(engine, req("a person:", 80, temperature=1, seed=5, json_schema=PERSON))
        half = first[:len(first) // 2]
        cont = Continuation(text_of(half), ids_of(half) if same_tokenizer else [],
                            engine.fingerprint if same_tokenizer else None)
        rest = await collect(engine, req("a person:", 80, temperature=1, seed=6, json_schema=PERSON,
                                         continuation=cont))
        return cont, rest

    cont, rest = run(go())
    assert cont.text.startswith("{") and not cont.text.endswith("}")
    jsonschema.validate(json.loads(cont.text + text_of(rest)), PERSON)


def test_logprobs_or_a_grammar_refuse_a_speculation_asked_for_and_skip_a_configured_one(models):
    async def go():
        engine = HFEngine(models["main"], speculation="prompt_lookup")
        await engine.start()
        with pytest.raises(InvalidRequest, match="cannot be combined with logprobs or response_format"):
            await engine.generate(req("x", 4, logprobs=0, speculation="prompt_lookup"))
        with pytest.raises(InvalidRequest, match="JSON schema cannot be used"):
            await engine.generate(req("x", 4, json_schema={"type": "string", "pattern": "(?<=a)b"}))
        with pytest.raises(InvalidRequest, match="ignore_eos cannot be combined"):
            await engine.generate(req("x", 4, json_schema=PERSON, ignore_eos=True))
        rounds = engine.spec_stats.rounds
        plain = await engine.generate(req("x = 1\nx = 1\nx =", 8, logprobs=0))
        return plain, engine.spec_stats.rounds - rounds

    plain, rounds = run(go())
    assert len(plain.logprobs) == plain.completion_tokens and rounds == 0
