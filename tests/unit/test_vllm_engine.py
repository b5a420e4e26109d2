"""models.vllm_engine's translation from our config and requests to vLLM's arguments, without vLLM.

The real engine runs in tests/vllm (`make test-vllm`); here the pure functions, a check of the field
names against vLLM's own AsyncEngineArgs where vllm imports, and VLLMEngine.stream over a fake
AsyncLLM (continuing another engine's stream).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import types

import pytest
from transformers import AutoTokenizer

from models.checkpoints import resolve_model
from models.engine import Continuation, GenerationRequest, InvalidRequest, prompt_text, tokenizer_fingerprint
from models.structured import Grammars
from models.vllm_engine import (
    VLLMEngine,
    adapter_rank,
    check_speculation,
    engine_args,
    finish_reason,
    logprobs_of,
    sampling_kwargs,
    speculation_name,
)

# Fields of vLLM's AsyncEngineArgs (0.32) that these tests and serve_config.gpu.yaml use;
# test_fields_are_vllms checks them against the installed vLLM.
FIELDS = frozenset({
    "model", "dtype", "max_model_len", "enable_lora", "max_loras", "max_lora_rank", "speculative_config",
    "gpu_memory_utilization", "max_num_seqs", "enable_prefix_caching", "enforce_eager", "kv_cache_memory_bytes",
    "structured_outputs_config",
})
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}


def args(adapters=None, lora_rank=None, device="cuda", **engine_kwargs):
    return engine_args("m", device, "bfloat16", 4096, adapters or {}, engine_kwargs, FIELDS, lora_rank=lora_rank)


def test_backend_fields_become_engine_args():
    assert args() == {"model": "m", "dtype": "bfloat16", "max_model_len": 4096}
    assert "max_model_len" not in engine_args("m", "cpu", "float32", None, {}, {}, FIELDS)  # the model's own


def test_unknown_engine_kwargs_are_named():
    with pytest.raises(ValueError, match=r"\['max_batch_size', 'speculation'\] are not fields of vLLM's"):
        args(max_batch_size=16, speculation="none", max_num_seqs=8)


@pytest.mark.parametrize("key", ["model", "dtype", "max_model_len", "enable_lora"])
def test_backend_fields_cannot_be_set_twice(key):
    with pytest.raises(ValueError, match=rf"\['{key}'\] are set from the backend's own fields"):
        args(**{key: 1})


@pytest.mark.parametrize("device", ["cuda:1", "mps", "gpu"])
def test_device_is_cpu_or_cuda_without_index(device):
    with pytest.raises(ValueError, match="vLLM takes 'cpu' or 'cuda'"):
        args(device=device)


@pytest.mark.parametrize(("rank", "max_lora_rank"), [(None, 16), (4, 8), (8, 8), (17, 32), (300, 320)])
def test_adapters_enable_lora_with_a_rank_vllm_accepts(rank, max_lora_rank):
    out = args({"a": "/a", "b": "/b"}, lora_rank=rank)
    assert (out["enable_lora"], out["max_loras"], out["max_lora_rank"]) == (True, 2, max_lora_rank)
    assert "enable_lora" not in args()


def test_engine_kwargs_override_lora_defaults():
    out = args({"a": "/a", "b": "/b", "c": "/c"}, lora_rank=8, max_loras=1, max_lora_rank=64)
    assert (out["max_loras"], out["max_lora_rank"]) == (1, 64)
    with pytest.raises(ValueError, match="LoRA rank 1024 is above"):
        args({"a": "/a"}, lora_rank=1024)


def test_speculative_config_passes_through():
    eagle = {"method": "eagle", "model": "yuhuili/EAGLE-LLaMA3.1-Instruct-8B", "num_speculative_tokens": 4}
    assert args(speculative_config=NGRAM, max_num_seqs=8)["speculative_config"] == NGRAM
    assert args(speculative_config=eagle)["speculative_config"] == eagle  # a hub id passes through unchanged
    with pytest.raises(ValueError, match="speculative_config needs a 'method'"):
        args(speculative_config={"model": "draft", "num_speculative_tokens": 4})


def test_a_draft_models_reference_resolves_as_a_backends_model_does(monkeypatch):
    from models import vllm_engine

    monkeypatch.setattr(vllm_engine, "resolve_model", lambda ref: f"/cache/{ref.removeprefix('embedded:')}")
    draft = {"method": "draft_model", "model": "embedded:smollm2-draft", "num_speculative_tokens": 2}
    assert args(speculative_config=draft)["speculative_config"] == {**draft, "model": "/cache/smollm2-draft"}
    assert draft["model"] == "embedded:smollm2-draft"  # the config's own mapping is left as it was


def test_adapter_rank_reads_peft_config(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "rank_pattern": {"q_proj": 24}}))
    assert adapter_rank(str(tmp_path)) == 24
    with pytest.raises(ValueError, match="has no adapter_config.json"):
        adapter_rank(str(tmp_path / "missing"))


def test_request_speculation_must_match_the_engine():
    assert [speculation_name(m) for m in (None, "ngram", "draft_model", "eagle")] == [
        "none", "prompt_lookup", "draft", "eagle"]
    check_speculation(None, "eagle")
    check_speculation("prompt_lookup", "ngram")
    check_speculation("none", None)
    with pytest.raises(InvalidRequest, match="runs speculation 'eagle' for every request and cannot switch to 'none'"):
        check_speculation("none", "eagle")
    with pytest.raises(InvalidRequest, match="runs speculation 'none'.*'draft'"):
        check_speculation("draft", None)


def test_sampling_kwargs():
    req = GenerationRequest("r", prompt="p", max_tokens=7, temperature=0, top_p=0.9, stop=["\n"], seed=3,
                            ignore_eos=True)
    assert sampling_kwargs(req) == {"max_tokens": 7, "temperature": 0, "top_p": 0.9, "stop": ["\n"], "seed": 3,
                                    "ignore_eos": True, "logprobs": None}
    assert sampling_kwargs(GenerationRequest("r", prompt="p"))["stop"] is None
    assert sampling_kwargs(GenerationRequest("r", prompt="p", logprobs=3))["logprobs"] == 3


def test_sampling_kwargs_constrain_to_the_schema():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    kwargs = sampling_kwargs(GenerationRequest("r", prompt="p", json_schema=schema))
    assert kwargs["structured_outputs"] == {"json": schema}
    with pytest.raises(InvalidRequest, match="cannot continue an answer under response_format"):
        sampling_kwargs(GenerationRequest("r", prompt="p", json_schema=schema, continuation=Continuation("{")))
    with pytest.raises(InvalidRequest, match="ignore_eos cannot be combined with response_format"):
        sampling_kwargs(GenerationRequest("r", prompt="p", json_schema=schema, ignore_eos=True))


def test_logprobs_of_vllms_entries():
    """vLLM's per-token mappings (the chosen token, and the top ones by rank) become our Logprobs with
    each token's exact bytes; the chosen token is in its own top list only when it ranks there."""
    vlp = types.SimpleNamespace
    entries = [{5: vlp(logprob=-0.1, rank=1), 7: vlp(logprob=-2.5, rank=2)},
               {9: vlp(logprob=-3.0, rank=4), 5: vlp(logprob=-0.2, rank=1), 7: vlp(logprob=-1.9, rank=2)}]
    out = logprobs_of([5, 9], entries, 2, lambda t: {5: b"a", 7: b"\xe2\x98", 9: b" b"}[t])
    assert [(p.token, p.logprob, p.bytes) for p in out] == [("a", -0.1, [97]), (" b", -3.0, [32, 98])]
    assert [(p.token, p.logprob) for p in out[0].top] == [("a", -0.1), ("\ufffd", -2.5)]
    assert out[0].top[1].bytes == [0xE2, 0x98]  # part of a character: its bytes, as OpenAI gives them
    assert [p.logprob for p in out[1].top] == [-0.2, -1.9]


class ChatTemplate:
    """Renders messages as role: content lines, the way a tokenizer's chat template would."""

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert (tokenize, add_generation_prompt) == (False, True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def test_prompt_text_puts_documents_first():
    docs = [("first", 1), ("second", None)]
    tok = ChatTemplate()
    assert prompt_text(GenerationRequest("r", prompt="q"), tok) == "q"
    assert prompt_text(GenerationRequest("r", prompt="q", documents=docs), tok) == "[page 1]\nfirst\n\nsecond\n\nq"
    chat = GenerationRequest("r", messages=[{"role": "user", "content": "hi"}], documents=docs)
    assert prompt_text(chat, tok) == "system: [page 1]\nfirst\n\nsecond\nuser: hi\nassistant: "


def test_finish_reasons():
    assert [finish_reason(r) for r in ("stop", "length", "abort")] == ["stop", "length", "abort"]
    with pytest.raises(RuntimeError, match="finish_reason 'error'"):
        finish_reason("error")


def test_fields_are_vllms():
    pytest.importorskip("vllm")
    import dataclasses

    from vllm import AsyncEngineArgs

    assert FIELDS <= {f.name for f in dataclasses.fields(AsyncEngineArgs)}


# --- VLLMEngine.stream on a fake AsyncLLM ----------------------------------------------------------

SCRIPT = " naïve café ☃ snowman – done, and the rest of it"


class ScriptLLM:
    """vLLM's AsyncLLM as far as VLLMEngine.stream uses it, serving a model that always answers
    SCRIPT: it goes on from the longest start of SCRIPT's tokens that ends the prompt, one token per
    step, with each step's text as vLLM's detokenizer gives it (whole characters only). It ignores
    stop strings, and records the prompts it is given and the requests aborted."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.script = tokenizer.encode(SCRIPT, add_special_tokens=False)
        self.renderer = types.SimpleNamespace(render_cmpl=lambda prompts: prompts)
        self.prompts: list[list[int]] = []
        self.aborted: list[str] = []

    def generate(self, prompt, params, rid, lora_request=None):
        ids = prompt["prompt_token_ids"]
        self.prompts.append(ids)
        done = max(n for n in range(min(len(ids), len(self.script)) + 1) if ids[len(ids) - n:] == self.script[:n])
        return self._outputs(self.script[done:done + params.max_tokens])

    async def _outputs(self, tokens):
        text = ""
        for i, token in enumerate(tokens):
            now = self.tokenizer.decode(tokens[:i + 1], skip_special_tokens=True)
            piece, text = ("", text) if now.endswith("\ufffd") else (now[len(text):], now)
            last = i == len(tokens) - 1
            logprobs = [{token: types.SimpleNamespace(logprob=-0.5, rank=1)}]  # as vLLM with logprobs=0
            out = types.SimpleNamespace(text=piece, token_ids=[token], finish_reason="length" if last else None,
                                        logprobs=logprobs)
            yield types.SimpleNamespace(finished=last, outputs=[out])

    async def abort(self, rid: str) -> None:
        self.aborted.append(rid)


@pytest.fixture
def scripted(monkeypatch) -> VLLMEngine:
    """A VLLMEngine as start() leaves it, on ScriptLLM and tiny-llama's tokenizer; vllm is faked."""

    @dataclasses.dataclass
    class AsyncEngineArgs:
        model: str
        dtype: str

    vllm = types.ModuleType("vllm")
    vllm.AsyncEngineArgs, vllm.SamplingParams = AsyncEngineArgs, types.SimpleNamespace
    params = types.ModuleType("vllm.sampling_params")
    params.RequestOutputKind = types.SimpleNamespace(DELTA="delta")
    params.StructuredOutputsParams = types.SimpleNamespace
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", params)
    engine = VLLMEngine("tiny-llama", device="cpu", dtype="float32")
    engine.tokenizer = AutoTokenizer.from_pretrained(resolve_model("embedded:tiny-llama"))
    engine.fingerprint = tokenizer_fingerprint(engine.tokenizer)
    exceptions = types.ModuleType("vllm.exceptions")
    exceptions.VLLMClientError = type("VLLMClientError", (Exception,), {})
    monkeypatch.setitem(sys.modules, "vllm.exceptions", exceptions)
    engine.engine, engine.max_context = ScriptLLM(engine.tokenizer), 1024
    engine._token_bytes = Grammars(engine.tokenizer, len(engine.tokenizer)).token_bytes
    return engine


def collect(engine: VLLMEngine, request: GenerationRequest) -> list:
    async def go():
        return [d async for d in engine.stream(request)]

    return asyncio.run(go())


def scripted_request(max_tokens: int, **kw) -> GenerationRequest:
    return GenerationRequest("t", prompt="say:", max_tokens=max_tokens, temperature=0, **kw)


def test_vllm_stream_hands_out_every_token(scripted):
    script = scripted.engine.script
    deltas = collect(scripted, scripted_request(len(script)))
    assert "".join(d.text for d in deltas) == SCRIPT
    assert [t for d in deltas for t in d.token_ids] == script
    assert all(d.tokenizer == scripted.fingerprint for d in deltas)
    assert (deltas[-1].finish_reason, deltas[-1].completion_tokens) == ("length", len(script))


def test_vllm_stream_gives_each_tokens_logprob_with_its_piece(scripted):
    script = scripted.engine.script
    deltas = collect(scripted, scripted_request(len(script), logprobs=0))
    assert all(len(d.logprobs) == len(d.token_ids) for d in deltas)
    scored = [p for d in deltas for p in d.logprobs]
    assert b"".join(bytes(p.bytes) for p in scored).decode() == SCRIPT  # every byte once, in order
    assert {p.logprob for p in scored} == {-0.5}
    assert all(d.logprobs is None for d in collect(scripted, scripted_request(3)))


def test_vllm_continues_a_stream_with_its_token_ids(scripted):
    """Cut after every token, with all the text delivered that the ids make (less an incomplete
    character) or with 2 characters held back: the continuation sends exactly the rest."""
    script, prompt = scripted.engine.script, scripted.tokenizer.encode("say:", add_special_tokens=False)
    for k in range(1, len(script)):
        made = scripted.tokenizer.decode(script[:k], skip_special_tokens=True).removesuffix("\ufffd")
        for text in (made, made[:-2]):
            cont = Continuation(text, script[:k], scripted.fingerprint)
            deltas = collect(scripted, scripted_request(len(script) - k, continuation=cont))
            assert scripted.engine.prompts[-1] == prompt + script[:k]
            assert text + "".join(d.text for d in deltas) == SCRIPT
            assert script[:k] + [t for d in deltas for t in d.token_ids] == script
            assert deltas[-1].completion_tokens == len(script) - k
            assert deltas[-1].prompt_tokens == len(prompt) + k


def test_vllm_continues_a_text_and_stops_across_the_boundary(scripted):
    script = scripted.engine.script
    cont = Continuation(" naïve", script[:5], "other")  # another tokenizer's ids: the text is tokenized again
    request = scripted_request(6, continuation=cont)
    deltas = collect(scripted, request)
    assert scripted.engine.prompts[-1] == scripted.tokenizer.encode(prompt_text(request, scripted.tokenizer),
                                                                     add_special_tokens=False)
    assert deltas[-1].completion_tokens <= 6 and deltas[-1].tokenizer == scripted.fingerprint
    # the previous engine held back "ca" of the stop string "café"; vLLM itself sees only "fé..."
    assert scripted.tokenizer.decode(script[:7]) == " naïve ca"
    cont = Continuation(" naïve ", script[:7], scripted.fingerprint)
    deltas = collect(scripted, scripted_request(20, continuation=cont, stop=["café"]))
    assert "".join(d.text for d in deltas) == "" and deltas[-1].finish_reason == "stop"
    assert deltas[-1].completion_tokens < 20 and scripted.engine.aborted  # vLLM's request was ended
