"""What OpenAI clients send is honoured or refused, never dropped: the official client through every
parameter of docs/api.md, on both language-model backends (the tiny Mamba and the tiny Llama, hf engine).

Honoured: logprobs (chat and completions, streamed too), response_format (json_object, json_schema),
tools with tool_choice 'required' or a named function (streamed too), tool messages. Refused with a 400
naming the parameter: what the server does not implement, tool_choice 'auto', a schema the grammar library
cannot compile. Accepted as no-ops: user, metadata, store, service_tier.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import openai
import pytest

LM = ["mamba", "transformer"]
HI = [{"role": "user", "content": "hi"}]
SCHEMAS = json.loads((Path(__file__).parents[2] / "bench" / "data" / "schemas.json").read_text())
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}},
                                       "required": ["zone"], "additionalProperties": False}}}
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


@pytest.fixture
def oai(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def greedy(**extra) -> dict:
    # ignore_eos: every token has text, so the tokens' bytes are the answer's
    return {"messages": HI, "max_tokens": 6, "temperature": 0, "extra_body": {"ignore_eos": True}} | extra


# --- logprobs -------------------------------------------------------------------------------------


def assert_greedy_logprobs(c, top: int) -> list:
    """A greedy answer's chat logprobs: one per token, whose bytes make the text, each the likeliest of
    its `top` alternatives (sorted). Returns the entries."""
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens == 6
    assert b"".join(bytes(t.bytes) for t in content).decode() == c.choices[0].message.content
    for t in content:
        tops = [x.logprob for x in t.top_logprobs]
        assert len(tops) == top and tops == sorted(tops, reverse=True) and t.logprob <= 0
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob  # greedy: the argmax
    return content


@pytest.mark.parametrize("model", LM)
def test_chat_logprobs_cover_every_token_with_the_top_alternatives(oai, model):
    content = assert_greedy_logprobs(oai.chat.completions.create(model=model, logprobs=True, top_logprobs=3,
                                                                 **greedy()), 3)
    bare = oai.chat.completions.create(model=model, logprobs=True, **greedy())
    assert [t.token for t in bare.choices[0].logprobs.content] == [t.token for t in content]
    assert all(t.top_logprobs == [] for t in bare.choices[0].logprobs.content)
    assert oai.chat.completions.create(model=model, **greedy()).choices[0].logprobs is None


@pytest.mark.parametrize("model", LM)
def test_streamed_logprobs_are_the_unary_ones(oai, model):
    unary = oai.chat.completions.create(model=model, logprobs=True, top_logprobs=2, **greedy())
    chunks = list(oai.chat.completions.create(model=model, logprobs=True, top_logprobs=2, stream=True, **greedy()))
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    expected = unary.choices[0].logprobs.content
    assert [t.token for t in streamed] == [t.token for t in expected]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in expected], abs=1e-4)


@pytest.mark.parametrize("model", LM)
def test_completion_logprobs_in_the_legacy_shape(oai, model):
    t = oai.completions.create(model=model, prompt="def", max_tokens=5, temperature=0, logprobs=2,
                               extra_body={"ignore_eos": True})
    lp = t.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == t.choices[0].text
    assert lp.text_offset == [sum(len(x) for x in lp.tokens[:i]) for i in range(5)]
    assert all(len(top) == 2 and max(top.values()) == v for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    chunks = list(oai.completions.create(model=model, prompt="def", max_tokens=5, temperature=0, logprobs=2,
                                         stream=True, extra_body={"ignore_eos": True}))
    assert [x for c in chunks if c.choices[0].logprobs for x in c.choices[0].logprobs.tokens] == lp.tokens


# --- structured outputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", LM)
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_answers_validate(oai, model, name):
    """Sampled at temperature 1 from models that were never taught JSON: only the grammar makes it valid."""
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}
    for seed in range(3):
        c = oai.chat.completions.create(model=model, messages=[{"role": "user", "content": f"a {name} as JSON"}],
                                        max_tokens=300, temperature=1, seed=seed, response_format=fmt)
        assert c.choices[0].finish_reason == "stop", c.choices[0].message.content
        jsonschema.validate(json.loads(c.choices[0].message.content), SCHEMAS[name])


@pytest.mark.parametrize("model", LM)
def test_json_object_and_streamed_json(oai, model):
    c = oai.chat.completions.create(model=model, messages=HI, max_tokens=300, temperature=1, seed=1,
                                    response_format={"type": "json_object"})
    assert isinstance(json.loads(c.choices[0].message.content), dict)
    schema = SCHEMAS["order"]
    chunks = list(oai.chat.completions.create(
        model=model, messages=HI, max_tokens=300, temperature=1, seed=2, stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "order", "schema": schema}}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    jsonschema.validate(json.loads(text), schema)


def test_a_schema_the_grammar_library_cannot_compile_is_a_400_naming_why(oai):
    bad = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)a"}}}  # look-behind
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model="transformer", messages=HI, max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": bad}})
    assert "JSON schema cannot be used" in err.value.body["message"] and err.value.body["param"] == "response_format"
    tool = {"type": "function", "function": {"name": "f", "parameters": bad}}
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model="transformer", messages=HI, max_tokens=4, tools=[tool], tool_choice="required")
    assert err.value.body["param"] == "tools"


def test_speculation_and_a_grammar_together_are_refused(oai):
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model="transformer", messages=HI, max_tokens=4, extra_body={
            "speculation": "prompt_lookup"}, response_format={"type": "json_object"})
    assert "cannot be combined" in err.value.body["message"]


# --- tools ----------------------------------------------------------------------------------------


def check_calls(calls, names) -> None:
    assert calls and {c.function.name for c in calls} <= set(names)
    for c in calls:
        assert c.type == "function" and c.id.startswith("call-")
        jsonschema.validate(json.loads(c.function.arguments), PARAMETERS[c.function.name])


@pytest.mark.parametrize("model", LM)
def test_required_and_named_tool_calls(oai, model):
    ask = [{"role": "user", "content": "weather in Paris?"}]
    c = oai.chat.completions.create(model=model, messages=ask, max_tokens=200, temperature=1, seed=0,
                                    tools=[WEATHER, TIME], tool_choice="required")
    assert c.choices[0].finish_reason == "tool_calls" and c.choices[0].message.content is None
    check_calls(c.choices[0].message.tool_calls, ["get_weather", "get_time"])
    one = oai.chat.completions.create(model=model, messages=ask, max_tokens=200, temperature=1, seed=0,
                                      tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    assert len(one.choices[0].message.tool_calls) == 1
    named = oai.chat.completions.create(model=model, messages=ask, max_tokens=200, temperature=1, seed=0,
                                        tools=[WEATHER, TIME],
                                        tool_choice={"type": "function", "function": {"name": "get_time"}})
    check_calls(named.choices[0].message.tool_calls, ["get_time"])
    assert len(named.choices[0].message.tool_calls) == 1


def test_a_tool_call_streams_and_its_answer_goes_back(oai):
    stream = oai.chat.completions.create(model="transformer", messages=[{"role": "user", "content": "weather?"}],
                                         max_tokens=200, temperature=1, seed=3, stream=True, tools=[WEATHER],
                                         tool_choice={"type": "function", "function": {"name": "get_weather"}})
    chunks = list(stream)
    deltas = [t for ch in chunks if ch.choices and ch.choices[0].delta.tool_calls for t in ch.choices[0].delta.tool_calls]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    check_calls(deltas, ["get_weather"])
    call = deltas[0]
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": call.id, "type": "function",
                     "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
                {"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny"}]
    c = oai.chat.completions.create(model="transformer", messages=messages, max_tokens=8, tools=[WEATHER],
                                    tool_choice="none")
    assert c.choices[0].finish_reason in ("stop", "length") and c.choices[0].message.tool_calls is None


def test_a_named_call_cut_short_has_its_arguments_so_far(oai):
    """As OpenAI and vLLM: the call with the partial arguments and finish_reason length, not text."""
    c = oai.chat.completions.create(model="transformer", messages=[{"role": "user", "content": "weather?"}],
                                    max_tokens=3, temperature=1, seed=0, tools=[WEATHER],
                                    tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = c.choices[0].message.tool_calls
    assert c.choices[0].finish_reason == "length" and c.choices[0].message.content is None
    assert call.function.name == "get_weather" and call.function.arguments.startswith("{")
    required = oai.chat.completions.create(model="transformer", messages=[{"role": "user", "content": "weather?"}],
                                           max_tokens=3, temperature=1, seed=0, tools=[WEATHER], tool_choice="required")
    assert required.choices[0].finish_reason == "length" and required.choices[0].message.tool_calls is None
    assert required.choices[0].message.content.startswith("[")


@pytest.mark.parametrize("choice", [{}, {"tool_choice": "auto"}])
def test_tool_choice_auto_is_refused_without_a_parser(oai, choice):
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model="transformer", messages=HI, max_tokens=4, tools=[WEATHER], **choice)
    assert err.value.body["param"] == "tool_choice" and "tool-call parser" in err.value.body["message"]


@pytest.mark.parametrize("extra, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER]}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "tools"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.json_schema"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0"),
    ({"seed": 2**64}, "seed"),  # beyond the 64 bits a generator takes
])
def test_inconsistent_tool_and_logprob_parameters_are_400s(client, extra, param):
    r = client.post("/v1/chat/completions", json={"model": "transformer", "messages": HI, "max_tokens": 2} | extra)
    assert r.status_code == 400, r.text
    if param is not None:
        assert r.json()["error"]["param"] == param


# --- the rest of the list --------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [
    {"presence_penalty": 0.5}, {"frequency_penalty": 1}, {"logit_bias": {"50256": -100}}, {"n": 2},
    {"audio": {"voice": "alloy", "format": "wav"}}, {"modalities": ["text", "audio"]},
    {"prediction": {"type": "content", "content": "x"}}, {"reasoning_effort": "low"}, {"verbosity": "low"},
    {"web_search_options": {}},
])
def test_a_parameter_this_server_does_not_implement_is_a_400_naming_it(oai, extra):
    """Sent through the official client: none is answered as if it had been honoured."""
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model="transformer", messages=HI, max_tokens=2, **extra)
    assert err.value.body["param"] == next(iter(extra))


@pytest.mark.parametrize("extra", [{"best_of": 2}, {"suffix": "x"}, {"echo": True}, {"n": 3}])
def test_a_completions_parameter_this_server_does_not_implement_is_a_400(oai, extra):
    with pytest.raises(openai.BadRequestError) as err:
        oai.completions.create(model="transformer", prompt="x", max_tokens=2, **extra)
    assert err.value.body["param"] == next(iter(extra))


def test_unknown_and_no_op_parameters(oai, client):
    r = client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2, "frobnicate": 1})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "frobnicate" and "unknown parameter" in err["message"]
    c = oai.chat.completions.create(model="transformer", messages=HI, max_tokens=2, user="u-1", metadata={"k": "v"},
                                    store=False, service_tier="auto", presence_penalty=0, logprobs=False,
                                    tools=[WEATHER], tool_choice="none", response_format={"type": "text"},
                                    parallel_tool_calls=False)
    assert c.choices[0].message.tool_calls is None and c.choices[0].logprobs is None
