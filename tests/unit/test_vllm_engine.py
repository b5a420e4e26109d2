"""models.vllm_engine's translation from our config and requests to vLLM's arguments, without vLLM.

The real engine runs in tests/vllm (`make test-vllm`); here only the pure functions, plus a check of
the field names against vLLM's own AsyncEngineArgs where vllm imports.
"""

from __future__ import annotations

import json

import pytest

from models.engine import GenerationRequest, InvalidRequest, prompt_text
from models.vllm_engine import (
    adapter_rank,
    check_speculation,
    engine_args,
    finish_reason,
    sampling_kwargs,
    speculation_name,
)

# Fields of vLLM's AsyncEngineArgs (0.32) that these tests and serve_config.gpu.yaml use;
# test_fields_are_vllms checks them against the installed vLLM.
FIELDS = frozenset({
    "model", "dtype", "max_model_len", "enable_lora", "max_loras", "max_lora_rank", "speculative_config",
    "gpu_memory_utilization", "max_num_seqs", "enable_prefix_caching", "enforce_eager", "kv_cache_memory_bytes",
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
    assert args(speculative_config=eagle)["speculative_config"] is eagle
    with pytest.raises(ValueError, match="speculative_config needs a 'method'"):
        args(speculative_config={"model": "draft", "num_speculative_tokens": 4})


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
                                    "ignore_eos": True}
    assert sampling_kwargs(GenerationRequest("r", prompt="p"))["stop"] is None


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
