"""HTTP request bodies and response shapes (OpenAI's where OpenAI has one)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from routing.config import Task
from routing.features import Document


class Body(BaseModel):
    # A field this server does not know is a 400 naming it (deployments.http.describe): a parameter the
    # client relies on never vanishes. docs/api.md lists what is taken, refused and accepted as a no-op.
    model_config = ConfigDict(extra="forbid")


NOT_IMPLEMENTED = "not implemented by this server (docs/api.md lists the parameters it takes)"


# OpenAI's parameters this server does not implement, with the values that turn them off: those are
# accepted, any other is a 400 naming the parameter.
NEUTRAL: dict[str, tuple] = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},), "logprobs": (False,),
    "top_logprobs": (), "tools": ([],), "tool_choice": ("none",), "modalities": (["text"],), "functions": ([],),
    "function_call": ("none",), "audio": (), "prediction": (), "reasoning_effort": (), "verbosity": (),
    "web_search_options": (), "best_of": (1,), "suffix": (), "response_format": ({"type": "text"},),
}


def _off(value: Any, info: ValidationInfo) -> Any:
    """Unset, or the value that turns the parameter off (of its own type: True is not 1)."""
    if value is not None and not any(type(value) is type(n) and value == n for n in NEUTRAL[info.field_name]):
        raise ValueError(NOT_IMPLEMENTED)
    return value


class DocumentIn(Body):
    text: str
    page: int | None = Field(None, ge=0)


class TextPart(Body):
    type: Literal["text"]
    text: str


class ImageURL(Body):
    url: str
    detail: Literal["auto", "low", "high"] = Field(
        "auto", description="Accepted; the classifier reads every image at its own resolution.")


class ImagePart(Body):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[Part] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "\n".join(p.text for p in self.content if isinstance(p, TextPart))

    def has_image(self) -> bool:
        return isinstance(self.content, list) and any(isinstance(p, ImagePart) for p in self.content)


class StreamOptions(Body):
    include_usage: bool = False


class _Generation(Body):
    model: str = Field("auto", min_length=1, description="`auto`, a backend name, or `backend:adapter`.")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: Literal[1] = Field(1, description="Switchyard returns one choice.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, validate_default=True, description="Up to 4 stop strings.")
    seed: int | None = None
    task: Task | None = Field(None, description="Explicit task; otherwise inferred.")
    documents: list[DocumentIn] = Field(default_factory=list, description="Text with page numbers.")
    ignore_eos: bool = Field(False, description="Generate max_tokens even past end-of-sequence (as vLLM).")
    speculation: Literal["none", "prompt_lookup", "draft"] | None = Field(
        None, description="Speculative decoding for this request; the backend's configured default if unset."
    )
    # OpenAI's parameters that do not change the answer: accepted.
    user: str | None = Field(None, description="Accepted; not stored.")
    metadata: dict[str, str] | None = Field(None, description="Accepted; not stored.")
    store: bool | None = Field(None, description="Accepted; nothing is stored.")
    service_tier: str | None = Field(None, description="Accepted; one tier.")
    # OpenAI's parameters this server does not implement: a 400 unless at the value that turns them off.
    frequency_penalty: float | None = Field(None, description="Not implemented: 0 or unset only.")
    presence_penalty: float | None = Field(None, description="Not implemented: 0 or unset only.")
    logit_bias: dict[str, float] | None = Field(None, description="Not implemented: empty or unset only.")

    _neutral = field_validator("frequency_penalty", "presence_penalty", "logit_bias")(_off)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    def docs(self) -> list[Document]:
        return [Document(d.text, d.page) for d in self.documents]


class ChatCompletionRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    parallel_tool_calls: bool | None = Field(None, description="Accepted; no tools are taken.")
    # not implemented yet (issue 23): refused unless off
    logprobs: bool | None = Field(None, description="Not implemented: false or unset only.")
    top_logprobs: int | None = Field(None, description="Not implemented: unset only.")
    response_format: dict[str, Any] | None = Field(None, description='Not implemented: {"type": "text"} only.')
    tools: list[dict[str, Any]] | None = Field(None, description="Not implemented: empty or unset only.")
    tool_choice: str | dict[str, Any] | None = Field(None, description='Not implemented: "none" or unset only.')
    modalities: list[str] | None = Field(None, description='["text"] or unset only.')
    functions: list[dict[str, Any]] | None = Field(None, description="Not implemented (deprecated by OpenAI).")
    function_call: str | dict[str, Any] | None = Field(None, description="Not implemented (deprecated by OpenAI).")
    audio: dict[str, Any] | None = Field(None, description="Not implemented.")
    prediction: dict[str, Any] | None = Field(None, description="Not implemented.")
    reasoning_effort: str | None = Field(None, description="Not implemented.")
    verbosity: str | None = Field(None, description="Not implemented.")
    web_search_options: dict[str, Any] | None = Field(None, description="Not implemented.")

    _chat_neutral = field_validator("logprobs", "top_logprobs", "tools", "tool_choice", "modalities", "functions",
                                    "function_call", "audio", "prediction", "reasoning_effort", "verbosity",
                                    "web_search_options", "response_format")(_off)

    def new_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class CompletionRequest(_Generation):
    prompt: str
    echo: Literal[False] = False
    # not implemented: refused unless off
    logprobs: int | None = Field(None, description="Not implemented yet: unset only.")
    best_of: int | None = Field(None, description="Not implemented: 1 or unset only.")
    suffix: str | None = Field(None, description="Not implemented: unset only.")

    _completion_neutral = field_validator("best_of", "suffix", "logprobs")(_off)

    def new_tokens(self, default: int) -> int:
        return self.max_tokens or default


Grid = Annotated[
    list[Annotated[list[Annotated[int, Field(ge=0, le=9)]], Field(min_length=9, max_length=9)]],
    Field(min_length=9, max_length=9, description="9 rows of 9 integers, 0 = blank."),
]


class RefineRequest(Body):
    task: Literal["sudoku", "code_repair"] = "sudoku"
    grid: Grid | None = Field(None, description="sudoku: the puzzle.")
    code: str | None = Field(None, min_length=1, max_length=65536, description=(
        "code_repair: Python source with syntax errors. trm takes up to 64 lines of 47 tokens; "
        "a language model takes what trm cannot, or repairs what trm's answer left unparseable."))
    model: str = Field("auto", min_length=1)
    max_steps: int | None = Field(None, ge=1, description="Supervision steps at most; the backend's default if unset.")
    halt_threshold: float | None = Field(None, gt=0, le=1, description="Halting probability that stops refinement.")

    @model_validator(mode="after")
    def _input(self) -> RefineRequest:
        given, other = ("grid", "code") if self.task == "sudoku" else ("code", "grid")
        if getattr(self, given) is None:
            raise ValueError(f"task {self.task} needs `{given}`")
        if getattr(self, other) is not None:
            raise ValueError(f"task {self.task} takes `{given}`, not `{other}`")
        return self


class ClassifyRequest(Body):
    image: str = Field(min_length=1, description="Base64 PNG or JPEG, or a data: URI.")
    model: str = Field("auto", min_length=1)


def openai_error(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


# --- response shapes -------------------------------------------------------------------


def model_card(id_: str, created: int, switchyard: dict[str, Any], parent: str | None = None) -> dict[str, Any]:
    """An OpenAI model object, with Switchyard's own details under `switchyard`."""
    card = {"id": id_, "object": "model", "created": created, "owned_by": "switchyard"}
    return card | ({"parent": parent} if parent else {}) | {"switchyard": switchyard}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(text: str, finish_reason: str, tokens: tuple[int, int], chat: bool, model: str,
                    switchyard: dict[str, Any]) -> dict[str, Any]:
    """A chat.completion or text_completion object."""
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                  "logprobs": None}
        return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": model,
                "choices": [choice], "usage": usage(*tokens), "switchyard": switchyard}
    choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
    return {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": model,
            "choices": [choice], "usage": usage(*tokens), "switchyard": switchyard}


class Chunks:
    """Server-sent events of one streamed completion, in OpenAI's chunk shape."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id, self.created = new_id("chatcmpl" if chat else "cmpl"), now()
        self.object = "chat.completion.chunk" if chat else "text_completion"

    def event(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        return "data: " + json.dumps({"id": self.id, "object": self.object, "created": self.created,
                                      "model": self.model, "choices": choices, **extra}) + "\n\n"

    def piece(self, text: str | None, finish: str | None = None, role: bool = False, **extra: Any) -> str:
        if self.chat:
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return self.event([choice], **extra)

    def usage(self, prompt_tokens: int, completion_tokens: int) -> str:
        return self.event([], usage=usage(prompt_tokens, completion_tokens))

    @staticmethod
    def error(message: str, type_: str) -> str:
        return "data: " + json.dumps(openai_error(message, type_)) + "\n\n"

    DONE = "data: [DONE]\n\n"
