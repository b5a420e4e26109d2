"""Speculative decoding of one sequence: a proposer guesses up to k tokens, the model checks them all
in one forward from its cache, the longest agreeing prefix is kept plus the model's own next token,
and the cache is cut back to what was kept. For Mamba the "cache" is the recurrent state:
models.mamba checks the k guesses in one forward from the state and keeps the state after every
position, and the rollback picks the state after the last kept token (no second forward).

Greedy: a guess is kept when it equals the model's argmax, so the output is the model's greedy
output, token for token. Sampling: at every checked position a token is drawn from the model's
distribution (temperature, top_p) and a guess is kept when it equals the draw, so every kept token
is a draw from the model itself (exact, though a seed gives other draws than plain sampling).

Proposers: `PromptLookup` (the continuation of the latest earlier occurrence of the last n-gram,
vLLM's and transformers' "n-gram" method) and `DraftModel` (a small model with its own cache,
greedy). Why this loop and not transformers' assisted generation: transformers calls the draft's
whole `generate()` every round, whose set-up costs more than the tiny draft's forwards on CPU
(bench.speculative measures both paths), and it refuses stateful models, which this loop admits
through the state rollback above (transformers refuses assisted generation for Mamba).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache

from models import lean_llama, mamba


class Proposer(Protocol):
    def propose(self, tokens: list[int]) -> list[int]:
        """Up to k guesses of the tokens after `tokens` (prompt and output so far)."""

    def keep(self, n: int) -> None:
        """Only the first `n` tokens of the sequence stand (the rest of the last guesses were refused)."""


class PromptLookup:
    """Guesses by copying: finds the latest earlier occurrence of the sequence's last `n` tokens
    (n from max_ngram down to 1) and proposes the k tokens that followed it."""

    def __init__(self, k: int, max_ngram: int = 3):
        self.k, self.max_ngram = k, max_ngram

    def propose(self, tokens: list[int]) -> list[int]:
        seq = torch.tensor(tokens)
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            windows = seq[:-1].unfold(0, n, 1)  # (len - n, n): every earlier n-gram
            hits = (windows == seq[-n:]).all(dim=1).nonzero()
            if len(hits):
                start = int(hits[-1]) + n
                return tokens[start:start + self.k]
        return []

    def keep(self, n: int) -> None:
        pass


class DraftModel:
    """Guesses with a small causal LM sharing the tokenizer, greedily, from its own KV cache of
    `max_len` positions, through models.lean_llama's forward where it covers the draft (2.5x cheaper
    than transformers' for the embedded draft) and transformers' otherwise. An engine passes the
    draft's `lean` forward, made once; without it one is made here."""

    def __init__(self, model: torch.nn.Module, k: int, max_len: int, lean: lean_llama.LeanLlama | None = None):
        self.model, self.k = model, k
        if lean is None and lean_llama.supports(model):
            lean = lean_llama.LeanLlama(model)
        self.lean = lean
        self.cache = lean.cache(max_len) if lean else DynamicCache(config=model.config)
        self.seen = 0  # tokens of the sequence in the draft's cache

    def _next(self, ids: list[int]) -> int:
        if self.lean is not None:
            logits = self.lean.forward(self.cache, ids)
        else:
            x = torch.tensor([ids], device=self.model.device)
            logits = self.model(input_ids=x, cache=self.cache, use_cache=True, logits_to_keep=1).logits[0, -1]
        self.seen += len(ids)
        return int(logits.argmax())

    def propose(self, tokens: list[int]) -> list[int]:
        guesses = [self._next(tokens[self.seen:])]
        while len(guesses) < self.k:
            guesses.append(self._next(guesses[-1:]))
        return guesses

    def keep(self, n: int) -> None:
        if self.seen > n:
            self.cache.crop(n if self.lean is not None else n - self.seen)
            self.seen = n


class _KV:
    """An attention model's KV cache: refused guesses are cropped off."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.cache = model, DynamicCache(config=model.config)

    def forward(self, ids: list[int], last_only: bool = False) -> torch.Tensor:
        x = torch.tensor([ids], device=self.model.device)
        return self.model(input_ids=x, cache=self.cache, use_cache=True, logits_to_keep=int(last_only)).logits[0]

    def rollback(self, refused: int) -> None:
        if refused:
            self.cache.crop(-refused)


class _SSM:
    """A Mamba model's recurrent state: the prompt goes through transformers' own forward (the fused
    kernels where installed), whose cached conv and SSM states seed models.mamba's state; each check
    keeps the state after every position and the rollback takes the one after the last kept token."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.state, self.states = model, None, []

    def forward(self, ids: list[int], last_only: bool = False) -> torch.Tensor:
        x = torch.tensor([ids], device=self.model.device)
        if last_only:  # the prompt: no rollback within it
            out = self.model(input_ids=x, use_cache=True, logits_to_keep=1)
            self.state = mamba.state_from_cache(self.model, out.cache)
            self.states = [self.state]
            return out.logits[0]
        logits, self.states = mamba.forward(self.model, x, self.state, keep=True)
        return logits[0]

    def rollback(self, refused: int) -> None:
        self.state = self.states[-1 - refused]


# The model types this loop was written and tested for (tests/unit/test_speculative.py, test_mamba.py),
# read from the config's public `model_type`: Mamba-1 through the state rollback above, and Llama,
# whose whole cache is a KV cache that cropping rolls back. Other stateful models (Mamba-2, hybrids,
# RWKV) are refused, and so is any type not tested here.
SPECULATES = frozenset({"mamba", "llama"})


def supports(model: torch.nn.Module) -> bool:
    """Whether this loop can speculate for the model: a type in SPECULATES."""
    return model.config.model_type in SPECULATES


@dataclass
class Stats:
    rounds: int = 0  # verification forwards
    proposed: int = 0  # guessed tokens checked
    accepted: int = 0  # guessed tokens kept


Pick = Callable[[torch.Tensor], torch.Tensor]  # logits (n, vocab) -> tokens (n,)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def sampler(temperature: float, top_p: float, generator: torch.Generator | None = None) -> Pick:
    """Draws one token per row from softmax(logits / temperature) cut to the top_p nucleus."""

    def pick(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            outside = sorted_p.cumsum(dim=-1) - sorted_p > top_p  # the first token always stays
            probs = probs.scatter(-1, order, sorted_p.masked_fill(outside, 0.0))
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    return pick


@torch.inference_mode()
def generate(model: torch.nn.Module, prompt: list[int], proposer: Proposer, pick: Pick,
             emit: Callable[[list[int]], bool], max_new_tokens: int, stats: Stats | None = None) -> None:
    """Decodes after `prompt`, handing each round's kept tokens to `emit` until it returns True
    (eos, max_tokens, a stop string, cancellation: the caller decides) or max_new_tokens are made."""
    stats = stats if stats is not None else Stats()
    if not supports(model):
        raise ValueError(f"speculative decoding is not available for {model.config.model_type} models")
    target = _SSM(model) if model.config.model_type == "mamba" else _KV(model)
    logits = target.forward(prompt, last_only=True)
    tokens = prompt + [int(pick(logits)[-1])]
    made = 1
    if emit(tokens[-1:]) or made >= max_new_tokens:
        return
    while True:
        guesses = proposer.propose(tokens)[: max(0, max_new_tokens - made - 1)]
        logits = target.forward(tokens[-1:] + guesses)  # the cache holds all but the last token
        picked = pick(logits).tolist()
        n = 0
        while n < len(guesses) and guesses[n] == picked[n]:
            n += 1
        kept = guesses[:n] + [picked[n]]
        target.rollback(len(guesses) - n)  # drop the refused guesses
        tokens += kept
        proposer.keep(len(tokens) - 1)
        stats.rounds += 1
        stats.proposed += len(guesses)
        stats.accepted += n
        made += len(kept)
        if emit(kept) or made >= max_new_tokens:
            return
