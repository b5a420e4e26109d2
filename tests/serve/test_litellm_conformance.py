"""What LiteLLM's SDK sends is honoured or refused, never dropped: tests/serve/test_conformance.py's checks
through `litellm.completion` and `litellm.text_completion`, on both language-model backends, by both of
LiteLLM's routes to an OpenAI-compatible server: `openai/<backend>` (the openai client underneath) and
`hosted_vllm/<backend>` (LiteLLM's own HTTP client).

Every call records the request bodies that reached the server and the server's error bodies, so a check
says who did what: LiteLLM or the server. What LiteLLM does on its own side (1.110):

- `verbosity` is refused by LiteLLM before sending (UnsupportedParamsError) on both routes; with
  `drop_params=True` LiteLLM strips it and the server never sees it.
- `user` and `metadata` are stripped by LiteLLM (it keeps them for its own logging); both are no-ops here.
- `text_completion(stream=True)` leaves `logprobs` out of the chunks it yields; the server's events carry them.
- `hosted_vllm/` strips `strict` and every `additionalProperties: false` from tools' parameters (not from
  response_format), so the server constrains the arguments to the looser schema it was sent; `openai/` sends
  tools unchanged. The tools here say `maxProperties` too, which survives.
- Everything else (logprobs, response_format, tool_choice, the parameters Switchyard refuses) reaches the
  server unchanged, and `drop_params=True` does not drop presence_penalty and the like.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

# LiteLLM's bundled model cost map, not a fetch from GitHub at import (tiktoken's encodings are bundled too)
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

import litellm  # noqa: E402
from litellm.llms.custom_httpx.http_handler import HTTPHandler  # noqa: E402

from tests.serve.test_conformance import assert_greedy_logprobs  # noqa: E402

# LiteLLM's pydantic types warn about typing.ReadOnly as they are built, at the first calls
pytestmark = pytest.mark.filterwarnings("ignore:.*ReadOnly:UserWarning")

LM = ["mamba", "transformer"]
ROUTES = ["openai", "hosted_vllm"]
HI = [{"role": "user", "content": "hi"}]
SCHEMAS = json.loads((Path(__file__).parents[2] / "bench" / "data" / "schemas.json").read_text())
# maxProperties says again what additionalProperties: false says, in a form hosted_vllm/ does not strip: the
# arguments stay these keys on both routes (without it, the tiny models add keys until max_tokens)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False, "maxProperties": 2}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}},
                                       "required": ["zone"], "additionalProperties": False, "maxProperties": 1}}}
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


def loosened(schema: Any) -> Any:
    """A schema without `additionalProperties: false` anywhere, as hosted_vllm/ sends tools' parameters."""
    if isinstance(schema, dict):
        return {k: loosened(v) for k, v in schema.items() if not (k == "additionalProperties" and v is False)}
    if isinstance(schema, list):
        return [loosened(v) for v in schema]
    return schema


class Via:
    """LiteLLM's calls to the server by one route, with the request bodies that reached the server (`sent`),
    the server's error bodies (`refused`) and its streamed events (`streamed`, one list a stream), seen by
    httpx hooks on the client LiteLLM is given."""

    def __init__(self, route: str, server: str):
        self.route, self.base = route, server + "/v1"
        self.sent: list[dict[str, Any]] = []
        self.refused: list[dict[str, Any]] = []
        self.streamed: list[list[dict[str, Any]]] = []
        self.http = httpx.Client(timeout=120, event_hooks={"request": [self._request], "response": [self._response]})
        # text_completion goes through an openai client on both routes; chat on hosted_vllm/ through LiteLLM's own
        self.oai = openai.OpenAI(base_url=self.base, api_key="unused", http_client=self.http, max_retries=0)
        self.chat_client = self.oai if route == "openai" else HTTPHandler(client=self.http)

    def _request(self, request: httpx.Request) -> None:
        self.sent.append(json.loads(request.read()))

    def _response(self, response: httpx.Response) -> None:
        if response.status_code >= 400:
            self.refused.append(json.loads(response.read())["error"])
        elif response.headers.get("content-type", "").startswith("text/event-stream"):
            lines = response.read().decode().splitlines()  # read whole here; LiteLLM then reads the copy
            self.streamed.append([json.loads(x[6:]) for x in lines if x.startswith("data: ") and x != "data: [DONE]"])

    def chat(self, model: str = "transformer", messages: list | None = None, **kw: Any):
        return litellm.completion(model=f"{self.route}/{model}", messages=messages or HI, api_base=self.base,
                                  api_key="unused", client=self.chat_client, **kw)

    def text(self, model: str = "transformer", **kw: Any):
        return litellm.text_completion(model=f"{self.route}/{model}", api_base=self.base, api_key="unused",
                                       client=self.oai, **kw)

    def tools_sent(self, tools: list[dict]) -> list[dict]:
        """The tools as this route puts them on the wire."""
        if self.route == "openai":
            return tools
        out = loosened(copy.deepcopy(tools))
        for t in out:
            t["function"].pop("strict", None)
        return out


@pytest.fixture(params=ROUTES)
def via(request, server):
    v = Via(request.param, server)
    yield v
    v.http.close()


def greedy(**extra) -> dict:
    # ignore_eos: every token has text, so the tokens' bytes are the answer's
    return {"max_tokens": 6, "temperature": 0, "extra_body": {"ignore_eos": True}} | extra


def refused_by_server(via: Via, err: pytest.ExceptionInfo, param: str | None) -> str:
    """The call reached the server, which answered 400 naming `param` (unless None); LiteLLM raised its
    BadRequestError (not its own UnsupportedParamsError) with the server's message, which this returns."""
    assert isinstance(err.value, litellm.BadRequestError) and not isinstance(err.value, litellm.UnsupportedParamsError)
    assert err.value.status_code == 400 and len(via.sent) == len(via.refused) == 1
    assert via.refused[0]["message"].splitlines()[0] in str(err.value)
    if param is not None:
        assert via.refused[0]["param"] == param
    return via.refused[0]["message"]


# --- chat, streaming, logprobs ---------------------------------------------------------------------


@pytest.mark.parametrize("model", LM)
def test_a_stream_is_the_unary_answer_with_its_usage(via, model):
    unary = via.chat(model, **greedy())
    assert unary.choices[0].finish_reason == "length" and unary.usage.completion_tokens == 6
    chunks = list(via.chat(model, stream=True, stream_options={"include_usage": True}, **greedy()))
    assert via.sent[-1]["stream"] is True and via.sent[-1]["stream_options"] == {"include_usage": True}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == unary.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    usage = [c.usage for c in chunks if getattr(c, "usage", None)]
    assert usage and usage[-1].completion_tokens == 6 and usage[-1].prompt_tokens == unary.usage.prompt_tokens


@pytest.mark.parametrize("model", LM)
def test_chat_logprobs_unary_and_streamed(via, model):
    c = via.chat(model, logprobs=True, top_logprobs=3, **greedy())
    assert via.sent[-1]["logprobs"] is True and via.sent[-1]["top_logprobs"] == 3
    content = assert_greedy_logprobs(c, 3)
    chunks = list(via.chat(model, logprobs=True, top_logprobs=3, stream=True, **greedy()))
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-4)
    assert via.chat(model, **greedy()).choices[0].logprobs is None


def test_completion_logprobs_in_the_legacy_shape(via):
    t = via.text(prompt="def", max_tokens=5, temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    assert via.sent[-1]["logprobs"] == 2
    lp = t.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == t.choices[0].text
    assert all(len(top) == 2 and max(top.values()) == v for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    chunks = list(via.text(prompt="def", max_tokens=5, temperature=0, logprobs=2, stream=True,
                           extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text or "" for c in chunks if c.choices) == t.choices[0].text
    # the server streams them; LiteLLM's text-completion stream wrapper (1.110) leaves logprobs out of its chunks
    assert [x for e in via.streamed[-1] if e["choices"][0]["logprobs"] for x in e["choices"][0]["logprobs"]["tokens"]
            ] == lp.tokens


# --- structured outputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", LM)
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_answers_validate(via, model, name):
    """Sampled at temperature 1 from models that were never taught JSON: only the grammar makes it valid."""
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}
    c = via.chat(model, messages=[{"role": "user", "content": f"a {name} as JSON"}], max_tokens=300,
                 temperature=1, seed=0, response_format=fmt)
    assert via.sent[-1]["response_format"] == fmt  # both routes send it unchanged
    assert c.choices[0].finish_reason == "stop", c.choices[0].message.content
    jsonschema.validate(json.loads(c.choices[0].message.content), SCHEMAS[name])


@pytest.mark.parametrize("model", LM)
def test_json_object_and_streamed_json_schema(via, model):
    c = via.chat(model, max_tokens=300, temperature=1, seed=1, response_format={"type": "json_object"})
    assert isinstance(json.loads(c.choices[0].message.content), dict)
    schema = SCHEMAS["order"]
    chunks = list(via.chat(model, max_tokens=300, temperature=1, seed=2, stream=True, response_format={
        "type": "json_schema", "json_schema": {"name": "order", "schema": schema}}))
    jsonschema.validate(json.loads("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)), schema)


def test_a_schema_the_grammar_library_cannot_compile_is_a_400(via):
    bad = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)a"}}}  # look-behind
    with pytest.raises(litellm.BadRequestError) as err:
        via.chat(max_tokens=4, response_format={"type": "json_schema", "json_schema": {"name": "bad", "schema": bad}})
    assert "JSON schema cannot be used" in refused_by_server(via, err, "response_format")


# --- tools ----------------------------------------------------------------------------------------


def check_calls(via: Via, calls, names: list[str]) -> None:
    """Each call names one of `names`, and its arguments follow the parameters the server was sent and
    (the same on both routes, by maxProperties) the ones the caller gave."""
    sent = {t["function"]["name"]: t["function"]["parameters"] for t in via.sent[-1]["tools"]}
    assert calls and {c.function.name for c in calls} <= set(names)
    for c in calls:
        assert c.type == "function" and c.id.startswith("call-")
        arguments = json.loads(c.function.arguments)
        jsonschema.validate(arguments, sent[c.function.name])
        jsonschema.validate(arguments, PARAMETERS[c.function.name])


@pytest.mark.parametrize("model", LM)
def test_required_and_named_tool_calls(via, model):
    ask = [{"role": "user", "content": "weather in Paris?"}]
    c = via.chat(model, messages=ask, max_tokens=200, temperature=1, seed=0, tools=[WEATHER, TIME],
                 tool_choice="required")
    assert via.sent[-1]["tools"] == via.tools_sent([WEATHER, TIME]) and via.sent[-1]["tool_choice"] == "required"
    assert c.choices[0].finish_reason == "tool_calls" and c.choices[0].message.content is None
    check_calls(via, c.choices[0].message.tool_calls, ["get_weather", "get_time"])
    one = via.chat(model, messages=ask, max_tokens=200, temperature=1, seed=0, tools=[WEATHER, TIME],
                   tool_choice="required", parallel_tool_calls=False)
    assert via.sent[-1]["parallel_tool_calls"] is False and len(one.choices[0].message.tool_calls) == 1
    named = via.chat(model, messages=ask, max_tokens=200, temperature=1, seed=0, tools=[WEATHER, TIME],
                     tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert len(named.choices[0].message.tool_calls) == 1
    check_calls(via, named.choices[0].message.tool_calls, ["get_time"])


def test_a_streamed_tool_call_and_its_answer_going_back(via):
    ask = [{"role": "user", "content": "weather?"}]
    chunks = list(via.chat(messages=ask, max_tokens=200, temperature=1, seed=3, stream=True, tools=[WEATHER],
                           tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    built = litellm.stream_chunk_builder(chunks, messages=ask)
    assert built.choices[0].finish_reason == "tool_calls"
    calls = built.choices[0].message.tool_calls
    assert len(calls) == 1
    check_calls(via, calls, ["get_weather"])
    messages = ask + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": calls[0].id, "type": "function",
         "function": {"name": calls[0].function.name, "arguments": calls[0].function.arguments}}]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "18 degrees, sunny"}]
    c = via.chat(messages=messages, max_tokens=8, tools=[WEATHER], tool_choice="none")
    assert via.sent[-1]["messages"][-1] == messages[-1]
    assert c.choices[0].finish_reason in ("stop", "length") and not c.choices[0].message.tool_calls


@pytest.mark.parametrize("choice", [{}, {"tool_choice": "auto"}])
def test_tool_choice_auto_is_refused_without_a_parser(via, choice):
    with pytest.raises(litellm.BadRequestError) as err:
        via.chat(max_tokens=4, tools=[WEATHER], **choice)
    assert via.sent[0].get("tool_choice") == choice.get("tool_choice")
    assert "tool-call parser" in refused_by_server(via, err, "tool_choice")


# --- the rest of the list --------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [
    {"presence_penalty": 0.5}, {"frequency_penalty": 1}, {"logit_bias": {"50256": -100}}, {"n": 2},
    {"audio": {"voice": "alloy", "format": "wav"}}, {"modalities": ["text", "audio"]},
    {"prediction": {"type": "content", "content": "x"}}, {"reasoning_effort": "low"}, {"web_search_options": {}},
])
@pytest.mark.parametrize("drop_params", [False, True])
def test_a_parameter_this_server_does_not_implement_is_a_400_naming_it(via, extra, drop_params):
    """LiteLLM sends each of these, drop_params or not (it drops only what it thinks the route lacks), and
    the server refuses it: none is answered as if it had been honoured."""
    ((param, value),) = extra.items()
    with pytest.raises(litellm.BadRequestError) as err:
        via.chat(max_tokens=2, drop_params=drop_params, **extra)
    assert via.sent[0][param] == value
    refused_by_server(via, err, param)


@pytest.mark.parametrize("extra", [{"best_of": 2}, {"suffix": "x"}, {"echo": True}, {"n": 3}])
def test_a_completions_parameter_this_server_does_not_implement_is_a_400(via, extra):
    ((param, value),) = extra.items()
    with pytest.raises(litellm.BadRequestError) as err:
        via.text(prompt="x", max_tokens=2, **extra)
    assert via.sent[0][param] == value
    refused_by_server(via, err, param)


def test_verbosity_is_refused_by_litellm_itself_and_dropped_only_when_asked(via):
    # LiteLLM's own refusal: nothing reaches the server
    with pytest.raises(litellm.UnsupportedParamsError) as err:
        via.chat(max_tokens=2, verbosity="low")
    assert "verbosity" in str(err.value) and via.sent == []
    # drop_params=True: LiteLLM strips it, so the server answers a request without it
    c = via.chat(max_tokens=2, verbosity="low", drop_params=True)
    assert "verbosity" not in via.sent[0] and c.choices[0].message.content is not None


def test_an_unknown_parameter_in_extra_body_is_a_400_naming_it(via):
    with pytest.raises(litellm.BadRequestError) as err:
        via.chat(max_tokens=2, extra_body={"frobnicate": 1})
    assert via.sent[0]["frobnicate"] == 1
    assert "unknown parameter" in refused_by_server(via, err, "frobnicate")


def test_no_op_parameters_are_accepted(via):
    c = via.chat(max_tokens=2, user="u-1", metadata={"k": "v"}, store=False, service_tier="auto",
                 presence_penalty=0, logprobs=False, tools=[WEATHER], tool_choice="none",
                 response_format={"type": "text"}, parallel_tool_calls=False)
    sent = via.sent[0]
    # user and metadata: LiteLLM keeps them for its own logging and does not send them
    assert "user" not in sent and "metadata" not in sent
    assert sent["store"] is False and sent["service_tier"] == "auto" and sent["presence_penalty"] == 0
    assert sent["tool_choice"] == "none" and sent["response_format"] == {"type": "text"}
    assert not c.choices[0].message.tool_calls and c.choices[0].logprobs is None
