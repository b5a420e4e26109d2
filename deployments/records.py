"""What the router keeps of each request: its Outcome (the decision, the attempts, who served it, the
router's own time), the routing log (in memory, and as JSON lines when configured), the audit log, and
the router's metrics on Ray's Prometheus endpoint (ray_switchyard_router_*)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from ray.serve import metrics

from deployments.config import RouterConfig
from deployments.http import ApiError, status_of
from deployments.jsonl import JsonlWriter
from routing.access import ANONYMOUS, Caller
from routing.outcome import Attempt, Kind
from routing.policy import Decision


@dataclass
class Outcome:
    """What happened to one request, for headers, the JSON body and the logs."""

    endpoint: str = ""
    request_id: str = ""
    caller: Caller = ANONYMOUS
    deadline: float = float("inf")  # time.monotonic() by which it is answered
    decision: Decision | None = None
    served_by: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    degraded: str | None = None  # why the answer is not the full one (a cut prompt)
    image: dict[str, Any] | None = None  # a chat image's classification and the adapter it picked
    adapter: str | None = None
    usage: tuple[int, int] | None = None  # prompt and completion tokens
    streaming: bool = False  # its audit line is written when the stream ends
    prompt: str | None = None  # for the audit log, when it records prompts
    status: int = 200
    error: str | None = None  # why it failed, for the audit log
    started: float = field(default_factory=time.perf_counter)
    waited_s: float = 0.0  # time spent waiting on backends
    logged: dict[str, Any] | None = None  # its routing log entry
    ended: bool = False  # a stream's end has been recorded

    def tried(self, backend: str, kind: Kind, error: str, **extra: Any) -> Attempt:
        attempt = Attempt(backend, kind, error, round((time.perf_counter() - self.started) * 1e3, 1), **extra)
        self.attempts.append(attempt)
        return attempt

    def overhead_ms(self) -> float:
        """The router's own time so far: everything but waiting on backends."""
        return round((time.perf_counter() - self.started - self.waited_s) * 1e3, 2)

    @property
    def fallback(self) -> bool:
        return bool(self.attempts)

    def headers(self) -> dict[str, str]:
        h = {"x-switchyard-backend": self.served_by or "", "x-switchyard-overhead-ms": f"{self.overhead_ms():.2f}"}
        if self.decision is not None:
            h["x-switchyard-reason"] = _ascii(self.decision.reason)
        if self.fallback:
            h["x-switchyard-fallback"] = _ascii("; ".join(f"{a.backend}: {a.error}" for a in self.attempts))
        if self.degraded:
            h["x-switchyard-degraded"] = _ascii(self.degraded)
        if self.image:
            i = self.image
            h["x-switchyard-image"] = _ascii(f"label={i.get('label')}; confidence={i.get('confidence')}; "
                                             f"adapter={i.get('adapter')}")
        return h

    def body(self) -> dict[str, Any]:
        d = self.decision
        return {"backend": self.served_by, "task": d.task if d else None, "reason": d.reason if d else None,
                "fallback": self.fallback, "degraded": self.degraded is not None, "degraded_reason": self.degraded,
                "attempts": [asdict(a) for a in self.attempts]} | ({"image": self.image} if self.image else {})


def _ascii(s: str) -> str:
    return s.encode("ascii", "replace").decode()[:512]


class Records:
    def __init__(self, cfg: RouterConfig):
        self.cfg = cfg
        self.log: deque[dict[str, Any]] = deque(maxlen=cfg.routing_log_size)
        self.log_sink = self.audit = None
        if cfg.routing_log_path is not None:
            # a line as each request ends, no fsync on the event loop: the audit log is the durable one
            self.log_sink = JsonlWriter(cfg.routing_log_path, flush_s=0, fsync=False)
        if cfg.audit_log_path is not None:
            self.audit = JsonlWriter(cfg.audit_log_path, flush_s=cfg.audit_flush_s)
        # Ray Serve's metrics API: on Ray's Prometheus endpoint as ray_switchyard_router_*, with
        # Serve's application, deployment and replica tags added.
        self.m_requests = metrics.Counter("switchyard_router_requests", tag_keys=("endpoint", "backend", "status"),
                                          description="Requests answered, by endpoint, serving backend and status.")
        self.m_decisions = metrics.Counter("switchyard_router_decisions", tag_keys=("task", "source", "backend"),
                                           description="Routing decisions: task, how it was inferred, first choice.")
        self.m_fallbacks = metrics.Counter("switchyard_router_fallbacks", tag_keys=("endpoint", "backend", "kind"),
                                           description="Backends a request left for the next candidate, by why.")
        self.m_migrations = metrics.Counter("switchyard_router_migrations", tag_keys=("endpoint", "backend", "to"),
                                            description="Streams continued on another replica or backend after "
                                            "their first byte (to: none when no candidate could).")
        self.m_decide = metrics.Histogram("switchyard_router_decision_seconds", description="Time to decide a route.",
                                          boundaries=[1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2])
        self.m_overhead = metrics.Histogram("switchyard_router_overhead_seconds", tag_keys=("endpoint",),
                                            description="The router's own time per request (features, classifier, "
                                            "decision, shaping), apart from waiting on backends; a stream's up to "
                                            "its first byte.", boundaries=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1])
        self.unhealthy_shown: dict[str, bool] = {}  # backend -> healthy, as the gauge last said
        self.m_unhealthy = metrics.Gauge("switchyard_router_backend_unhealthy", tag_keys=("backend",),
                                         description="1 while the router avoids a backend after failures, else 0.")

    # --- per request -----------------------------------------------------------------

    @contextmanager
    def request(self, endpoint: str, request_id: str, caller: Caller) -> Iterator[Outcome]:
        """The request's Outcome while it is handled; its routing log entry (and audit line) when the
        handler returns or raises. An error's status and message come from the exception."""
        out = Outcome(endpoint, request_id, caller, time.monotonic() + self.cfg.request_timeout_s)
        try:
            yield out
        except Exception as exc:
            out.status, out.error = status_of(exc), getattr(exc, "message", None) or type(exc).__name__
            if isinstance(exc, ApiError) and out.served_by is None and out.attempts:
                exc.headers = {**(exc.headers or {}), **out.headers()}
            raise
        finally:
            self._finish(out)

    def _finish(self, out: Outcome) -> None:
        d = out.decision
        entry = {
            "time": time.time(), "request_id": out.request_id, "caller": out.caller.name, "endpoint": out.endpoint,
            "status": out.status,
            "task": d.task if d else None, "task_source": d.task_source if d else None,
            "chosen": d.backend if d else None, "backend": out.served_by,
            "fallback": out.fallback, "attempts": [asdict(a) for a in out.attempts],
            "reason": d.reason if d else None, "degraded": out.degraded,
            "intent": list(d.intent) if d and d.intent else None, "image": out.image,
            "latency_ms": round((time.perf_counter() - out.started) * 1e3, 2), "overhead_ms": out.overhead_ms(),
            "error": out.error,
        }
        self.log.append(entry)
        out.logged = entry
        self.m_requests.inc(tags={"endpoint": out.endpoint, "backend": out.served_by or "none",
                                  "status": str(out.status)})
        self.m_overhead.observe(entry["overhead_ms"] / 1e3, tags={"endpoint": out.endpoint})
        self.attempted(out, out.attempts)
        if self.log_sink is not None:
            self.log_sink.write(entry)
        if self.audit is not None and not (out.streaming and out.status == 200):
            self._audit(entry, out)

    def attempted(self, out: Outcome, attempts: list[Attempt]) -> None:
        for a in attempts:
            if a.kind is Kind.migrated:
                self.m_migrations.inc(tags={"endpoint": out.endpoint, "backend": a.backend, "to": a.to or "none"})
            else:
                self.m_fallbacks.inc(tags={"endpoint": out.endpoint, "backend": a.backend, "kind": a.kind})

    def ended(self, out: Outcome) -> None:
        """A stream's end: its audit line (with its token counts, or why it was cut short), and the
        attempts made after its first byte."""
        if out.ended:
            return
        out.ended = True
        if out.logged is None:
            return
        later = out.attempts[len(out.logged["attempts"]):]
        self.attempted(out, later)
        entry = out.logged | {"attempts": [asdict(a) for a in out.attempts], "backend": out.served_by,
                              "error": out.error or (None if out.usage else "stream cut short")}
        entry["latency_ms"] = round(entry["latency_ms"] + (time.time() - entry["time"]) * 1e3, 2)
        out.logged.update(attempts=entry["attempts"], backend=out.served_by, error=entry["error"])
        if self.audit is not None:
            self._audit(entry, out)

    def _audit(self, entry: dict[str, Any], out: Outcome) -> None:
        line = {k: entry[k] for k in ("time", "request_id", "caller", "endpoint", "backend", "status", "fallback",
                                      "latency_ms", "error")}
        usage = out.usage
        line |= {"adapter": out.adapter, "prompt_tokens": usage[0] if usage else None,
                 "completion_tokens": usage[1] if usage else None}
        if self.cfg.audit_include_prompt:
            line["prompt"] = out.prompt
        self.audit.write(line)

    # --- decisions and health ----------------------------------------------------------

    def decided(self, decision: Decision, seconds: float) -> None:
        self.m_decide.observe(seconds)
        self.m_decisions.inc(tags={"task": decision.task, "source": decision.task_source.split(":")[0],
                                   "backend": decision.backend})

    def health(self, name: str, healthy: bool) -> None:
        if self.unhealthy_shown.get(name) != healthy:  # set on change: a set costs microseconds
            self.m_unhealthy.set(float(not healthy), tags={"backend": name})
            self.unhealthy_shown[name] = healthy

    def close(self) -> None:
        for writer in (self.log_sink, self.audit):
            if writer is not None:
                writer.close()
