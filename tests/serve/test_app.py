"""The whole app on real Ray Serve with the embedded tiny models: every endpoint, streaming,
the official openai client, routing by content, fallback, and bad input."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import openai
import pytest
from PIL import Image

from deployments.config import AppConfig
from models import code_grid

SUDOKU = [
    [5, 3, 0, 0, 7, 0, 0, 0, 0],
    [6, 0, 0, 1, 9, 5, 0, 0, 0],
    [0, 9, 8, 0, 0, 0, 0, 6, 0],
    [8, 0, 0, 0, 6, 0, 0, 0, 3],
    [4, 0, 0, 8, 0, 3, 0, 0, 1],
    [7, 0, 0, 0, 2, 0, 0, 0, 6],
    [0, 6, 0, 0, 0, 0, 2, 8, 0],
    [0, 0, 0, 4, 1, 9, 0, 0, 5],
    [0, 0, 0, 0, 8, 0, 0, 7, 9],
]
LONG_PROMPT = "summarise this report. " + "the quarterly numbers went up again " * 500  # about 5000 tokens


def chat(text: str, **extra) -> dict:
    return {"model": "auto", "messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0,
            **extra}


def png(color=(200, 30, 30), size=(24, 24), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def sse(response: httpx.Response) -> list:
    events = [line.removeprefix("data: ") for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert "Traceback" not in r.text and err["message"]
    return err


# --- endpoints ---------------------------------------------------------------------------


def test_healthz(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert {b["state"] for b in r.json()["backends"].values()} == {"ok"}


def test_models_lists_every_backend_with_its_engine(client):
    data = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert set(data) == {"auto", "mamba", "mamba:pydoc", "transformer", "transformer:pydoc", "trm", "dinov2"}
    mamba, transformer = data["mamba"]["switchyard"], data["transformer"]["switchyard"]
    assert (mamba["engine"], mamba["architecture"], mamba["kernel"], mamba["device"]) == ("hf", "mamba", "reference", "cpu")
    assert (transformer["architecture"], transformer["kernel"]) == ("llama", None)
    assert all(data[n]["switchyard"]["health"] == "ok" for n in ("mamba", "transformer", "trm", "dinov2"))


def scrape() -> str:
    """Ray's Prometheus endpoint: what the replicas set, pushed every few seconds (poll)."""
    import ray

    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["alive"])
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def series(text: str, name: str, **tags: str) -> float | None:
    """The sum of `name`'s samples of the switchyard app whose labels include `tags`; None if none."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name + "{") and 'application="switchyard"' in line
              and all(f'{k}="{v}"' in line for k, v in tags.items())]
    return sum(values) if values else None


def test_router_and_trm_metrics_count_the_traffic(client):
    requests = "ray_switchyard_router_requests_total"
    tags = {"endpoint": "refine", "backend": "trm", "status": "200"}
    text = scrape()
    before = series(text, requests, **tags) or 0
    steps_before = series(text, "ray_switchyard_trm_steps_count", task="sudoku") or 0
    two_before = series(text, "ray_switchyard_trm_steps_bucket", task="sudoku", le="2.0") or 0
    for _ in range(3):
        assert client.post("/v1/refine", json={"task": "sudoku", "grid": SUDOKU, "max_steps": 2}).status_code == 200
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = scrape()
        if (series(text, requests, **tags) or 0) - before >= 3 and \
                (series(text, "ray_switchyard_trm_steps_count", task="sudoku") or 0) - steps_before >= 3:
            break
        time.sleep(2)
    assert series(text, requests, **tags) - before == 3
    assert series(text, "ray_switchyard_trm_steps_count", task="sudoku") - steps_before == 3
    assert series(text, "ray_switchyard_trm_steps_bucket", task="sudoku", le="2.0") - two_before == 3  # max_steps 2
    assert series(text, "ray_switchyard_router_decisions_total", task="puzzle_solving", source="explicit",
                  backend="trm") >= 3
    assert series(text, "ray_switchyard_router_decision_seconds_count") >= 3
    assert series(text, "ray_switchyard_router_backend_unhealthy", backend="trm") == 0
    assert series(text, "ray_switchyard_trm_batch_size_count", task="sudoku") >= 1


def test_backends_export_latency_metrics(client):
    names = {"ray_switchyard_lm_ttft_seconds_count": {"deployment": "transformer"},
             "ray_switchyard_lm_inter_token_seconds_count": {"deployment": "transformer"},
             "ray_switchyard_lm_tokens_per_second_count": {"deployment": "transformer"},
             "ray_switchyard_classifier_seconds_count": {"deployment": "dinov2"}}
    text = scrape()
    before = {n: series(text, n, **tags) or 0 for n, tags in names.items()}
    with client.stream("POST", "/v1/chat/completions",
                       json=chat("stream me", model="transformer", stream=True, max_tokens=6, ignore_eos=True)) as r:
        assert r.status_code == 200 and sum(1 for _ in r.iter_lines()) > 0
    assert client.post("/v1/classify", json={"image": base64.b64encode(png()).decode()}).status_code == 200
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = scrape()
        grown = {n: (series(text, n, **tags) or 0) - before[n] for n, tags in names.items()}
        if all(v >= 1 for v in grown.values()):
            break
        time.sleep(2)
    assert grown["ray_switchyard_lm_ttft_seconds_count"] == 1 and grown["ray_switchyard_classifier_seconds_count"] == 1
    assert grown["ray_switchyard_lm_inter_token_seconds_count"] >= 1, grown  # 6 tokens, several pieces
    assert grown["ray_switchyard_lm_tokens_per_second_count"] == 1, grown


def test_lm_replicas_export_their_kernel_path_as_a_metric(client):
    assert client.post("/v1/completions", json={"model": "transformer", "prompt": "x", "max_tokens": 2}).status_code == 200
    deadline, lines = time.monotonic() + 60, []
    while time.monotonic() < deadline:
        text = scrape()
        lines = [x for x in text.splitlines() if x.startswith("ray_switchyard_lm_engine{") and
                 'application="switchyard"' in x]
        batches = series(text, "ray_switchyard_lm_batches_total", deployment="transformer")
        if len(lines) >= 2 and batches:
            break
        time.sleep(2)
    # the engine's counters, exported at health checks (every 10 s)
    assert batches >= 1 and series(text, "ray_switchyard_lm_queue_depth", deployment="transformer") == 0
    assert series(text, "ray_switchyard_lm_running", deployment="mamba") is not None
    assert 0 <= series(text, "ray_switchyard_lm_speculation_acceptance", deployment="transformer") <= 1
    mamba = [x for x in lines if 'deployment="mamba"' in x]
    transformer = [x for x in lines if 'deployment="transformer"' in x]
    assert mamba and 'kernel="reference"' in mamba[0] and 'architecture="mamba"' in mamba[0], lines
    assert transformer and 'kernel="none"' in transformer[0] and transformer[0].endswith(" 1.0"), lines


def chosen(route: dict) -> str:
    """The backend the rule picks: the lowest predicted latency among those within the config's quality margin
    of the best measured quality for the task."""
    quality, predicted = route["quality_bits_per_byte"], route["predicted_s"]
    margin = AppConfig.from_serve_config().routing.quality_margin
    close = [n for n in predicted if n in quality and quality[n] <= min(quality.values()) + margin]
    return min(close, key=predicted.get)


def test_short_chat_goes_to_the_fastest_backend_of_good_enough_quality(client):
    route = client.post("/v1/route", json=chat("hello, how are you?")).json()
    assert set(route["predicted_s"]) == set(route["quality_bits_per_byte"]) == {"mamba", "transformer"}
    expected = chosen(route)
    assert route["backend"] == expected and "lowest predicted latency" in route["reason"]
    r = client.post("/v1/chat/completions", json=chat("hello, how are you?"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == expected
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert 0 < body["usage"]["completion_tokens"] <= 8
    assert r.headers["x-switchyard-backend"] == expected and "x-switchyard-fallback" not in r.headers
    assert body["switchyard"]["backend"] == expected and body["switchyard"]["fallback"] is False
    assert "text_generation" in r.headers["x-switchyard-reason"]


# The router predicts each backend's latency from the cost models measured into serve_config.yaml
# (bench.long_context --write) and picks the lowest among the backends whose quality for the task, measured
# into it too (bench.quality --write), is within routing.quality_margin of the best. The test checks the
# predictions against the config's cost models and the choice against that rule.
@pytest.mark.parametrize("prompt,max_tokens", [(LONG_PROMPT, 4), (LONG_PROMPT, 1000), ("def add(a, b):", 512)])
def test_routing_follows_the_measured_costs_and_quality(client, prompt, max_tokens):
    route = client.post("/v1/route", json=chat(prompt, max_tokens=max_tokens)).json()
    backends = {b.name: b.capability for b in AppConfig.from_serve_config().backends}
    tokens = route["features"]["tokens"]
    for name, predicted in route["predicted_s"].items():  # idle backends: no load factor
        assert predicted == pytest.approx(backends[name].cost.predict_s(tokens, max_tokens), rel=1e-4), name
    for name, bpb in route["quality_bits_per_byte"].items():
        assert bpb == backends[name].quality.bits_per_byte[route["task"]]
    assert route["backend"] == chosen(route), route


def test_long_prompt_is_long_context_and_runs_where_routed(client):
    route = client.post("/v1/route", json=chat(LONG_PROMPT, max_tokens=4)).json()
    assert 4096 <= route["features"]["tokens"] <= 7000 and route["task"] == "long_context"
    r = client.post("/v1/chat/completions", json=chat(LONG_PROMPT, max_tokens=4))
    assert r.status_code == 200, r.text
    assert r.headers["x-switchyard-backend"] == route["backend"]
    assert r.json()["switchyard"]["task"] == "long_context"
    assert r.json()["usage"]["prompt_tokens"] > 4096


def test_completion(client):
    r = client.post("/v1/completions", json={"model": "transformer", "prompt": "import os", "max_tokens": 5,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 5
    assert body["choices"][0]["finish_reason"] == "length"
    # the router's own time, apart from the backend's: more than nothing, less than the whole request
    overhead = float(r.headers["x-switchyard-overhead-ms"])
    entry = client.get("/v1/routing/log", params={"limit": 1}).json()["data"][0]
    assert 0 < overhead < entry["latency_ms"] and 0 < entry["overhead_ms"] < entry["latency_ms"]


def test_pinned_backend(client):
    r = client.post("/v1/chat/completions", json=chat("hi", model="mamba"))
    assert r.status_code == 200 and r.headers["x-switchyard-backend"] == "mamba"
    assert "pinned" in r.json()["switchyard"]["reason"]


def test_streaming_matches_the_unary_answer(client):
    body = chat("def add(a, b):", max_tokens=12)
    unary = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    r = client.post("/v1/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks = sse(r)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[0]["switchyard"]["backend"] == r.headers["x-switchyard-backend"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == unary
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 12


def test_streaming_completion(client):
    r = client.post("/v1/completions", json={"prompt": "class Foo:", "max_tokens": 6, "stream": True,
                                             "temperature": 0})
    chunks = sse(r)
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_string_is_cut(client):
    full = client.post("/v1/completions", json={"prompt": "x = ", "max_tokens": 12, "temperature": 0,
                                                "model": "transformer"}).json()["choices"][0]["text"]
    stop = full[3:5]
    assert stop, full
    r = client.post("/v1/completions", json={"prompt": "x = ", "max_tokens": 12, "temperature": 0,
                                             "model": "transformer", "stop": stop}).json()
    assert r["choices"][0]["text"] == full[: full.find(stop)]
    assert r["choices"][0]["finish_reason"] == "stop"


def _cancelled(client) -> int:
    return next(m for m in client.get("/stubs/v1/models").json()["data"] if m["id"] == "trickle")["switchyard"]["cancelled"]


def test_client_disconnect_cancels_the_backends_stream(client, server):
    """`trickle` streams until cancelled (the hf engine's own stop on cancellation: tests/unit/test_hf_engine.py)."""
    before = _cancelled(client)
    body = {"prompt": "x", "max_tokens": 1000, "stream": True, "model": "trickle"}
    with httpx.Client(base_url=server, timeout=30) as c, c.stream("POST", "/stubs/v1/completions", json=body) as r:
        assert r.status_code == 200
        next(line for line in r.iter_lines() if line.startswith("data: "))  # the first chunk came
    for _ in range(600):  # wait for the cancellation to reach the replica (no bound on how soon)
        if _cancelled(client) > before:
            break
        time.sleep(0.05)
    assert _cancelled(client) == before + 1


def test_ignore_eos_and_prompt_lookup_speculation(client):
    body = {"prompt": "def add(a, b):\n    return a + b\n\ndef add(a, b):", "max_tokens": 24, "temperature": 0,
            "model": "transformer", "ignore_eos": True}
    plain = client.post("/v1/completions", json=body).json()
    spec = client.post("/v1/completions", json={**body, "speculation": "prompt_lookup"}).json()
    assert plain["usage"]["completion_tokens"] == 24
    assert spec["choices"][0]["text"] == plain["choices"][0]["text"]


def test_draft_speculation_is_plain_greedy(client):
    body = chat("Rewrite this code:\ndef area(r):\n    return 3.14 * r * r", model="transformer", max_tokens=32)
    plain = client.post("/v1/chat/completions", json=body).json()
    spec = client.post("/v1/chat/completions", json={**body, "speculation": "draft"}).json()
    assert spec["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    assert spec["usage"] == plain["usage"]


def test_adapter_is_chosen_per_request(client):
    code = "def close(self):\n    if self._file is not None:\n        self._file.close()\n        self._file = None"
    body = chat(f"Write the docstring for this function:\n{code}", model="transformer", max_tokens=16)
    base = client.post("/v1/chat/completions", json=body).json()
    tuned = client.post("/v1/chat/completions", json={**body, "model": "transformer:pydoc"}).json()
    assert tuned["model"] == "transformer:pydoc" and base["model"] == "transformer"
    assert tuned["choices"][0]["message"]["content"] != base["choices"][0]["message"]["content"]
    again = client.post("/v1/chat/completions", json=body).json()  # the base model is back for others
    assert again["choices"][0]["message"]["content"] == base["choices"][0]["message"]["content"]


def test_route_explains_without_running(client):
    r = client.post("/v1/route", json=chat("fix this bug please"))
    body = r.json()
    assert r.status_code == 200
    assert body["task"] == "code_repair" and body["task_source"] == "classifier"  # the rule agrees
    assert body["intent"]["task"] == "code_repair" and body["intent"]["confidence"] >= 0.5
    assert f"confidence {body['intent']['confidence']:.2f}" in body["reason"]
    assert set(body["scores"]) == {"mamba", "transformer", "trm", "dinov2"}
    assert body["backend"] == "transformer" and "trm" in body["excluded"]  # mamba does not serve code_repair
    assert "mamba" in body["excluded"] and set(body["predicted_s"]) == {"mamba", "transformer"}
    completion = client.post("/v1/route", json={"prompt": "a short prompt"}).json()
    assert completion["backend"] == chosen(completion) and "bits/byte of the best quality" in completion["reason"]


def test_concurrent_refines_share_batches_with_their_own_limits(client):
    from concurrent.futures import ThreadPoolExecutor

    def batches() -> int:
        data = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        return data["trm"]["switchyard"]["batches"]

    limits = [1, 2, 3, 4, 1, 2, 3, 4]
    before = batches()
    with ThreadPoolExecutor(len(limits)) as pool:
        results = list(pool.map(lambda s: client.post("/v1/refine", json={"task": "sudoku", "grid": SUDOKU,
                                                                         "max_steps": s}), limits))
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    for r, s in zip(results, limits):
        assert r.json()["max_steps"] == s and 1 <= r.json()["steps"] <= s
    assert batches() - before < len(limits)  # some of them were refined together


def test_a_bad_trm_request_fails_alone_beside_good_ones(server):
    """Straight to the trm deployment (the router's own checks would stop these first): requests are
    checked before they join a batch, so a bad one fails alone."""
    import asyncio

    from ray import serve

    from deployments.protocol import Failure

    handle = serve.get_deployment_handle("trm", app_name="switchyard")
    payloads = [{"grid": SUDOKU, "max_steps": 2}, {"grid": SUDOKU, "max_steps": -1},
                {"grid": SUDOKU, "halt_threshold": 1.5}, {"grid": [[0] * 9] * 8}, {"grid": SUDOKU, "max_steps": 3}]
    async def go():
        return await asyncio.gather(*(handle.refine.remote(p) for p in payloads))

    # The handle stays bound to this loop (Serve caches it until shutdown): keep the loop, do not close it.
    good1, bad_steps, bad_threshold, bad_grid, good2 = asyncio.new_event_loop().run_until_complete(go())
    for bad, text in ((bad_steps, "max_steps"), (bad_threshold, "halt_threshold"), (bad_grid, "9 rows")):
        assert isinstance(bad, Failure) and bad.kind == "invalid" and text in bad.message, bad
    assert good1["max_steps"] == 2 and 1 <= good1["steps"] <= 2
    assert good2["max_steps"] == 3 and 1 <= good2["steps"] <= 3


def test_refine_sudoku_goes_to_trm(client):
    r = client.post("/v1/refine", json={"task": "sudoku", "grid": SUDOKU, "max_steps": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["backend"] == "trm" and r.headers["x-switchyard-backend"] == "trm"
    assert len(body["grid"]) == 9 and all(len(row) == 9 for row in body["grid"])
    assert all(body["grid"][i][j] == SUDOKU[i][j] for i in range(9) for j in range(9) if SUDOKU[i][j])
    assert 1 <= body["steps"] <= 4 and 0 <= body["confidence"] <= 1 and isinstance(body["valid"], bool)


def test_refine_code_repair_on_trm(client):
    code = "def add(a, b):\n    return a + b"
    r = client.post("/v1/refine", json={"task": "code_repair", "code": code, "model": "trm", "max_steps": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["backend"] == "trm" and body["code"] == code and body["valid"] is True  # nothing to repair
    assert 1 <= body["steps"] <= 3 and 0 <= body["confidence"] <= 1


def test_refine_code_repair_keeps_trm_only_when_its_answer_parses(client):
    def refine(**pin) -> dict:
        r = client.post("/v1/refine", json={"task": "code_repair", "code": "def add(a, b)\n    return a + b"} | pin)
        assert r.status_code == 200, r.text
        return r.json()

    trm, lm, auto = refine(model="trm"), refine(model="transformer"), refine()  # both greedy
    # the rule: trm's answer when it parses; else the transformer's when that parses; else trm's, the first
    kept = trm if trm["valid"] or not lm["valid"] else lm
    assert (auto["backend"], auto["code"], auto["valid"]) == (kept["backend"], kept["code"], kept["valid"])
    not_kept = [] if trm["valid"] else ["trm"] if kept is lm else ["transformer"]
    assert [a["backend"] for a in auto["switchyard"]["attempts"]] == not_kept


def test_code_too_big_for_trm_goes_to_the_transformer_as_text(client):
    code = "\n".join(f"x{i} = {i}" for i in range(70))
    r = client.post("/v1/refine", json={"task": "code_repair", "code": code})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["backend"] == "transformer" and isinstance(body["code"], str) and body["steps"] is None
    assert body["completion_tokens"] >= 1 and isinstance(body["valid"], bool)
    first = body["switchyard"]["attempts"][0]
    assert first["backend"] == "trm" and "does not fit" in first["error"]
    assert "trm" in r.headers["x-switchyard-fallback"]


def test_code_repair_without_trm_is_a_language_models_job(client):
    r = client.post("/fallback/v1/refine", json={"task": "code_repair", "code": "def f(x)\n    return x"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["backend"] == "transformer" and "as text" in body["switchyard"]["reason"]
    assert not body["switchyard"]["attempts"]  # its answer is the answer, parsed or not
    assert body["valid"] is code_grid.is_valid(body["code"])


def test_classify_base64_and_multipart(client):
    image = png()
    r = client.post("/v1/classify", json={"image": base64.b64encode(image).decode()})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["backend"] == "dinov2" and body["label"] in body["probabilities"]
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-4
    assert body["label"] == max(body["probabilities"], key=body["probabilities"].get)
    uri = client.post("/v1/classify", json={"image": "data:image/png;base64," + base64.b64encode(image).decode()})
    multipart = client.post("/v1/classify", files={"image": ("x.png", image, "image/png")})
    assert uri.json()["probabilities"] == multipart.json()["probabilities"] == body["probabilities"]
    jpeg = client.post("/v1/classify", files={"image": ("x.jpg", png(fmt="JPEG"), "image/jpeg")})
    assert jpeg.status_code == 200


def data_uri(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def image_chat(text: str, *uris: str, **extra) -> dict:
    parts = [{"type": "text", "text": text}, *({"type": "image_url", "image_url": {"url": u}} for u in uris)]
    return chat("", **extra) | {"messages": [{"role": "user", "content": parts}]}


def confident_digit(client, labels: set[str]) -> tuple[str, str]:
    """(data URI, label) of a digit image the served classifier labels in `labels` at 0.5 or more."""
    from training.classifier_default import digits_images

    images, _ = digits_images()
    for image in images[:200]:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        uri = data_uri(buf.getvalue())
        body = client.post("/v1/classify", json={"image": uri}).json()
        if body["label"] in labels and body["confidence"] >= 0.5:
            return uri, body["label"]
    raise AssertionError(f"no digit labelled {labels} with confidence 0.5 in 200")


def test_a_chat_image_picks_the_adapter_its_label_maps_to(client):
    uri, label = confident_digit(client, {"0", "1", "2", "3", "4"})
    r = client.post("/v1/chat/completions", json=image_chat("Write the docstring for this function:", uri))
    assert r.status_code == 200, r.text
    body = r.json()
    image = body["switchyard"]["image"]
    assert (image["backend"], image["label"], image["applied"], image["adapter"]) == ("dinov2", label, True, "pydoc")
    assert image["confidence"] >= image["threshold"] == 0.5
    assert body["model"] == f"{body['switchyard']['backend']}:pydoc"
    assert f"label={label}" in r.headers["x-switchyard-image"] and "adapter=pydoc" in r.headers["x-switchyard-image"]
    # the language model got the text alone, through the adapter: as if the user had named it
    pinned = client.post("/v1/chat/completions", json=chat("Write the docstring for this function:",
                                                           model=body["model"])).json()
    assert pinned["choices"][0]["message"]["content"] == body["choices"][0]["message"]["content"]
    entry = client.get("/v1/routing/log", params={"limit": 3}).json()["data"]
    assert any(e["image"] == image for e in entry)


def test_a_chat_image_whose_label_maps_to_no_adapter_gets_the_base_model(client):
    uri, label = confident_digit(client, {"5", "6", "7", "8", "9"})
    body = client.post("/v1/chat/completions", json=image_chat("hello", uri)).json()
    image = body["switchyard"]["image"]
    assert (image["label"], image["applied"], image["adapter"]) == (label, False, None)
    assert image["reason"] == f"label '{label}' maps to no adapter: base model"
    assert ":" not in body["model"]


def test_a_chat_image_with_the_adapter_given_is_not_classified(client):
    body = client.post("/v1/chat/completions", json=image_chat("hi", data_uri(png()), model="transformer:pydoc")).json()
    assert body["model"] == "transformer:pydoc"
    assert body["switchyard"]["image"] == {"applied": False, "adapter": None,
                                           "reason": "adapter 'pydoc' given by model"}


def test_the_intent_classifier_decides_and_the_log_says_so(client):
    r = client.post("/v1/chat/completions", json=chat("my script dies with IndexError: list index out of range"))
    assert r.status_code == 200 and r.json()["switchyard"]["task"] == "code_repair"
    entry = client.get("/v1/routing/log", params={"limit": 1}).json()["data"][0]
    assert entry["task_source"] == "classifier" and entry["intent"][0] == "code_repair"
    assert f"confidence {entry['intent'][1]:.2f}" in entry["reason"]
    given = client.post("/v1/chat/completions", json=chat("hello", task="reasoning")).json()
    entry = client.get("/v1/routing/log", params={"limit": 1}).json()["data"][0]
    assert given["switchyard"]["task"] == "reasoning" and entry["task_source"] == "explicit"
    assert entry["intent"] is None  # not asked: the request named its task
    client.post("/v1/chat/completions", json=chat("my script dies with IndexError", model="transformer"))
    entry = client.get("/v1/routing/log", params={"limit": 1}).json()["data"][0]
    assert entry["intent"] is None and entry["task_source"] != "classifier"  # pinned: the task picks nothing


def test_routing_log_records_decisions(client):
    client.post("/v1/chat/completions", json=chat("log me"))
    entries = client.get("/v1/routing/log", params={"limit": 2}).json()["data"]
    assert len(entries) == 2
    last = entries[0]
    assert last["endpoint"] == "chat" and last["status"] == 200
    assert last["backend"] == last["chosen"] and last["backend"] in ("mamba", "transformer")
    assert last["reason"] and last["latency_ms"] > 0


def test_routing_log_filters(client):
    since = time.time()
    client.post("/v1/refine", json={"task": "sudoku", "grid": SUDOKU, "max_steps": 1})
    client.post("/v1/chat/completions", json=chat("filter me", max_tokens=2))
    log = lambda **params: client.get("/v1/routing/log", params=params).json()["data"]  # noqa: E731
    assert [e["endpoint"] for e in log(since=since)] == ["chat", "refine"]
    assert [e["endpoint"] for e in log(since=since, backend="trm")] == ["refine"]
    assert [e["endpoint"] for e in log(since=since, reason="PUZZLE_SOLVING")] == ["refine"]
    assert log(since=time.time() + 60) == [] and len(log(limit=1)) == 1
    assert_openai_error(client.get("/v1/routing/log", params={"since": -1}), 400)


def test_routing_log_sink_gets_every_entry_as_a_json_line(client, routing_log_path):
    r = client.post("/fallback/v1/chat/completions", json=chat("to the file", max_tokens=2),
                    headers={"x-request-id": "req-sink-test"})
    assert r.status_code == 200, r.text
    lines = [json.loads(line) for line in routing_log_path.read_text().splitlines()]
    mine = [e for e in lines if e["request_id"] == "req-sink-test"]
    assert len(mine) == 1 and mine[0]["status"] == 200 and mine[0]["backend"] == "transformer"
    assert "req-sink-test" not in client.get("/v1/routing/log").text  # the other app's log


def test_audit_log_has_a_line_per_request_with_tokens_streams_included(client, audit_log_path):
    unary = client.post("/fallback/v1/chat/completions", json=chat("audit me", max_tokens=3),
                        headers={"x-request-id": "req-audit-unary"})
    stream = client.post("/fallback/v1/completions", json={"prompt": "audit the stream", "max_tokens": 3,
                                                           "temperature": 0, "stream": True},
                         headers={"x-request-id": "req-audit-stream"})
    failed = client.post("/fallback/v1/chat/completions", json=chat("audit me", model="mamba"),
                         headers={"x-request-id": "req-audit-failed"})
    assert unary.status_code == stream.status_code == 200 and failed.status_code == 503
    sse(stream)
    found: dict = {}
    for _ in range(50):  # written in batches, 0.2 s apart here
        found = {e["request_id"]: e for e in map(json.loads, audit_log_path.read_text().splitlines())
                 if e["request_id"].startswith("req-audit")} if audit_log_path.exists() else {}
        if len(found) == 3:
            break
        time.sleep(0.1)
    u, st, f = found["req-audit-unary"], found["req-audit-stream"], found["req-audit-failed"]
    assert (f["status"], f["backend"]) == (503, None) and f["error"] == failed.json()["error"]["message"]
    usage = unary.json()["usage"]
    assert (u["caller"], u["endpoint"], u["backend"], u["status"], u["adapter"], u["fallback"]) == \
        ("anonymous", "chat", "transformer", 200, None, False)
    assert (u["prompt_tokens"], u["completion_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert u["prompt"] == "audit me" and u["latency_ms"] > 0 and u["error"] is None
    assert st["endpoint"] == "completions" and st["completion_tokens"] == 3 and st["prompt_tokens"] > 0
    assert st["error"] is None and st["latency_ms"] >= 0


# --- the official openai client -------------------------------------------------------


@pytest.fixture
def oai(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


def test_openai_client(oai):
    models = [m.id for m in oai.models.list()]
    assert "auto" in models and "mamba" in models
    c = oai.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert c.choices[0].message.role == "assistant" and c.usage.completion_tokens <= 5
    t = oai.completions.create(model="transformer", prompt="def", max_tokens=4, temperature=0)
    assert t.choices[0].finish_reason == "length"
    chunks = list(oai.chat.completions.create(model="mamba", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=5, stream=True))
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])


def test_models_retrieve(oai, client):
    m = oai.models.retrieve("transformer")
    assert (m.id, m.object, m.owned_by) == ("transformer", "model", "switchyard")
    adapter = client.get("/v1/models/transformer:pydoc").json()
    assert adapter["parent"] == "transformer" and adapter["switchyard"] == {"kind": "adapter"}
    assert client.get("/v1/models/auto").json()["switchyard"]["kind"] == "router"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-9")
    assert_openai_error(client.get("/v1/models/transformer:nothing"), 404)


# --- fallback -------------------------------------------------------------------------


def test_failed_mamba_falls_back_to_the_transformer(client):
    r = client.post("/fallback/v1/chat/completions", json=chat(LONG_PROMPT, max_tokens=4))
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["x-switchyard-backend"] == "transformer"
    assert "mamba" in r.headers["x-switchyard-fallback"] and "injected failure" in r.headers["x-switchyard-fallback"]
    assert body["switchyard"]["fallback"] is True and body["switchyard"]["task"] == "long_context"
    assert body["switchyard"]["attempts"][0]["backend"] == "mamba"


def test_failed_mamba_falls_back_when_streaming(client):
    r = client.post("/fallback/v1/chat/completions", json=chat("x", model="auto", task="streaming", stream=True))
    assert r.status_code == 200
    assert r.headers["x-switchyard-backend"] == "transformer" and "x-switchyard-fallback" in r.headers
    assert sse(r)[0]["switchyard"]["fallback"] is True


TOO_LONG = "word " * 9000  # more tokens than the transformer's 8192


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_too_long_for_the_transformer_falls_back_degraded(client, stream):
    r = client.post("/fallback/v1/chat/completions", json=chat(TOO_LONG, max_tokens=4, stream=stream))
    assert r.status_code == 200, r.text
    assert r.headers["x-switchyard-backend"] == "transformer"
    assert "middle was cut" in r.headers["x-switchyard-degraded"]
    meta = sse(r)[0]["switchyard"] if stream else r.json()["switchyard"]
    assert meta["degraded"] is True and "8192" in meta["degraded_reason"]
    assert meta["fallback"] is True  # mamba failed first (its circuit never opens in this app)
    if not stream:
        assert r.json()["usage"]["prompt_tokens"] == 8192 - 4
        assert "tokens)" in meta["degraded_reason"]  # how many were cut


def test_pinned_failing_backend_is_503(client):
    r = client.post("/fallback/v1/chat/completions", json=chat("x", model="mamba"))
    assert r.status_code == 503
    assert r.headers["retry-after"] == "1"  # the one rule: router.retry_after_s
    assert_openai_error(r, 503)
    entry = client.get("/fallback/v1/routing/log", params={"limit": 1}).json()["data"][0]
    assert [a["kind"] for a in entry["attempts"]] == ["failed"] and entry["error"].startswith("every capable")


def test_a_failing_backend_opens_its_circuit_and_the_router_says_so(client):
    for _ in range(3):  # unhealthy_after: 3 failed calls in a row (or the circuit is open already)
        client.post("/stubs/v1/chat/completions", json=chat("x", model="broken"))
    models = {m["id"]: m["switchyard"] for m in client.get("/stubs/v1/models").json()["data"]}
    assert models["broken"]["circuit"] == "open" and models["echo"]["circuit"] == "closed"  # cooldown: an hour
    health = client.get("/stubs/healthz")
    assert health.status_code == 200 and health.json()["status"] == "degraded"  # echo still answers
    assert health.json()["backends"]["broken"]["state"] == "circuit open"
    assert health.json()["backends"]["echo"] == {"state": "ok", "live_replicas": 1, "in_flight": 0}
    r = client.post("/stubs/v1/chat/completions", json=chat("x", model="broken"))
    err = assert_openai_error(r, 503)
    assert "unhealthy" in err["message"] and r.headers["retry-after"] == "1"  # router.retry_after_s
    auto = client.post("/stubs/v1/completions", json={"prompt": "hello", "max_tokens": 2})
    assert auto.status_code == 200 and auto.headers["x-switchyard-backend"] == "echo"


# --- bad input --------------------------------------------------------------------------

BAD = [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", {"model": "auto"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", chat("x", max_tokens="many"), 400, "max_tokens"),
    ("/v1/chat/completions", chat("x", max_tokens=100000), 400, "max_tokens"),
    ("/v1/chat/completions", chat("x", n=2), 400, "n"),
    ("/v1/chat/completions", chat("x", temperature=7), 400, "temperature"),
    ("/v1/chat/completions", chat("x", task="poetry"), 400, "task"),
    ("/v1/chat/completions", chat("x", model="gpt-4"), 404, "model"),
    ("/v1/chat/completions", chat("x", model="transformer:nope"), 404, "model"),
    ("/v1/chat/completions", chat("x", model="trm"), 400, None),
    ("/v1/chat/completions", chat("x", documents=[{"page": 1}]), 400, "documents.0.text"),
    ("/v1/completions", {"prompt": 42}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "speculation": "medusa"}, 400, "speculation"),
    ("/v1/completions", {"prompt": "x", "model": "mamba", "speculation": "draft"}, 400, None),
    ("/v1/completions", [1, 2], 400, None),
    ("/v1/route", b"[", 400, None),
    ("/v1/refine", {"grid": [[0] * 9] * 8}, 400, "grid"),
    ("/v1/refine", {"grid": [[0] * 8] * 9}, 400, "grid.0"),
    ("/v1/refine", {"grid": [[10] * 9] * 9}, 400, "grid.0.0"),
    ("/v1/refine", {"grid": SUDOKU, "task": "chess"}, 400, "task"),
    ("/v1/refine", {"grid": SUDOKU, "max_steps": 0}, 400, "max_steps"),
    ("/v1/refine", {"grid": SUDOKU, "max_steps": 1000}, 400, None),
    ("/v1/refine", {"code": "x = 1"}, 400, None),
    ("/v1/refine", {"task": "code_repair"}, 400, None),
    ("/v1/refine", {"task": "code_repair", "code": ""}, 400, "code"),
    ("/v1/refine", {"task": "code_repair", "code": "x = 1", "grid": SUDOKU}, 400, None),
    ("/v1/refine", {"task": "code_repair", "code": "x\n" * 70, "model": "trm"}, 400, None),  # too big for its grid
    ("/v1/classify", {"image": base64.b64encode(b"definitely not an image").decode()}, 400, None),
    ("/v1/classify", {"image": "%%% not base64"}, 400, "image"),
    ("/v1/classify", {"image": base64.b64encode(png(fmt="GIF")).decode()}, 400, None),
    ("/v1/classify", {}, 400, "image"),
    ("/v1/chat/completions", image_chat("x", data_uri(png()), data_uri(png())), 400,
     "messages.0.content.image_url.url"),
    ("/v1/chat/completions", image_chat("x", "https://example.com/cat.png"), 400, "messages.0.content.image_url.url"),
    ("/v1/chat/completions", image_chat("x", "data:image/png;base64,%%%"), 400, "messages.0.content.image_url.url"),
    ("/v1/chat/completions", image_chat("x", "data:image/png," + "abc"), 400, "messages.0.content.image_url.url"),
    ("/v1/chat/completions", image_chat("x", data_uri(b"not an image")), 400, None),
    ("/v1/chat/completions", image_chat("x", data_uri(png(fmt="GIF"))), 400, None),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{p} {i}" for i, (p, *_) in enumerate(BAD)])
def test_bad_input_is_a_clean_4xx(client, path, body, status, param):
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    err = assert_openai_error(r, status)
    if param is not None:
        assert err["param"] == param, err


def test_unknown_path_and_method(client):
    assert_openai_error(client.get("/v1/nothing"), 404)
    assert_openai_error(client.get("/v1/chat/completions"), 405)


def test_multipart_without_image(client):
    assert_openai_error(client.post("/v1/classify", files={"other": ("a.txt", b"x")}), 400)
