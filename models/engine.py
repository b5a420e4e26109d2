"""The text engine interface every LM backend implements (hf now; vLLM in its own module).

The request and result types cross the Ray boundary between router and backend, so they are
plain dataclasses with no torch in them.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class Continuation:
    """The part of an answer another engine already streamed, for a stream the router moves here
    when its first engine fails half-way. The router sends the request again with this and
    max_tokens reduced to what is left of the budget."""

    text: str  # what the client has received
    token_ids: list[int] = field(default_factory=list)  # the tokens the previous engine streamed (may be empty)
    tokenizer: str | None = None  # tokenizer_fingerprint() of the tokenizer that made token_ids


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
    # Continue an answer another engine started: the engine streams only the text that follows it.
    continuation: Continuation | None = None
    # Log probabilities: None for none; k for each token's with the k likeliest alternatives (0 to 20).
    logprobs: int | None = None
    # Structured output: the answer is JSON valid against this schema ({"type": "object"}: any object),
    # by constrained decoding; a schema the engine cannot compile is InvalidRequest.
    json_schema: dict[str, Any] | None = None
    # Chat: the functions the answer may call ({"type": "function", "function": {...}}), for the chat template
    # (a template without a tool format leaves them out).
    tools: list[dict[str, Any]] | None = None

    def __post_init__(self):
        # As vLLM does: a temperature this close to 0 is greedy decoding. Dividing logits by it
        # overflows to inf and NaN probabilities (a fuzzed 1e-300 crashed both engines).
        if self.temperature < SAMPLING_EPS:
            self.temperature = 0.0


SAMPLING_EPS = 1e-5

FinishReason = Literal["stop", "length", "abort"]


@dataclass
class Logprob:
    """A generated token's log probability, in OpenAI's terms: its text, value and UTF-8 bytes (a token
    may hold part of a character), and the likeliest alternatives at its position."""

    token: str
    logprob: float
    bytes: list[int]
    top: list[Logprob] = field(default_factory=list)


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    truncated_tokens: int = 0  # prompt tokens cut from the middle (GenerationRequest.truncate)
    logprobs: list[Logprob] | None = None  # one per completion token, when the request asked


@dataclass
class Delta:
    """One streamed piece; the last one has `finish_reason` and the completion tokens."""

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0  # on every piece: the router reports the first engine's count after a migration
    completion_tokens: int = 0
    truncated_tokens: int = 0  # on every piece, so the router knows from the first one
    # The tokens generated since the previous piece: a stream's pieces together carry all its tokens.
    token_ids: list[int] = field(default_factory=list)
    tokenizer: str | None = None  # tokenizer_fingerprint() of the engine's tokenizer, on every piece
    logprobs: list[Logprob] | None = None  # one per token of token_ids, when the request asked


def render_documents(documents: list[tuple[str, int | None]]) -> str:
    """The request's documents as prompt text, each page marked."""
    return "\n\n".join(f"[page {page}]\n{text}" if page is not None else text for text, page in documents)


def prompt_text(request: GenerationRequest, tokenizer: Any) -> str:
    """The text every engine tokenizes: the chat template applied to the messages (documents as a
    system turn first), or the documents then the prompt. A continuation's text ends it: as the
    assistant's unfinished turn (chat), or after the prompt."""
    docs = render_documents(request.documents)
    cont = request.continuation
    if request.messages is not None:
        messages = ([{"role": "system", "content": docs}] if docs else []) + request.messages
        tools = {"tools": request.tools} if request.tools else {}
        if cont is None:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **tools)
        return tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": cont.text}],
                                             tokenize=False, continue_final_message=True, **tools)
    text = f"{docs}\n\n{request.prompt}" if docs else (request.prompt or "")
    return text if cont is None else text + cont.text


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """16 hex digits that are equal for tokenizers whose token ids mean the same tokens: a digest of
    the vocabulary (added tokens included) and the special tokens, which decoding skips. Only public
    methods that HF tokenizers and vLLM's tokenizer wrappers both have."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    blob = json.dumps({"vocab": vocab, "special": sorted(tokenizer.all_special_tokens)}, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def first_stop(text: str, stops: list[str]) -> int | None:
    """Where the first of `stops` starts in `text`; None when none occurs."""
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    return min(hits) if hits else None


class InvalidRequest(ValueError):
    """The request is at fault (too long, unknown adapter...): the router answers 400, no fallback.
    `param`: the request field at fault, when one is."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


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


@dataclass
class Prompt:
    """A request's prompt as the ids an engine prefills, and how its answer's text is made.

    The answer so far is `text + decode(answer_ids + new tokens)`; the client already has its first
    `sent` characters. Without a continuation all three are empty. A continuation whose token ids
    this engine can take ends `ids` with them, so they are `answer_ids` (decoded again with the new
    tokens, which also gives back what the previous engine held back); otherwise its text ends the
    prompt text and is `text`.
    """

    ids: list[int]
    cut: int = 0  # prompt tokens cut to fit (GenerationRequest.truncate)
    answer_ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0

    def answer(self, decode: Callable[[list[int]], str], tokens: list[int]) -> str:
        """The whole answer with this engine's `tokens` so far."""
        return self.text + decode(self.answer_ids + tokens)

    def tail(self, decode: Callable[[list[int]], str], tokens: list[int], n: int = 64) -> str:
        """The answer's end, where a stop string that the last token completed lies: the last `n`
        tokens' text, or the whole answer while there are fewer."""
        return decode(tokens[-n:]) if len(tokens) >= n else self.answer(decode, tokens)


def prompt_ids(request: GenerationRequest, tokenizer: Any, fingerprint: str, max_context: int | None) -> Prompt:
    """The request's Prompt for an engine whose tokenizer has `fingerprint`. A continuation made by
    a tokenizer with the same fingerprint appends its token ids as they are, not its text tokenized
    again, so a greedy continuation is the answer the first engine would have given."""
    cont = request.continuation
    if cont is not None and cont.token_ids and cont.tokenizer == fingerprint:
        text = prompt_text(dataclasses.replace(request, continuation=None), tokenizer)
        ids, cut = fit_prompt(tokenizer.encode(text, add_special_tokens=False) + list(cont.token_ids), request,
                              max_context)
        return Prompt(ids, cut, answer_ids=list(cont.token_ids), sent=len(cont.text))
    ids, cut = fit_prompt(tokenizer.encode(prompt_text(request, tokenizer), add_special_tokens=False), request,
                          max_context)
    if cont is None:
        return Prompt(ids, cut)
    return Prompt(ids, cut, text=cont.text, sent=len(cont.text))


class Answer:
    """A streamed answer's text as its tokens come: what can be sent after what the client has,
    holding back what may still change (a stop string forming, an incomplete character). Stop strings
    are looked for in the whole answer, so one may span a continuation's boundary."""

    def __init__(self, request: GenerationRequest, prompt: Prompt, decode: Callable[[list[int]], str]):
        self.prompt, self.stops, self.decode = prompt, request.stop, decode
        self.hold = max((len(s) for s in request.stop), default=1) - 1  # characters a stop string may still take
        self.tokens: list[int] = []  # this engine's
        self.sent = prompt.sent  # characters of the answer the client has
        self.stopped = False  # the answer holds a stop string: it ends there
        self._text = prompt.answer(decode, [])

    def add(self, tokens: list[int]) -> str:
        """Takes new tokens; returns the text that can be sent now ("" if none, or once stopped)."""
        self.tokens += tokens
        self._text = self.prompt.answer(self.decode, self.tokens)
        if first_stop(self._text, self.stops) is not None:
            self.stopped = True
            return ""
        # an incomplete multi-byte character decodes as U+FFFD: not sent, nor counted in the hold-back
        safe = len(self._text.rstrip("\ufffd")) - self.hold
        if safe <= self.sent:
            return ""
        piece, self.sent = self._text[self.sent:safe], safe
        return piece

    def rest(self) -> str:
        """The text not sent yet, up to the first stop string; for the answer's last piece."""
        cut = first_stop(self._text, self.stops)
        end = len(self._text) if cut is None else cut
        piece = self._text[self.sent:end]
        self.sent = max(self.sent, end)
        return piece


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

    @abc.abstractmethod
    def close(self) -> None:
        """Stops the engine's workers (threads, child processes); a process that ends without it may hang."""
