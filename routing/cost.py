"""Predicted latency of a text request on a backend, from its measured cost curves.

A backend's `cost` in the config holds two polynomials in the context length (tokens), fitted by
`python -m bench.long_context --write` on the machine that serves: prefill seconds for a prompt of L
tokens, and decode milliseconds per token at context L. A transformer's decode grows with L (it
reads the whole KV cache every token); a Mamba's stays flat (its state has a fixed size). The
router predicts prefill(L) + the decode of N tokens over contexts L..L+N, and scales that by the
backend's current load.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


def _poly(coefficients: list[float], x: float) -> float:
    return sum(c * x**i for i, c in enumerate(coefficients))


class CostModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    prefill_s: list[float] = Field(
        min_length=1, max_length=3, description="Prefill seconds: c0 + c1 L + c2 L^2 for a prompt of L tokens."
    )
    decode_ms: list[float] = Field(
        min_length=1, max_length=2, description="Milliseconds per new token at context L: d0 + d1 L."
    )
    measured: str = Field("", description="Where and how the curves were measured (bench command, machine, date).")

    def predict_s(self, prompt_tokens: int, new_tokens: int) -> float:
        """Seconds for prefill then `new_tokens` decode steps. The decode curve is at most linear,
        so the mean cost over contexts L..L+N is its value at the midpoint."""
        prefill = max(0.0, _poly(self.prefill_s, prompt_tokens))
        per_token_ms = max(0.0, _poly(self.decode_ms, prompt_tokens + new_tokens / 2))
        return prefill + new_tokens * per_token_ms / 1000


def load_factor(busy: float) -> float:
    """Latency multiplier for a backend whose share `busy` of its capacity is in use: a request
    shares the engine's batches (or waits for them) with the ones in flight."""
    return 1.0 + busy
