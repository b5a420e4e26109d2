"""Train the embedded default transformer, its speculative draft and the default Mamba on the stdlib corpus.

Half of each batch is plain source (random windows of the train split), half is chat tasks made
from the same files: "Rewrite this code", "Fix this code" (a seeded corruption, see corpus.py)
and "Continue this code". Those tasks alone did not teach the transformer to copy from its prompt,
which is what prompt-lookup and draft speculation accept: a preset's `copy_steps` first train on
synthetic repeats (`repeated_spans`), which grow the induction heads copying needs, and
`copy_share` keeps some in every later batch. The output's training.json reports held-out
perplexity (files the model never saw) next to the uniform and unigram baselines, and how often the
model's greedy guess hits on held-out repeats and rewrites; `--evaluate DIR` recomputes them.

    python -m training.lm --model tiny-llama          # about 17 min on 2 cores
    python -m training.lm --model tiny-llama-draft    # about 14 min (distilled from tiny-llama)
    python -m training.lm --model tiny-mamba          # about 30 min
    python -m training.lm --evaluate models/embedded/tiny-llama

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
import torch.nn.functional as F
from tqdm import tqdm
from transformers import (AutoTokenizer, LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM,
                          PreTrainedTokenizerBase)

from models import mamba
from models.code_grid import FIX_PROMPT
from training import corpus
from models.checkpoints import EMBEDDED_DIR
from training.defaults import SEED, build_tokenizer
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
    copy_steps: int = 0  # induction warm-up: steps of synthetic repeated spans before the corpus
    copy_share: float = 0.0  # share of each later batch that stays synthetic repeats
    teacher: str | None = None  # after the warm-up, learn this embedded model's next-token distributions
    extra: dict[str, Any] = field(default_factory=dict)


PRESETS = {
    # 128 wide: in the copy warm-up (repeated_spans) a 4-layer 128-wide model formed induction heads after
    # about 800 steps here, the same depth 256 wide not within 800 (README, "The embedded default models")
    "tiny-llama": Preset(hidden=128, layers=4, intermediate=344, heads=4, kv_heads=2, lr=3e-3, copy_steps=1200,
                         copy_share=0.125),
    # The draft learns the target's distributions, not the corpus's: speculation keeps a guess when it is
    # the target's own choice (distillation, as DistillSpec, Zhou et al., 2023).
    "tiny-llama-draft": Preset(hidden=64, layers=2, intermediate=176, heads=4, kv_heads=2, lr=3e-3, copy_steps=1000,
                               copy_share=0.125, teacher="tiny-llama"),
    # Same width and depth as tiny-llama; fewer steps, as a Mamba step costs about 3x on CPU.
    "tiny-mamba": Preset(hidden=256, layers=4, arch="mamba", steps=500),
}
TASKS = ("Rewrite this code:", FIX_PROMPT, "Continue this code:")


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
            if task == FIX_PROMPT:
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


def repeated_spans(n: int, seq: int, vocab: int, rng: random.Random,
                   first: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` rows of synthetic repeats: random tokens (ids `first` and up, past the special tokens) in
    spans of 6 to 40, each followed by itself; labels on each repeat after its first token. Only
    copying predicts them, so they grow the induction heads (Olsson et al., 2022) that copying from a
    prompt needs: the default did not learn to copy from code alone in this machine's budget (README)."""
    rows, labels = [], []
    for _ in range(n):
        ids, lab = [], []
        while len(ids) < seq:
            span = [rng.randrange(first, vocab) for _ in range(rng.randint(6, 40))]
            ids += span + span
            lab += [-100] * (len(span) + 1) + span[1:]
        rows.append(ids[:seq])
        labels.append(lab[:seq])
    return torch.tensor(rows), torch.tensor(labels)


def eval_repeats(seq: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """16 rows of repeats that training never draws (seeded SEED + 1, training SEED)."""
    return repeated_spans(16, seq, vocab, random.Random(SEED + 1))


def batches(stream: torch.Tensor, chats: list[list[int]], preset: Preset, pad: int, vocab: int = 4096,
            seed: int = SEED):
    """Endless (input_ids, labels) batches, seeded: `copy_steps` batches of repeated spans, then stream
    windows, padded chat examples and a `copy_share` of repeated spans."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    for _ in range(preset.copy_steps):
        yield repeated_spans(preset.batch, preset.seq, vocab, rng)
    n_copy = round(preset.batch * preset.copy_share)
    n_chat = round(preset.batch * preset.chat_share)
    while True:
        starts = torch.randint(0, len(stream) - preset.seq, (preset.batch - n_chat - n_copy,), generator=gen)
        rows = [stream[s:s + preset.seq] for s in starts.tolist()]
        labels = [r.clone() for r in rows]
        if n_copy:
            x, y = repeated_spans(n_copy, preset.seq, vocab, rng)
            rows.extend(x)
            labels.extend(y)
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


def distill_loss(model: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """KL(teacher || model) of the next-token distributions, averaged over the labelled positions."""
    mask = y[:, 1:] != -100
    with torch.no_grad():
        target = F.log_softmax(teacher(input_ids=x).logits[:, :-1][mask], dim=-1)
    guess = F.log_softmax(model(input_ids=x).logits[:, :-1][mask], dim=-1)
    return F.kl_div(guess, target, log_target=True, reduction="batchmean")


@torch.no_grad()
def agreement(model: torch.nn.Module, teacher: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Share of labelled positions where both models' greedy next tokens agree (what a draft's guess
    needs to be kept); None without examples."""
    if not len(x):
        return None
    model.eval()
    mask = y[:, 1:] != -100
    guesses, wanted = (logits_of(m, x)[:, :-1].argmax(-1)[mask] for m in (model, teacher))
    return (guesses == wanted).float().mean().item()


def logits_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return mamba.forward(model, x)[0] if model.config.model_type == "mamba" else model(input_ids=x).logits


@torch.no_grad()
def hit_rate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Share of labelled positions where the greedy next token is the label (teacher-forced); None
    without examples (no held-out chat fits a short `seq`)."""
    if not len(x):
        return None
    model.eval()
    predicted, target = logits_of(model, x)[:, :-1].argmax(-1), y[:, 1:]
    mask = target != -100
    return (predicted[mask] == target[mask]).float().mean().item()


def rewrite_examples(tok: PreTrainedTokenizerBase, n: int, seq: int, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out "Rewrite this code" chats (blocks of files no model trained on), labels on the answer:
    the greedy hit rate on them is what prompt lookup's acceptance follows."""
    rows, labels = [], []
    for block in corpus.heldout_blocks(4 * n, seed, max_lines=12):
        user = [{"role": "user", "content": f"Rewrite this code:\n{block}"}]
        prompt = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=True, return_dict=False)
        ids = tok.apply_chat_template(user + [{"role": "assistant", "content": block}], tokenize=True,
                                      return_dict=False)
        if len(ids) > seq or list(ids[:len(prompt)]) != list(prompt):
            continue
        rows.append(list(ids) + [tok.pad_token_id] * (seq - len(ids)))
        labels.append([-100] * len(prompt) + list(ids[len(prompt):]) + [-100] * (seq - len(ids)))
        if len(rows) == n:
            break
    return torch.tensor(rows, dtype=torch.long).view(-1, seq), torch.tensor(labels, dtype=torch.long).view(-1, seq)


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
    steps = (steps or preset.steps) + preset.copy_steps
    metrics = metrics or TrainingMetrics(f"lm:{name}", steps)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(out)
    train_stream, heldout = token_stream(tok, "train"), token_stream(tok, "heldout")
    chats = chat_examples(tok, preset.seq)
    windows = eval_windows(heldout, eval_n, preset.seq)
    repeats = eval_repeats(preset.seq, len(tok))  # progress in the warm-up
    logger.info("%s: %d train tokens, %d held-out tokens, %d chat examples",
                name, len(train_stream), len(heldout), len(chats))

    teacher = None
    if preset.teacher is not None:
        teacher = LlamaForCausalLM.from_pretrained(EMBEDDED_DIR / preset.teacher).eval()
        if teacher.config.vocab_size != len(tok):
            raise ValueError(f"teacher {preset.teacher} has another vocabulary")
    model_class = MambaForCausalLM if preset.arch == "mamba" else LlamaForCausalLM
    model = model_class(model_config(preset, tok))
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=preset.lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, preset.warmup))
    data = batches(train_stream, chats, preset, tok.pad_token_id, vocab=len(tok))
    start, losses = time.perf_counter(), []
    bar = tqdm(range(steps), desc=name, file=sys.stderr)
    for _ in bar:
        began = time.perf_counter()
        model.train()
        x, y = next(data)
        distilled = teacher is not None and bar.n >= preset.copy_steps
        loss = distill_loss(model, teacher, x, y) if distilled else lm_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        metrics.step(losses[-1], time.perf_counter() - began, x.shape[0])
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
        if (bar.n + 1) % 100 == 0 and bar.n < preset.copy_steps:
            logger.info("step %d: repeat hit rate %.3f", bar.n + 1, hit_rate(model, *repeats))
    seconds = time.perf_counter() - start

    model.save_pretrained(out)
    report = {
        "name": name, "parameters": params, "preset": asdict(preset), "steps": steps, "seed": SEED,
        "corpus": corpus.corpus_id(), "train_tokens": len(train_stream), "chat_examples": len(chats),
        "final_train_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "heldout_windows": f"{eval_n} x {preset.seq} tokens",
        **heldout_figures(model, tok, windows, teacher),
        "unigram_ppl": round(unigram_perplexity(train_stream, windows, len(tok)), 2),
        "uniform_ppl": len(tok),
        "train_seconds": round(seconds, 1), "torch": torch.__version__,
        "command": command or f"python -m training.lm --model {name}",
    }
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    metrics.heldout(ppl=report["heldout_ppl"], unigram_ppl=report["unigram_ppl"])
    logger.info("%s", json.dumps(report))
    return report


def heldout_figures(model: torch.nn.Module, tok: PreTrainedTokenizerBase, windows: torch.Tensor,
                    teacher: torch.nn.Module | None = None) -> dict[str, Any]:
    """Perplexity on `windows` of held-out files, and teacher-forced greedy hit rates on held-out
    synthetic repeats and on the answers of held-out "Rewrite this code" chats (what prompt lookup can
    accept; None when no chat fits in a window). With a teacher: how often the model's greedy guess is
    the teacher's on those answers (what draft speculation can accept)."""
    n, seq = windows.shape
    repeats = eval_repeats(seq, len(tok))
    rewrites = rewrite_examples(tok, n, seq)
    rewrite = hit_rate(model, *rewrites)
    figures = {"heldout_ppl": round(perplexity(model, windows), 2),
               "repeat_hit_rate": round(hit_rate(model, *repeats), 4),
               "rewrite_hit_rate": None if rewrite is None else round(rewrite, 4)}
    if teacher is not None:
        agree = agreement(model, teacher, *rewrites)
        figures["teacher_agreement"] = None if agree is None else round(agree, 4)
    return figures


def evaluate(path: Path, eval_n: int = 64, seq: int = 256, teacher: Path | None = None) -> dict[str, Any]:
    """A saved model's held-out figures, as training reports them (agreement with `teacher` too)."""
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(path)
    windows = eval_windows(token_stream(tok, "heldout"), eval_n, seq)
    teacher_model = None if teacher is None else AutoModelForCausalLM.from_pretrained(teacher).eval()
    return heldout_figures(AutoModelForCausalLM.from_pretrained(path), tok, windows, teacher_model)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", choices=sorted(PRESETS))
    which.add_argument("--evaluate", type=Path, metavar="DIR", help="print a saved model's held-out figures")
    parser.add_argument("--teacher", type=Path, metavar="DIR", help="with --evaluate: also the greedy agreement "
                        "with this model (a draft's target)")
    parser.add_argument("--steps", type=int, help="override the preset's step count")
    parser.add_argument("--out", type=Path, help="default: models/embedded/MODEL")
    add_metrics_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(torch.get_num_threads())
    if args.evaluate is not None:
        print(json.dumps({"model": str(args.evaluate), **evaluate(args.evaluate, teacher=args.teacher)}))
        return
    command = "python -m training.lm " + shlex.join(argv if argv is not None else sys.argv[1:])
    preset = PRESETS[args.model]
    planned = (args.steps or preset.steps) + preset.copy_steps
    with TrainingMetrics(f"lm:{args.model}", planned, args.metrics_port) as metrics:
        train(args.model, preset, args.out or EMBEDDED_DIR / args.model, args.steps, command=command, metrics=metrics)


if __name__ == "__main__":
    main()
