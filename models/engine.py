"""The text engine interface every LM backend implements (hf now; vLLM in its own module).

The request and result types cross the Ray boundary between router and backend, so they are
plain dataclasses with no torch in them.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class GenerationRequest:
    request_id: str
    prompt: str | None = None  # completions
    messages: list[dict[str, str]] | None = None  # chat: [{"role", "content"}], content as plain text
    documents: list[tuple[str, int | None]] = field(default_factory=list)  # (text, page)
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    adapter: str | None = None
    # Speculative decoding for this request: None takes the engine's configured default;
    # "none", "prompt_lookup" or "draft" ask for one (InvalidRequest when the engine lacks it).
    speculation: str | None = None
    ignore_eos: bool = False  # generate max_tokens whatever the model says (vLLM's option; benchmarks)
    # A prompt longer than the context is cut to its head and tail instead of refused (the router's
    # degraded fallback to a backend with a shorter context).
    truncate: bool = False

    def __post_init__(self):
        # As vLLM does: a temperature this close to 0 is greedy decoding. Dividing logits by it
        # overflows to inf and NaN probabilities (a fuzzed 1e-300 crashed both engines).
        if self.temperature < SAMPLING_EPS:
            self.temperature = 0.0


SAMPLING_EPS = 1e-5

FinishReason = Literal["stop", "length", "abort"]


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    truncated_tokens: int = 0  # prompt tokens cut from the middle (GenerationRequest.truncate)


@dataclass
class Delta:
    """One streamed piece; the last one has `finish_reason` and the token counts."""

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    truncated_tokens: int = 0  # on every piece, so the router knows from the first one


def render_documents(documents: list[tuple[str, int | None]]) -> str:
    """The request's documents as prompt text, each page marked."""
    return "\n\n".join(f"[page {page}]\n{text}" if page is not None else text for text, page in documents)


def prompt_text(request: GenerationRequest, tokenizer: Any) -> str:
    """The text every engine tokenizes: the chat template applied to the messages (documents as a
    system turn first), or the documents then the prompt."""
    docs = render_documents(request.documents)
    if request.messages is not None:
        messages = ([{"role": "system", "content": docs}] if docs else []) + request.messages
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{docs}\n\n{request.prompt}" if docs else (request.prompt or "")


class InvalidRequest(ValueError):
    """The request is at fault (too long, unknown adapter...): the router answers 400, no fallback."""


class Unsupported(ValueError):
    """A valid request this backend cannot take (code too big for the TRM's grid): the router tries
    the next candidate, and answers 400 when none takes it."""


def fit_prompt(ids: list[int], request: GenerationRequest, max_context: int | None) -> tuple[list[int], int]:
    """(prompt ids, tokens cut): `ids` when prompt plus max_tokens fit `max_context`; otherwise, with
    `request.truncate`, the first and last halves of what fits (the instructions and documents'
    start, the question and the generation prompt at the end), else InvalidRequest. No ids at all
    is InvalidRequest too."""
    if not ids:  # an empty prompt would fail inside the model, which the router would count against it
        raise InvalidRequest("the prompt is empty: there are no tokens to continue from")
    budget = None if max_context is None else max_context - request.max_tokens
    if budget is None or len(ids) <= budget:
        return ids, 0
    if not request.truncate or budget < 2:
        raise InvalidRequest(f"prompt of {len(ids)} tokens plus max_tokens {request.max_tokens} exceeds "
                             f"this model's context of {max_context} tokens")
    head = budget // 2
    return ids[:head] + ids[len(ids) - (budget - head):], len(ids) - budget


class Engine(abc.ABC):
    """start, generate, stream, check_health. `check_health` raises so Serve restarts the replica.

    Constructed as `Engine(model=, device=, dtype=, max_context=, adapters=, **engine_kwargs)`, where
    `adapters` maps adapter names to peft checkpoint paths and `engine_kwargs` is the backend's
    `engine_kwargs` from the config (an unknown key is an error at construction, naming it).
    """

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def generate(self, request: GenerationRequest) -> Completion: ...

    @abc.abstractmethod
    def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]: ...

    @abc.abstractmethod
    async def check_health(self) -> None: ...

    @abc.abstractmethod
    def info(self) -> dict[str, Any]:
        """Engine, device, kernel path, model, context length, adapters: shown in /v1/models."""
