"""Chaos on a four-node cluster (conftest.py): a replica killed under load, the node holding mamba
removed and added back, the node holding one of the two routers removed, and streams that lose
their replica, or every replica of their backend, half-way. Each test starts from the whole cluster
(the `chaos` fixture restores it), in any order."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import httpx
import ray

from tests.chaos.conftest import WORKER_A

# 64 tokens whatever the model says: each of 16 clients always has a request in flight on one of the
# two transformer replicas, so a kill lands on some
SHORT = {"model": "transformer", "prompt": "def add(a, b):", "max_tokens": 64, "ignore_eos": True}
# past the long_document rule's 4096 tokens: mamba first (strategy score), the transformer (8192) next
LONG = {"model": "auto", "prompt": "The appellate court's judgment in the case. " * 520, "max_tokens": 8}


@dataclass
class Record:
    sent: float
    done: float
    status: int  # 0: no HTTP answer
    backend: str | None = None
    attempts: list = field(default_factory=list)
    error: str | None = None


class Load:
    """`clients` threads, each sending `body` again as soon as its last answer came, until stopped."""

    def __init__(self, url: str, body: dict, clients: int, timeout: float = 90):  # past the router's deadline
        self.url, self.body, self.timeout = url, body, timeout
        self.records: list[Record] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        with httpx.Client(base_url=self.url, timeout=self.timeout) as c:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    r = c.post("/v1/completions", json=self.body)
                    sy = r.json().get("switchyard", {}) if r.status_code == 200 else {}
                    rec = Record(sent, time.monotonic(), r.status_code, sy.get("backend"), sy.get("attempts", []),
                                 None if r.status_code == 200 else r.text[:300])
                except httpx.HTTPError as exc:
                    rec = Record(sent, time.monotonic(), 0, error=f"{type(exc).__name__}: {exc}")
                self.records.append(rec)

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(self.timeout + 5)
        assert not any(t.is_alive() for t in self.threads), "a request never ended"

    def wait_for(self, predicate, timeout: float = 300) -> None:  # a cap on waiting, not a speed bound
        start = time.monotonic()
        while not predicate(self.records):
            assert time.monotonic() - start < timeout, self.records[-5:]
            time.sleep(0.1)


def summary(records: list[Record]) -> str:
    by: dict[str, int] = {}
    for r in records:
        key = f"{r.status} {r.backend}"
        by[key] = by.get(key, 0) + 1
    return f"{len(records)} requests: {by}"


def test_a_replica_killed_under_16_clients_fails_no_request(chaos):
    with Load(chaos.url, SHORT, clients=16) as load:
        load.wait_for(lambda rs: len(rs) >= 32)
        victim = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                      if a["name"].startswith("SERVE_REPLICA") and "#transformer#" in a["name"])
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
        killed_at = time.monotonic()
        load.wait_for(lambda rs: sum(r.sent > killed_at + 1 for r in rs) >= 32)
    rs = load.records
    print(summary(rs))
    assert all(r.status == 200 for r in rs), [r for r in rs if r.status != 200][:3]
    in_flight = [r for r in rs if r.sent < killed_at < r.done]
    retried = [r for r in rs if any(a["kind"] == "replica_died" for a in r.attempts)]
    print(f"in flight at the kill: {len(in_flight)}, retried on the other replica: {len(retried)}")
    assert in_flight and retried, "the kill hit no request: nothing was shown"


def test_the_node_holding_mamba_removed_then_added_back(chaos):
    with Load(chaos.url, LONG, clients=2) as load:
        load.wait_for(lambda rs: sum(r.backend == "mamba" for r in rs) >= 2)
        chaos.cluster.remove_node(chaos.nodes["a"], allow_graceful=False)
        removed_at = time.monotonic()
        load.wait_for(lambda rs: sum(r.sent > removed_at for r in rs) >= 6)
    rs = load.records
    print(summary(rs))
    assert all(r.status == 200 for r in rs), [r for r in rs if r.status != 200][:3]
    after = [r for r in rs if r.done > removed_at]
    assert all(r.backend == "transformer" for r in after)
    # when each request left mamba for the transformer, from the later of its sending and the removal
    # (the attempt's time counts from the router's decision, a few ms after sending)
    moved = [round(max(0.0, r.sent + (r.attempts[-1]["after_ms"] / 1e3 if r.attempts else 0) - removed_at)
                   - max(0.0, r.sent - removed_at), 2) for r in after]
    print("moved to the transformer after (s):", moved,
          "answered after (s):", [round(r.done - max(r.sent, removed_at), 2) for r in after])

    chaos.nodes["a"] = chaos.cluster.add_node(**WORKER_A)
    print("mamba running again after", round(chaos.wait_running("mamba", 1), 1), "s")
    start = time.monotonic()
    with httpx.Client(base_url=chaos.url, timeout=90) as c:
        while (r := c.post("/v1/completions", json=LONG)).json()["switchyard"]["backend"] != "mamba":
            assert r.status_code == 200 and time.monotonic() - start < 300, r.text[:300]
            time.sleep(0.5)
    print("mamba served again after", round(time.monotonic() - start, 1), "s more")


def test_two_routers_on_two_nodes_one_node_removed(chaos):
    with Load(chaos.url, SHORT, clients=16) as load:
        load.wait_for(lambda rs: len(rs) >= 32)
        chaos.cluster.remove_node(chaos.nodes["b"], allow_graceful=False)
        removed_at = time.monotonic()
        load.wait_for(lambda rs: sum(r.sent > removed_at + 1 for r in rs) >= 64)
    rs = load.records
    print(summary(rs), [r.error for r in rs if r.status != 200][:3])
    start = time.monotonic()  # the controller saw a router go with its node (it has no node to return to)
    while chaos.replicas("router").get("RUNNING") != 1:
        assert time.monotonic() - start < 300, chaos.replicas("router")
        time.sleep(0.25)
    ok = sum(r.status == 200 for r in rs) / len(rs)
    assert ok >= 0.99, summary(rs)


# 256 tokens whatever the model says, greedy: every stream of the same prompt is the same text
STREAM = {"model": "transformer", "messages": [{"role": "user", "content": "Tell me about the sea."}],
          "max_tokens": 256, "temperature": 0, "ignore_eos": True, "stream": True,
          "stream_options": {"include_usage": True}}


@dataclass
class Stream:
    text: str = ""
    pieces: int = 0
    done: bool = False  # data: [DONE] came
    errors: list = field(default_factory=list)  # error events, or the client's own failure
    usage: dict | None = None
    last: dict = field(default_factory=dict)  # the finishing chunk's switchyard summary

    @property
    def migrated(self) -> list[dict]:
        return [a for a in self.last.get("attempts", []) if a["kind"] == "migrated"]


def stream_clients(url: str, body: dict, clients: int) -> tuple[list[Stream], list[threading.Thread]]:
    """`clients` threads, each reading one stream of `body` into its Stream."""
    streams = [Stream() for _ in range(clients)]

    def read(s: Stream) -> None:
        try:
            with httpx.Client(base_url=url, timeout=90) as c, c.stream("POST", "/v1/chat/completions", json=body) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        s.done = True
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        s.errors.append(event["error"])
                    for choice in event.get("choices", []):
                        s.text += choice["delta"].get("content") or ""
                        s.pieces += 1
                        if choice["finish_reason"] is not None:
                            s.last = event["switchyard"]
                    s.usage = event.get("usage") or s.usage
        except httpx.HTTPError as exc:
            s.errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=read, args=(s,), daemon=True) for s in streams]
    for t in threads:
        t.start()
    return streams, threads


def wait_half_way(streams: list[Stream], pieces: int = 32, timeout: float = 300) -> None:
    start = time.monotonic()
    while not all(s.pieces >= pieces or s.errors for s in streams):  # a cap on waiting, not a speed bound
        assert time.monotonic() - start < timeout, [(s.pieces, s.errors) for s in streams]
        time.sleep(0.02)


def finish(streams: list[Stream], threads: list[threading.Thread]) -> None:
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a stream never ended"
    print("tokens each stream had when it moved:", [[m["tokens"] for m in s.migrated] for s in streams])
    assert all(s.done and not s.errors for s in streams), [s.errors for s in streams if s.errors]
    assert all(s.usage["completion_tokens"] == 256 for s in streams), [s.usage for s in streams]


def test_streams_continue_on_the_other_replica_when_theirs_is_killed(chaos):
    victim = chaos.running_replica("transformer")  # found first: the kill is then at once
    streams, threads = stream_clients(chaos.url, STREAM, clients=16)
    wait_half_way(streams)
    ray.kill(victim, no_restart=True)
    finish(streams, threads)
    moved = [s for s in streams if s.migrated]
    assert moved, "the kill hit no stream: nothing was shown"
    assert all(m["to"] == "transformer" and 0 < m["tokens"] < 256 for s in moved for m in s.migrated)
    # the token ids went with the request: the continued text is the uninterrupted greedy answer
    whole = [s for s in streams if not s.migrated]
    assert whole, "every stream was moved: none to compare with"
    assert all(s.text == whole[0].text for s in streams)


def test_streams_continue_on_mamba_when_the_node_of_every_transformer_replica_goes(chaos):
    body = STREAM | {"model": "auto", "task": "text_generation"}  # the transformer first, mamba next
    with httpx.Client(base_url=chaos.url, timeout=90) as c:
        route = c.post("/v1/route", json=body).json()
    assert (route["backend"], route["fallbacks"]) == ("transformer", ["mamba"]), route
    streams, threads = stream_clients(chaos.url, body, clients=16)
    wait_half_way(streams)
    chaos.cluster.remove_node(chaos.nodes["c"], allow_graceful=False)
    finish(streams, threads)
    moved = [s for s in streams if s.migrated]
    assert moved, "the removal hit no stream: nothing was shown"
    # a stream that had finished on the transformer before the node went has nothing to show
    assert all(s.last["backend"] == "mamba" and s.migrated[-1]["to"] == "mamba" for s in moved)
    assert all(s.last["backend"] == "transformer" for s in streams if not s.migrated)
