"""Train the embedded default transformer, its speculative draft and the default Mamba on the stdlib corpus.

Half of each batch is plain source (random windows of the train split), half is chat tasks made
from the same files: "Rewrite this code", "Fix this code" (a seeded corruption, see corpus.py)
and "Continue this code". The chat half teaches the model to copy from its prompt, which is what
prompt-lookup and draft speculation accept. Held-out perplexity (files the model never saw) is
reported next to the uniform and unigram baselines in the output's training.json.

    python -m training.lm --model tiny-llama          # about 25 min on 2 cores
    python -m training.lm --model tiny-llama-draft    # about 5 min
    python -m training.lm --model tiny-mamba          # about 30 min

The Mamba trains through models.mamba.forward (transformers' reference scan is far slower to
backpropagate on CPU) and is saved as an ordinary transformers MambaForCausalLM checkpoint.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import (AutoTokenizer, LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM,
                          PreTrainedTokenizerBase)

from models import mamba
from training import corpus
from training.defaults import SEED, TRAINED_DIR, build_tokenizer
from training.metrics import TrainingMetrics
from training.metrics import add_argument as add_metrics_argument

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    hidden: int
    layers: int
    intermediate: int = 0  # llama only
    heads: int = 0  # llama only
    kv_heads: int = 0  # llama only
    arch: str = "llama"  # or "mamba"
    state: int = 16  # mamba only
    steps: int = 1200
    batch: int = 16
    seq: int = 256
    lr: float = 1.5e-3
    warmup: float = 0.05  # share of steps
    chat_share: float = 0.5
    extra: dict[str, Any] = field(default_factory=dict)


PRESETS = {
    "tiny-llama": Preset(hidden=256, layers=4, intermediate=688, heads=8, kv_heads=4),
    "tiny-llama-draft": Preset(hidden=64, layers=2, intermediate=176, heads=4, kv_heads=2, lr=3e-3),
    # Same width and depth as tiny-llama; fewer steps, as a Mamba step costs about 3x on CPU.
    "tiny-mamba": Preset(hidden=256, layers=4, arch="mamba", steps=500),
}
TASKS = ("Rewrite this code:", corpus.FIX_PROMPT, "Continue this code:")


def model_config(preset: Preset, tok: PreTrainedTokenizerBase) -> LlamaConfig | MambaConfig:
    if preset.arch == "mamba":
        return MambaConfig(
            vocab_size=len(tok), hidden_size=preset.hidden, state_size=preset.state,
            num_hidden_layers=preset.layers, expand=2, conv_kernel=4, tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
    return LlamaConfig(
        vocab_size=len(tok), hidden_size=preset.hidden, intermediate_size=preset.intermediate,
        num_hidden_layers=preset.layers, num_attention_heads=preset.heads,
        num_key_value_heads=preset.kv_heads, max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )


def token_stream(tok: PreTrainedTokenizerBase, split: str) -> torch.Tensor:
    """Every file of the split, tokenized and joined with <|eos|>."""
    ids: list[int] = []
    for text in corpus.texts(split):
        ids.extend(tok(text, add_special_tokens=False, verbose=False)["input_ids"])
        ids.append(tok.eos_token_id)
    return torch.tensor(ids)


def chat_examples(tok: PreTrainedTokenizerBase, seq: int, seed: int = SEED) -> list[list[int]]:
    """One chat task per train-split block that fits in `seq` tokens, task chosen by a seeded draw."""
    rng = random.Random(seed)
    examples = []
    for text in corpus.texts("train"):
        for block in corpus.blocks_of(text, max_lines=16):
            task = rng.choice(TASKS)
            if task == corpus.FIX_PROMPT:
                broken = corpus.corrupt(block, rng.randrange(1 << 30))
                if broken is None:
                    continue
                prompt, answer = broken[0], block
            elif task == "Continue this code:":
                lines = block.splitlines()
                cut = max(1, len(lines) // 2)
                prompt, answer = "\n".join(lines[:cut]), "\n".join(lines[cut:])
            else:
                prompt, answer = block, block
            messages = [{"role": "user", "content": f"{task}\n{prompt}"},
                        {"role": "assistant", "content": answer}]
            ids = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
            if len(ids) <= seq:
                examples.append(list(ids))
    return examples


def batches(stream: torch.Tensor, chats: list[list[int]], preset: Preset, pad: int, seed: int = SEED):
    """Endless (input_ids, labels) batches: stream windows and padded chat examples, seeded."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    n_chat = round(preset.batch * preset.chat_share)
    while True:
        starts = torch.randint(0, len(stream) - preset.seq, (preset.batch - n_chat,), generator=gen)
        rows = [stream[s:s + preset.seq] for s in starts.tolist()]
        labels = [r.clone() for r in rows]
        for ids in rng.sample(chats, n_chat):
            row = torch.full((preset.seq,), pad)
            row[:len(ids)] = torch.tensor(ids)
            label = torch.full((preset.seq,), -100)
            label[:len(ids)] = row[:len(ids)]
            rows.append(row)
            labels.append(label)
        yield torch.stack(rows), torch.stack(labels)


def warmup_cosine(step: int, total: int, warmup: float, floor: float = 0.1) -> float:
    """LR multiplier: linear warm-up over `warmup` of the steps, then cosine down to `floor`."""
    w = max(1, round(total * warmup))
    if step < w:
        return (step + 1) / w
    progress = (step - w) / max(1, total - w)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def eval_windows(stream: torch.Tensor, n: int, seq: int, seed: int = SEED) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seq, (n,), generator=gen)
    return torch.stack([stream[s:s + seq] for s in starts.tolist()])


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss; Mamba through models.mamba, whose scan backpropagates fast on CPU."""
    if model.config.model_type == "mamba":
        return mamba.loss(model, x, y)
    return model(input_ids=x, labels=y).loss


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch: int = 16) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        x = windows[i:i + batch]
        predicted = x.numel() - len(x)  # every position but each row's first
        total += lm_loss(model, x, x).item() * predicted  # the loss is a mean over them
        count += predicted
    return math.exp(total / count)


def unigram_perplexity(train: torch.Tensor, windows: torch.Tensor, vocab: int) -> float:
    """The best context-free model: train-split token frequencies, add-one smoothed."""
    counts = torch.bincount(train, minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    targets = windows[:, 1:].reshape(-1)
    return math.exp(-logp[targets].mean().item())


def train(name: str, preset: Preset, out: Path, steps: int | None = None, eval_n: int = 64,
          command: str | None = None, metrics: TrainingMetrics | None = None) -> dict[str, Any]:
    torch.manual_seed(SEED)
    steps = steps or preset.steps
    metrics = metrics or TrainingMetrics(f"lm:{name}", steps)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(out)
    train_stream, heldout = token_stream(tok, "train"), token_stream(tok, "heldout")
    chats = chat_examples(tok, preset.seq)
    windows = eval_windows(heldout, eval_n, preset.seq)
    logger.info("%s: %d train tokens, %d held-out tokens, %d chat examples",
                name, len(train_stream), len(heldout), len(chats))

    model_class = MambaForCausalLM if preset.arch == "mamba" else LlamaForCausalLM
    model = model_class(model_config(preset, tok))
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=preset.lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, preset.warmup))
    data = batches(train_stream, chats, preset, tok.pad_token_id)
    start, losses = time.perf_counter(), []
    bar = tqdm(range(steps), desc=name, file=sys.stderr)
    for _ in bar:
        began = time.perf_counter()
        model.train()
        x, y = next(data)
        loss = lm_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        metrics.step(losses[-1], time.perf_counter() - began, x.shape[0])
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
    seconds = time.perf_counter() - start

    model.save_pretrained(out)
    report = {
        "name": name, "parameters": params, "preset": asdict(preset), "steps": steps, "seed": SEED,
        "corpus": corpus.corpus_id(), "train_tokens": len(train_stream), "chat_examples": len(chats),
        "final_train_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "heldout_windows": f"{eval_n} x {preset.seq} tokens",
        "heldout_ppl": round(perplexity(model, windows), 2),
        "unigram_ppl": round(unigram_perplexity(train_stream, windows, len(tok)), 2),
        "uniform_ppl": len(tok),
        "train_seconds": round(seconds, 1), "torch": torch.__version__,
        "command": command or f"python -m training.lm --model {name}",
    }
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    metrics.heldout(ppl=report["heldout_ppl"], unigram_ppl=report["unigram_ppl"])
    logger.info("%s", json.dumps(report))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(PRESETS), required=True)
    parser.add_argument("--steps", type=int, help="override the preset's step count")
    parser.add_argument("--out", type=Path, help="default: models/embedded/MODEL")
    add_metrics_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(torch.get_num_threads())
    command = "python -m training.lm " + shlex.join(argv if argv is not None else sys.argv[1:])
    preset = PRESETS[args.model]
    with TrainingMetrics(f"lm:{args.model}", args.steps or preset.steps, args.metrics_port) as metrics:
        train(args.model, preset, args.out or TRAINED_DIR / args.model, args.steps, command=command, metrics=metrics)


if __name__ == "__main__":
    main()
