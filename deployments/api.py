"""HTTP request bodies and response shapes (OpenAI's where OpenAI has one)."""

from __future__ import annotations

import json
import math
import time
import uuid
from itertools import accumulate
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from models.engine import Logprob
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
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},), "modalities": (["text"],),
    "functions": ([],), "function_call": ("none",), "audio": (), "prediction": (), "reasoning_effort": (),
    "verbosity": (), "web_search_options": (), "best_of": (1,), "suffix": (),
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


class FunctionCall(Body):
    name: str
    arguments: str = Field(description="The arguments as JSON text.")


class ToolCall(Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[Part] | None = None
    name: str | None = Field(None, description="Accepted; not shown to the model.")
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant's earlier tool calls.")
    tool_call_id: str | None = Field(None, description="Which call a tool message answers.")

    @model_validator(mode="after")
    def _tool_fields(self) -> Message:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls belong to assistant messages")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a tool message needs tool_call_id, and only a tool message takes one")
        return self

    def text(self) -> str:
        """The content as the model reads it; an assistant's tool calls as their JSON."""
        if self.tool_calls:
            return json.dumps([{"name": c.function.name, "arguments": c.function.arguments} for c in self.tool_calls])
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "\n".join(p.text for p in self.content if isinstance(p, TextPart))

    def has_image(self) -> bool:
        return isinstance(self.content, list) and any(isinstance(p, ImagePart) for p in self.content)


class StreamOptions(Body):
    include_usage: bool = False


class TextFormat(Body):
    type: Literal["text"]


class JsonObjectFormat(Body):
    type: Literal["json_object"]


class JsonSchema(Body):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = Field(None, description="Either way the answer follows the schema (constrained decoding).")


class JsonSchemaFormat(Body):
    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class Function(Body):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})
    strict: bool | None = Field(None, description="Either way the arguments follow `parameters`.")


class Tool(Body):
    type: Literal["function"]
    function: Function


class NamedFunction(Body):
    name: str


class NamedToolChoice(Body):
    type: Literal["function"]
    function: NamedFunction


class _Generation(Body):
    model: str = Field("auto", min_length=1, description="`auto`, a backend name, or `backend:adapter`.")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: Literal[1] = Field(1, description="Switchyard returns one choice.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, validate_default=True, description="Up to 4 stop strings.")
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1, description="A 64-bit integer, signed or not.")
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

    def outputs(self) -> frozenset[str]:
        """What the answer must carry (routing.config.Output): backends that cannot give it are no candidates."""
        return frozenset(["logprobs"] * (self.logprobs_k() is not None) + ["structured"] * (self.json_schema() is not None))

    def logprobs_k(self) -> int | None:
        """Alternatives per token when logprobs are asked for (0 for the chosen token's alone), else None."""
        return None

    def json_schema(self) -> dict[str, Any] | None:
        """The schema the answer is constrained to; None for text (completions always)."""
        return None


class ChatCompletionRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(False, description="Each answer token's log probability.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="With logprobs: the likeliest alternatives.")
    response_format: ResponseFormat | None = Field(None, description="text, json_object or json_schema.")
    tools: list[Tool] | None = Field(None, description="Functions the model may call.")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="'required' or a named function: the answer is a call, its arguments following the "
        "function's parameters; 'auto' needs a tool-call parser, which no backend has (a 400).")
    parallel_tool_calls: bool | None = Field(None, description="false: one call at most with tool_choice "
                                             "'required'.")
    modalities: list[str] | None = Field(None, description='["text"] or unset only.')
    functions: list[dict[str, Any]] | None = Field(None, description="Not implemented (deprecated by OpenAI).")
    function_call: str | dict[str, Any] | None = Field(None, description="Not implemented (deprecated by OpenAI).")
    audio: dict[str, Any] | None = Field(None, description="Not implemented.")
    prediction: dict[str, Any] | None = Field(None, description="Not implemented.")
    reasoning_effort: str | None = Field(None, description="Not implemented.")
    verbosity: str | None = Field(None, description="Not implemented.")
    web_search_options: dict[str, Any] | None = Field(None, description="Not implemented.")

    _chat_neutral = field_validator("modalities", "functions", "function_call", "audio", "prediction",
                                    "reasoning_effort", "verbosity", "web_search_options")(_off)

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    @field_validator("tools")
    @classmethod
    def _distinct_names(cls, tools: list[Tool] | None) -> list[Tool] | None:
        names = [t.function.name for t in tools or []]
        if len(set(names)) < len(names):
            raise ValueError("two functions have the same name")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _choice_of_tools(cls, choice: Any, info: ValidationInfo) -> Any:
        names = [t.function.name for t in info.data.get("tools") or []]
        if choice in (None, "none"):
            return choice
        if not names:
            raise ValueError("a tool_choice other than 'none' needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"names function {choice.function.name!r}, which is not in tools")
        fmt = info.data.get("response_format")
        if choice != "auto" and fmt is not None and fmt.type != "text":
            raise ValueError("a tool call's arguments are JSON already: use tools or response_format, not both")
        return choice

    def new_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default

    def calls_tools(self) -> bool:
        """The answer must be a tool call: tools given and tool_choice 'required' or a named function.
        ('auto', also the default with tools, needs a parser: the router refuses it.)"""
        return bool(self.tools) and self.tool_choice not in (None, "none", "auto")

    def auto_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice in (None, "auto")

    def json_schema(self) -> dict[str, Any] | None:
        """The schema the answer is constrained to: response_format's, or the tool call's; None for text."""
        if self.calls_tools():
            tools = {t.function.name: t.function for t in self.tools or []}
            if isinstance(self.tool_choice, NamedToolChoice):  # the answer is the arguments
                return tools[self.tool_choice.function.name].parameters
            call = [{"type": "object", "properties": {"name": {"const": name}, "arguments": f.parameters},
                     "required": ["name", "arguments"], "additionalProperties": False} for name, f in tools.items()]
            return {"type": "array", "items": {"anyOf": call}, "minItems": 1,
                    **({"maxItems": 1} if self.parallel_tool_calls is False else {})}
        if self.response_format is None or self.response_format.type == "text":
            return None
        if self.response_format.type == "json_object":
            return {"type": "object"}
        return self.response_format.json_schema.schema_

    def tool_calls(self, text: str, complete: bool) -> list[dict[str, Any]] | None:
        """The tool calls an answer constrained by json_schema() holds, in OpenAI's shape. An answer cut
        short (max_tokens) of a named function is its call with the arguments so far, as OpenAI and vLLM
        give it; one of 'required' (a list of calls cut anywhere) has none: its text is the content."""
        named = self.tool_choice.function.name if isinstance(self.tool_choice, NamedToolChoice) else None
        if not complete:
            calls = [(named, text)] if named is not None else []
        elif named is not None:
            calls = [(named, json.dumps(json.loads(text)))]
        else:
            calls = [(c["name"], json.dumps(c["arguments"])) for c in json.loads(text)]
        return [{"id": new_id("call"), "type": "function", "function": {"name": n, "arguments": a}}
                for n, a in calls] or None

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Generation):
    prompt: str
    echo: Literal[False] = False
    logprobs: int | None = Field(None, ge=0, le=20, description="Each token's log probability and this many "
                                 "likeliest alternatives.")
    # not implemented: refused unless off
    best_of: int | None = Field(None, description="Not implemented: 1 or unset only.")
    suffix: str | None = Field(None, description="Not implemented: unset only.")

    _completion_neutral = field_validator("best_of", "suffix")(_off)

    def new_tokens(self, default: int) -> int:
        return self.max_tokens or default

    def logprobs_k(self) -> int | None:
        return self.logprobs


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


def _value(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else -9999.0  # JSON has no -inf; OpenAI's stand-in


def chat_logprobs(scored: list[Logprob] | None) -> dict[str, Any] | None:
    """A chat choice's `logprobs`: per token its text, value, bytes and top alternatives."""
    if scored is None:
        return None

    def one(p: Logprob) -> dict[str, Any]:
        return {"token": p.token, "logprob": _value(p.logprob), "bytes": p.bytes}

    return {"content": [one(p) | {"top_logprobs": [one(t) for t in p.top if math.isfinite(t.logprob)]}
                        for p in scored], "refusal": None}


def text_logprobs(scored: list[Logprob] | None, offset: int = 0) -> dict[str, Any] | None:
    """A completion choice's `logprobs` (the legacy shape); `offset`: where the first token's text starts."""
    if scored is None:
        return None
    return {"tokens": [p.token for p in scored], "token_logprobs": [_value(p.logprob) for p in scored],
            "top_logprobs": [{t.token: t.logprob for t in p.top if math.isfinite(t.logprob)} for p in scored],
            "text_offset": list(accumulate((len(p.token) for p in scored[:-1]), initial=offset)) if scored else []}


def completion_body(text: str, finish_reason: str, tokens: tuple[int, int], chat: bool, model: str,
                    switchyard: dict[str, Any], scored: list[Logprob] | None = None,
                    tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A chat.completion or text_completion object; with tool_calls, the message is the calls."""
    if chat:
        message = {"role": "assistant", "content": text}
        if tool_calls:  # finish_reason tool_calls, unless they were cut short
            message = {"role": "assistant", "content": None, "tool_calls": tool_calls}
            finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
        choice = {"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": chat_logprobs(scored)}
        return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": model,
                "choices": [choice], "usage": usage(*tokens), "switchyard": switchyard}
    choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": text_logprobs(scored)}
    return {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": model,
            "choices": [choice], "usage": usage(*tokens), "switchyard": switchyard}


class Chunks:
    """Server-sent events of one streamed completion, in OpenAI's chunk shape."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id, self.created = new_id("chatcmpl" if chat else "cmpl"), now()
        self.object = "chat.completion.chunk" if chat else "text_completion"
        self.offset = 0  # characters of the text streamed so far (completions' text_offset)

    def event(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        return "data: " + json.dumps({"id": self.id, "object": self.object, "created": self.created,
                                      "model": self.model, "choices": choices, **extra}) + "\n\n"

    def piece(self, text: str | None, finish: str | None = None, role: bool = False,
              scored: list[Logprob] | None = None, **extra: Any) -> str:
        if self.chat:
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": chat_logprobs(scored)}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish,
                      "logprobs": text_logprobs(scored, self.offset)}
            self.offset += len(text or "")
        return self.event([choice], **extra)

    def tool_calls(self, calls: list[dict[str, Any]]) -> str:
        """The whole calls in one chunk (each with its index), as a client adds up tool-call deltas."""
        delta = {"tool_calls": [{"index": i} | call for i, call in enumerate(calls)]}
        return self.event([{"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}])

    def usage(self, prompt_tokens: int, completion_tokens: int) -> str:
        return self.event([], usage=usage(prompt_tokens, completion_tokens))

    @staticmethod
    def error(message: str, type_: str) -> str:
        return "data: " + json.dumps(openai_error(message, type_)) + "\n\n"

    DONE = "data: [DONE]\n\n"
