"""Structured outputs and log probabilities for the hf engines: what one row of a batch needs per token.

Constrained decoding is llguidance's (the library vLLM uses too): a JSON schema becomes a grammar over
bytes, and before each token the grammar's matcher fills a bitmask of the tokens that keep the answer
valid; the logits of the others are set to -inf before sampling. bench.grammar_libs measured it against
xgrammar on this machine: 56 against 179 microseconds per token on SmolLM2's tokenizer, the same on the
tiny Mamba's. When the grammar is complete the only token left is end-of-sequence.

Log probabilities are taken from the logits the sampler sees before temperature and top_p (after the
grammar's mask), as vLLM's default `raw_logprobs` mode does.
"""

from __future__ import annotations

from typing import Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from models.engine import InvalidRequest, Logprob

# JSON as the answer's text: items and keys separated as json.dumps does, no other whitespace (a model
# sampled at temperature 1 could otherwise spend its tokens on spaces).
JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
SCHEMA = "response_format"  # the request field a schema comes from (the router says `tools` for a tool call's)


class Grammars:
    """The engine's tokenizer as llguidance sees it, and the constraints of requests made from it."""

    def __init__(self, tokenizer: Any, vocab_size: int):
        # n_vocab: the model's logits width (it may pad the tokenizer's vocabulary)
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.vocab_size = vocab_size

    def constraint(self, schema: dict[str, Any]) -> Constraint:
        """A matcher for answers that are JSON valid against `schema`; InvalidRequest naming why the
        schema cannot be compiled."""
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_FORMAT)
            error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
            matcher = None if error else llguidance.LLMatcher(self.tokenizer, grammar)
        except (ValueError, TypeError, RuntimeError) as exc:
            error = str(exc)
        if not error and matcher.is_error():
            error = matcher.get_error()
        if error:
            raise InvalidRequest(f"response_format's JSON schema cannot be used: {error}", SCHEMA)
        return Constraint(matcher, self)

    def token_bytes(self, token: int) -> bytes:
        return self.tokenizer.decode_bytes([token])


class Constraint:
    """One request's grammar state: it has consumed the answer's tokens so far."""

    def __init__(self, matcher: Any, grammars: Grammars):
        self.matcher, self.grammars = matcher, grammars
        self.mask = llguidance.torch.allocate_token_bitmask(1, grammars.vocab_size)

    def consume(self, tokens: list[int]) -> None:
        """Takes tokens that follow the answer so far (sampled under the mask, or a continuation's)."""
        for token in tokens:
            if self.matcher.is_stopped():  # the JSON is complete: end-of-sequence, the one token left, follows
                return
            if not self.matcher.consume_token(token):
                raise InvalidRequest(f"the answer so far does not fit response_format: {self.matcher.get_error()}")

    def consume_text(self, text: str) -> None:
        """Takes text another tokenizer made (a continued stream): this tokenizer's tokens for it."""
        self.consume(self.grammars.tokenizer.tokenize_str(text))

    def apply(self, logits: torch.Tensor) -> None:
        """Sets the logits (1, vocab) of tokens the grammar does not allow next to -inf, in place."""
        llguidance.torch.fill_next_token_bitmask(self.matcher, self.mask, 0)
        llguidance.torch.apply_token_bitmask_inplace(logits, self.mask.to(logits.device))


def logprobs(scores: torch.Tensor, token: int, top: int, token_bytes) -> Logprob:
    """The Logprob of `token` under the logits `scores` (vocab,), with the `top` likeliest tokens (those
    the mask ruled out never among them); `token_bytes(id)` gives a token's bytes."""
    logp = torch.log_softmax(scores.float(), dim=-1)
    alternatives = []
    if top:
        values, ids = torch.topk(logp, top)
        alternatives = [entry(i, v, token_bytes) for i, v in zip(ids.tolist(), values.tolist()) if v > float("-inf")]
    chosen = entry(token, logp[token].item(), token_bytes)
    chosen.top = alternatives
    return chosen


def entry(token: int, value: float, token_bytes) -> Logprob:
    """A token's Logprob without alternatives: its text (bytes that are part of a character shown as
    U+FFFD), value and bytes."""
    raw = token_bytes(token)
    return Logprob(raw.decode("utf-8", errors="replace"), value, list(raw))

