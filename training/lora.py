"""Train a peft LoRA adapter for one backend's model on a JSONL dataset.

    python -m training.lora --backend transformer --config training/configs/lora_transformer.yaml
    python -m training.lora --backend mamba --config training/configs/lora_mamba.yaml

`--backend` names a backend of serve_config.yaml (or `--serve-config`); the base model is that
backend's `model` unless the config names one. Each backend writes to its own directory (the
config's `out`). The output is peft's standard format (adapter_config.json and
adapter_model.safetensors), which both the hf engine (PeftModel.load_adapter) and vLLM
(LoRARequest) read, plus the tokenizer and a training.json with the eval loss before and after.
Examples are chat messages or {"prompt", "completion"}; the loss is on the answer only.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from models.checkpoints import resolve_model
from models.hf_engine import MAMBA_TYPES
from training.lm import lm_loss
from training.metrics import TrainingMetrics
from training.metrics import add_argument as add_metrics_argument

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
# Mamba modules whose weights mamba-ssm's fused kernels read directly (never through forward()), so a
# LoRA there would do nothing on CUDA; dt_proj's delta also stays zero in training (its input is
# tiny and the softplus saturates), measured in the Mamba issue.
MAMBA_REFUSED = {"dt_proj", "out_proj", "conv1d"}


class LoraConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = Field(None, description="Base model; default: the backend's model in the serve config.")
    train: str = Field(description="JSONL training set, relative to the repo root or absolute.")
    eval: str = Field(description="JSONL eval set.")
    out: str = Field(description="Output directory of this backend's adapter.")
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(min_length=1)
    steps: int = Field(300, gt=0)
    batch: int = Field(8, gt=0)
    seq: int = Field(256, gt=8)
    lr: float = Field(2e-3, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _paths(self) -> LoraConfig:
        for name in ("train", "eval"):
            if not _path(getattr(self, name)).exists():
                raise ValueError(f"{name} dataset {getattr(self, name)} does not exist")
        return self


def _path(p: str) -> Path:
    return Path(p) if Path(p).is_absolute() else REPO / p


def backend_model(backend: str, serve_config: Path) -> tuple[str, str]:
    """(model ref, model kind hint) of the named backend in a serve config."""
    apps = yaml.safe_load(serve_config.read_text())["applications"]
    for backend_cfg in (b for app in apps for b in app["args"].get("backends", [])):
        if backend_cfg["name"] == backend:
            return backend_cfg["model"], backend_cfg.get("kind", "lm")
    raise SystemExit(f"no backend {backend!r} in {serve_config}")


def encode(example: dict[str, Any], tok: PreTrainedTokenizerBase, seq: int) -> tuple[list[int], list[int]] | None:
    """(input ids, labels) with the prompt masked out; None when the answer does not fit."""
    if "messages" in example:
        *context, answer = example["messages"]
        prompt = tok.apply_chat_template(context, tokenize=True, add_generation_prompt=True, return_dict=False)
        full = tok.apply_chat_template(example["messages"], tokenize=True, return_dict=False)
    else:
        prompt = tok(example["prompt"], add_special_tokens=False)["input_ids"]
        full = prompt + tok(example["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    if len(full) > seq or full[:len(prompt)] != list(prompt):
        return None
    return list(full), [-100] * len(prompt) + list(full[len(prompt):])


def load_examples(path: Path, tok: PreTrainedTokenizerBase, seq: int) -> list[tuple[list[int], list[int]]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    encoded = [e for e in (encode(r, tok, seq) for r in rows) if e is not None]
    if not encoded:
        raise SystemExit(f"no example of {path} fits in {seq} tokens")
    if len(encoded) < len(rows):
        logger.info("%s: %d of %d examples longer than %d tokens skipped", path, len(rows) - len(encoded), len(rows), seq)
    return encoded


def collate(examples: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@torch.no_grad()
def eval_loss(model: torch.nn.Module, examples: list, pad: int, batch: int = 16) -> float:
    """Mean loss per answer token over the whole eval set."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch):
        b = collate(examples[i:i + batch], pad)
        n = int((b["labels"][:, 1:] != -100).sum())
        total += lm_loss(model, b["input_ids"], b["labels"]).item() * n
        count += n
    return total / count


def train(cfg: LoraConfig, base: str, backend: str, command: str,
          metrics: TrainingMetrics | None = None) -> dict[str, Any]:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    path = resolve_model(base)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if model.config.model_type in MAMBA_TYPES and (bad := MAMBA_REFUSED & set(cfg.target_modules)):
        raise SystemExit(f"target_modules {sorted(bad)} are not LoRA-able on Mamba here; use in_proj, x_proj, embeddings")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    train_set = load_examples(_path(cfg.train), tok, cfg.seq)
    eval_set = load_examples(_path(cfg.eval), tok, cfg.seq)

    model = get_peft_model(model, PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
        task_type="CAUSAL_LM",
    ))
    before = eval_loss(model, eval_set, pad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / cfg.steps)  # linear decay to zero
    start, losses = time.perf_counter(), []
    metrics = metrics or TrainingMetrics(f"lora:{backend}", cfg.steps)
    metrics.heldout(eval_loss_before=before)
    bar = tqdm(range(cfg.steps), desc=f"lora {backend}", file=sys.stderr)
    for _ in bar:
        began = time.perf_counter()
        model.train()
        b = collate(random.sample(train_set, min(cfg.batch, len(train_set))), pad)
        loss = lm_loss(model, b["input_ids"], b["labels"])  # right padding: the mask changes no answer token
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        metrics.step(losses[-1], time.perf_counter() - began, b["input_ids"].shape[0])
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    seconds = time.perf_counter() - start
    after = eval_loss(model, eval_set, pad)
    metrics.heldout(eval_loss_after=after)

    out = _path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = base  # the config's reference, not this machine's path
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    (out / "README.md").unlink(missing_ok=True)  # peft's model-card template, empty of facts
    tok.save_pretrained(out)
    report = {
        "backend": backend, "base_model": base, "config": cfg.model_dump(), "trainable_parameters": trainable,
        "train_examples": len(train_set), "eval_examples": len(eval_set),
        "eval_loss_before": round(before, 4), "eval_loss_after": round(after, 4),
        "eval_ppl_before": round(math.exp(before), 2), "eval_ppl_after": round(math.exp(after), 2),
        "train_seconds": round(seconds, 1), "torch": torch.__version__, "command": command,
    }
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info("%s", json.dumps(report))
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", required=True, help="a backend name in the serve config (transformer, mamba)")
    parser.add_argument("--config", type=Path, required=True, help="YAML with LoraConfig's fields")
    parser.add_argument("--serve-config", type=Path, default=REPO / "serve_config.yaml")
    parser.add_argument("--steps", type=int, help="override the config's step count")
    add_metrics_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raw = yaml.safe_load(args.config.read_text())
    if args.steps:
        raw["steps"] = args.steps
    cfg = LoraConfig.model_validate(raw)
    model, kind = backend_model(args.backend, args.serve_config)
    if kind != "lm":
        raise SystemExit(f"backend {args.backend!r} is a {kind}, not a language model")
    command = "python -m training.lora " + shlex.join(argv if argv is not None else sys.argv[1:])
    with TrainingMetrics(f"lora:{args.backend}", cfg.steps, args.metrics_port) as metrics:
        return train(cfg, cfg.model or model, args.backend, command, metrics)


if __name__ == "__main__":
    main()
