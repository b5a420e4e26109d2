"""The router: FastAPI ingress, routing.Policy for the decision, handles for the calls, fallback.

Status codes are chosen here and only here (STYLE 7): backends answer with values, the policy
raises RoutingError, and the handlers below turn both into OpenAI-shaped errors.
"""


import asyncio
import base64
import binascii
import inspect
import json
import logging
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.serve import metrics
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, RequestCancelledError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.api import (
    ChatCompletionRequest,
    ClassifyRequest,
    CompletionRequest,
    ImagePart,
    RefineRequest,
    new_id,
    now,
    openai_error,
)
from deployments.config import AppConfig
from deployments.jsonl import JsonlWriter
from deployments.protocol import Failure
from deployments.replicas import BackendLost, ReplicaWatch, serve_fetch, until_lost
from models import code_grid
from models.engine import Completion, Delta, GenerationRequest
from routing.access import ANONYMOUS, Access, AccessError, Caller, RateLimiter
from routing.breaker import CircuitBreaker
from routing.config import TASKS
from routing.features import Features, split_model, text_features
from routing.policy import BackendState, Decision, Policy, RoutingError, choose_adapter
from training.corpus import FIX_PROMPT
from models.checkpoints import resolve_model

logger = logging.getLogger(__name__)

app = FastAPI(title="Switchyard", version="0.1.0", description="One endpoint for several model architectures.")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers


_ROUTING_STATUS = {"invalid": 400, "not_found": 404, "unavailable": 503, "forbidden": 403}
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}


def _error(status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None,
           type_: str | None = None) -> JSONResponse:
    type_ = type_ or _TYPES.get(status, "internal_server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse(openai_error(message, type_, param), status_code=status, headers=headers)


@app.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return _error(exc.status, exc.message, exc.param, exc.headers, exc.type)


@app.exception_handler(AccessError)
async def _access_error(_: Request, exc: AccessError) -> JSONResponse:
    return _error(exc.status, exc.message, headers=_access_headers(exc))


def _access_headers(exc: AccessError) -> dict[str, str] | None:
    if exc.status == 401:
        return {"WWW-Authenticate": "Bearer"}
    if exc.retry_after is not None:
        return {"Retry-After": str(max(1, round(exc.retry_after + 0.5)))}
    return None


# path -> the endpoint name roles permit (routing.access.ENDPOINTS)
_ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/route": "route",
              "/v1/refine": "refine", "/v1/classify": "classify", "/v1/models": "models",
              "/v1/routing/log": "routing_log"}
_OPEN = {"/healthz"}  # no caller needed
_OVERLOADED = "overloaded: its queue is full"
_NO_REPLICA = "no live replica (Serve would hold the call until one starts)"


class _BodyTooLarge(Exception):
    pass


class _Guard:
    """ASGI middleware in front of every route: the body size limit (413), then the caller
    (401, 403 for the endpoint, 429 for its request rate). The caller goes to the handlers in
    `request.state.caller`. It reads the Router through `app.state.switchyard`, set at start."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        router: Router | None = getattr(scope["app"].state, "switchyard", None)
        if router is None:  # not started: fail closed
            return await _send_error(scope, receive, send, 503, "the router is starting", "service_unavailable")
        if router.active >= router.cfg.router.max_in_flight:  # before Serve's proxy would queue: see config
            return await _send_error(scope, receive, send, 503, f"this router replica is handling "
                                     f"{router.active} requests, its limit; retry shortly", "service_unavailable",
                                     {"Retry-After": "1"})
        router.active += 1
        try:
            await self._admitted(router, scope, receive, send)
        finally:
            router.active -= 1

    async def _admitted(self, router: "Router", scope: dict, receive: Callable, send: Callable) -> None:
        limit = router.cfg.router.max_body_bytes
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _send_error(scope, receive, send, 413, f"request body is {int(length)} bytes; the limit is "
                                     f"{limit}", "invalid_request_error")
        path, root = scope.get("path", ""), scope.get("root_path", "").rstrip("/")
        if root and (path == root or path.startswith(root + "/")):  # the app's own path under a route prefix
            path = path[len(root):] or "/"
        if path not in _OPEN:
            try:
                caller = router.access.authenticate(headers.get(b"authorization", b"").decode("latin-1") or None)
                endpoint = _ENDPOINTS.get(path)
                if endpoint is not None and not caller.may_call(endpoint):
                    raise AccessError(403, f"caller {caller.name!r} may not call {path}")
                if endpoint is not None:
                    router.limiter.take(caller, "requests", 1)
            except AccessError as exc:
                return await _send_error(scope, receive, send, exc.status, exc.message, None, _access_headers(exc))
            scope.setdefault("state", {})["caller"] = caller
        seen, too_large, answered = 0, False, False
        too_large_error = f"request body is over the limit of {limit} bytes"

        async def counted() -> dict:  # a body without content-length is counted as it arrives
            nonlocal seen, too_large
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                too_large = True
                raise _BodyTooLarge()
            return message

        async def guarded(message: dict) -> None:  # once the body is too large, the answer is the 413
            nonlocal answered
            if too_large:
                if not answered:
                    answered = True
                    await _send_error(scope, receive, send, 413, too_large_error, "invalid_request_error")
                return
            answered = answered or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except _BodyTooLarge:
            if not answered:
                await _send_error(scope, receive, send, 413, too_large_error, "invalid_request_error")


async def _send_error(scope: dict, receive: Callable, send: Callable, status: int, message: str,
                      type_: str | None, headers: dict[str, str] | None = None) -> None:
    await _error(status, message, headers=headers, type_=type_)(scope, receive, send)


app.add_middleware(_Guard)


def _caller(request: Request) -> Caller:
    return getattr(request.state, "caller", ANONYMOUS)


@app.exception_handler(RoutingError)
async def _routing_error(_: Request, exc: RoutingError) -> JSONResponse:
    status = _ROUTING_STATUS[exc.kind]
    headers = {"Retry-After": "5"} if status == 503 else None
    return _error(status, exc.message, exc.param, headers, "model_not_found" if status == 404 else None)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return _error(400, *_describe(exc.errors()))


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


@app.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error in the router")
    return _error(500, "internal error; the router's log has the details", type_="internal_server_error")


def _describe(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """pydantic's errors as one message and the first offending field, without echoing input."""
    parts, param = [], None
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        if e.get("type") == "json_invalid":
            return f"request body is not valid JSON: {e.get('ctx', {}).get('error', e['msg'])}", None
        param = param or loc or None
        parts.append(f"{loc}: {e['msg']}" if loc else e["msg"])
    return "; ".join(parts) or "invalid request", param


async def _json_body(request: Request, model: type) -> Any:
    raw = await request.body()
    try:
        return model.model_validate_json(raw or b"null")
    except ValidationError as exc:
        message, param = _describe(exc.errors())
        raise ApiError(400, message, param=param) from None


@dataclass
class _Attempt:
    backend: str
    error: str
    after_ms: float  # since the decision: when the router gave up on this backend


@dataclass
class _Outcome:
    """What happened to one request, for headers, the JSON body and the routing log."""

    decision: Decision
    served_by: str | None = None
    attempts: list[_Attempt] = field(default_factory=list)
    degraded: str | None = None  # why the answer is not the full one (a cut prompt)
    image: dict[str, Any] | None = None  # a chat image's classification and the adapter it picked
    adapter: str | None = None
    usage: tuple[int, int] | None = None  # prompt and completion tokens, for the audit log
    streaming: bool = False  # its audit line is written when the stream ends
    prompt: str | None = None  # for the audit log, when it records prompts
    logged: dict[str, Any] | None = None  # its routing log entry
    started: float = field(default_factory=time.perf_counter)
    ended: bool = False  # a stream's end has been handled (its audit line written)

    def tried(self, backend: str, error: str) -> None:
        self.attempts.append(_Attempt(backend, error, round((time.perf_counter() - self.started) * 1e3, 1)))

    def headers(self) -> dict[str, str]:
        h = {"x-switchyard-backend": self.served_by or "", "x-switchyard-reason": _ascii(self.decision.reason)}
        if self.fallback:
            h["x-switchyard-fallback"] = _ascii("; ".join(f"{a.backend}: {a.error}" for a in self.attempts))
        if self.degraded:
            h["x-switchyard-degraded"] = _ascii(self.degraded)
        if self.image:
            i = self.image
            h["x-switchyard-image"] = _ascii(f"label={i.get('label')}; confidence={i.get('confidence')}; "
                                             f"adapter={i.get('adapter')}")
        return h

    @property
    def fallback(self) -> bool:
        return bool(self.attempts)

    def body(self) -> dict[str, Any]:
        d = self.decision
        return {"backend": self.served_by, "task": d.task, "reason": d.reason, "fallback": self.fallback,
                "degraded": self.degraded is not None, "degraded_reason": self.degraded,
                "attempts": [asdict(a) for a in self.attempts]} | ({"image": self.image} if self.image else {})


def _for(out: _Outcome, name: str, arg: Any) -> Any:
    """The request as backend `name` gets it: cut to fit when it is a degraded fallback."""
    if name in out.decision.degraded and isinstance(arg, GenerationRequest):
        return replace(arg, truncate=True)
    return arg


def _repair_from(result: Completion) -> dict[str, Any]:
    """A language model's code repair in the shape of trm's answer."""
    return {"code": result.text, "valid": code_grid.is_valid(result.text), "steps": None, "confidence": None,
            "completion_tokens": result.completion_tokens, "finish_reason": result.finish_reason}


def _unparsed(result: dict[str, Any]) -> str | None:
    return None if result["valid"] else "the repaired code does not parse"


def _ascii(s: str) -> str:
    return s.encode("ascii", "replace").decode()[:512]


def _capacity(replicas: int | str, per_replica: int) -> int:
    return (replicas if isinstance(replicas, int) else 1) * per_replica


def _base64(data: str, param: str) -> bytes:
    """Bytes of base64 text or of a base64 data: URI."""
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if not header.endswith(";base64"):
            raise ApiError(400, f"{param}: only base64 data: URIs are accepted", param=param)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{param} is not valid base64", param=param) from None


async def _image_from(request: Request) -> tuple[bytes, str]:
    """The image bytes and `model` from a JSON body (base64 or data URI) or a multipart upload."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("image") or form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "multipart body needs a file field named 'image'", param="image")
        return await upload.read(), str(form.get("model") or "auto")
    body = await _json_body(request, ClassifyRequest)
    return _base64(body.image, "image"), body.model


def _chat_image(body: ChatCompletionRequest) -> bytes | None:
    """The image of a chat request (an image_url part with a data: URI), or None; one at most."""
    parts = [(i, p) for i, m in enumerate(body.messages) if isinstance(m.content, list)
             for p in m.content if isinstance(p, ImagePart)]
    if not parts:
        return None
    i, part = parts[0]
    param = f"messages.{i}.content.image_url.url"
    if len(parts) > 1:
        raise ApiError(400, f"{len(parts)} images in one request; an image picks the adapter, so one is accepted",
                       param=param)
    if not part.image_url.url.startswith("data:"):
        raise ApiError(400, "image_url must be a base64 data: URI; this server fetches no URLs", param=param)
    return _base64(part.image_url.url, param)


def _completion_body(result: Completion, chat: bool, model: str, out: _Outcome) -> dict[str, Any]:
    usage = {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
             "total_tokens": result.prompt_tokens + result.completion_tokens}
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                  "finish_reason": result.finish_reason, "logprobs": None}
        return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": model,
                "choices": [choice], "usage": usage, "switchyard": out.body()}
    choice = {"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}
    return {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": model,
            "choices": [choice], "usage": usage, "switchyard": out.body()}


async def _sse(gen: Any, first: Delta, chat: bool, model: str, out: _Outcome, deadline: float,
               include_usage: bool, on_end: Callable[[Delta | Failure | None], None]) -> AsyncIterator[str]:
    """OpenAI chunk events from backend deltas; ends with `data: [DONE]`. Cancels the backend's
    generation when the client goes away (Starlette cancels this generator). `on_end` gets the last
    piece: the finishing Delta, a Failure, or None when the stream was cut."""
    cid, created = new_id("chatcmpl" if chat else "cmpl"), now()
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, role: bool = False, **extra: Any) -> str:
        if chat:
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return "data: " + json.dumps({"id": cid, "object": obj, "created": created, "model": model,
                                      "choices": [choice], **extra}) + "\n\n"

    item: Delta | Failure = first
    extra: dict[str, Any] = {"switchyard": out.body()}  # on the first chunk only
    try:
        if chat:
            yield chunk("", None, role=True, **extra)
            extra = {}
        while True:
            if isinstance(item, Failure):  # after the first byte no fallback is possible: say so
                yield "data: " + json.dumps(openai_error(item.message, "internal_server_error")) + "\n\n"
                break
            if item.text:
                yield chunk(item.text, None, **extra)
                extra = {}
            if item.finish_reason is not None:
                yield chunk(None if chat else "", item.finish_reason, **extra)
                if include_usage:
                    usage = {"prompt_tokens": item.prompt_tokens, "completion_tokens": item.completion_tokens,
                             "total_tokens": item.prompt_tokens + item.completion_tokens}
                    yield "data: " + json.dumps({"id": cid, "object": obj, "created": created, "model": model,
                                                 "choices": [], "usage": usage}) + "\n\n"
                break
            try:
                item = await asyncio.wait_for(gen.__anext__(), deadline - time.monotonic())
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                item = Failure("internal", "request deadline passed mid-stream")
                yield "data: " + json.dumps(openai_error(item.message, "timeout")) + "\n\n"
                break
            except (RayActorError, RayTaskError) as exc:
                item = Failure("internal", f"backend failed mid-stream: {type(exc).__name__}")
                yield "data: " + json.dumps(openai_error(item.message, "internal_server_error")) + "\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        gen.cancel()
        on_end(item if isinstance(item, Failure) or item.finish_reason is not None else None)


def _on_drop(events: AsyncIterator[str], gen: Any, out: _Outcome,
             on_end: Callable[[Delta | Failure | None], None]) -> None:
    """When Starlette drops `events` without starting it (the client left before the first byte
    went out), `_sse`'s finally never runs: this cancels the backend's generation and ends the
    stream (its audit line) all the same."""
    def dropped() -> None:
        if not out.ended:
            gen.cancel()
            on_end(None)

    weakref.finalize(events, dropped)


# serve.ingress pickles the app when it decorates: everything the class uses is defined above.
@serve.ingress(app)
class Router:
    def __init__(self, cfg: AppConfig, handles: dict[str, DeploymentHandle]):
        self.cfg = cfg
        self.handles = handles
        self.kinds = {b.name: b.kind for b in cfg.backends}
        self.policy = Policy(
            {b.name: b.capability for b in cfg.backends},
            cfg.routing,
            adapters={b.name: list(getattr(b, "adapters", {})) for b in cfg.backends},
        )
        self.states = {
            b.name: BackendState(capacity=_capacity(b.deployment.num_replicas, b.deployment.max_ongoing_requests))
            for b in cfg.backends
        }
        self.active = 0  # HTTP requests in progress here (_Guard)
        self.per_replica = {b.name: b.deployment.max_ongoing_requests for b in cfg.backends}
        r = cfg.router
        self.breakers = {b.name: CircuitBreaker(r.unhealthy_after, r.unhealthy_cooldown_s, r.breaker_failure_rate,
                                                r.breaker_window) for b in cfg.backends}
        try:
            app_name = serve.get_replica_context().app_name
        except Exception:  # built outside a replica (unit tests): every backend taken as running
            app_name = None
        self.watch = ReplicaWatch(self.handles, serve_fetch(app_name, self.handles), poll_s=r.replica_poll_s)
        self.watching = app_name is not None
        self.log: deque[dict[str, Any]] = deque(maxlen=cfg.router.routing_log_size)
        self.log_sink = self.audit = None
        if cfg.router.routing_log_path is not None:
            # a line as each request ends, no fsync on the event loop: the audit log is the durable one
            self.log_sink = JsonlWriter(cfg.router.routing_log_path, flush_s=0, fsync=False)
        if cfg.router.audit_log_path is not None:
            self.audit = JsonlWriter(cfg.router.audit_log_path, flush_s=cfg.router.audit_flush_s)
        self.started = now()
        from transformers import AutoTokenizer  # the router process needs it only here

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.router.tokenizer))
        fast = getattr(tokenizer, "backend_tokenizer", None)  # the Rust tokenizer: half the cost per call

        def count_tokens(text: str) -> int:
            if fast is not None:
                return len(fast.encode(text, add_special_tokens=False).ids)
            return len(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)

        self.count_tokens = count_tokens
        # Ray Serve's metrics API: on Ray's Prometheus endpoint as ray_switchyard_router_*, with
        # Serve's application, deployment and replica tags added.
        self.m_requests = metrics.Counter("switchyard_router_requests", tag_keys=("endpoint", "backend", "status"),
                                          description="Requests answered, by endpoint, serving backend and status.")
        self.m_decisions = metrics.Counter("switchyard_router_decisions", tag_keys=("task", "source", "backend"),
                                           description="Routing decisions: task, how it was inferred, first choice.")
        self.m_fallbacks = metrics.Counter("switchyard_router_fallbacks", tag_keys=("endpoint", "backend"),
                                           description="Calls that moved on to the next candidate, by the backend left.")
        self.m_decide = metrics.Histogram("switchyard_router_decision_seconds", description="Time to decide a route.",
                                          boundaries=[1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2])
        self.unhealthy_shown: dict[str, bool] = {}  # backend -> healthy, as the gauge last said
        self.m_unhealthy = metrics.Gauge("switchyard_router_backend_unhealthy", tag_keys=("backend",),
                                         description="1 while the router avoids a backend after failures, else 0.")
        self.access = Access(cfg.auth)
        replicas = cfg.router.deployment.num_replicas
        if not isinstance(replicas, int):
            replicas = (cfg.router.deployment.autoscaling_config or {}).get("max_replicas", 1)
        self.limiter = RateLimiter(replicas=replicas)  # each router replica holds 1/replicas of every limit
        self.intent = None
        if cfg.routing.intent is not None:
            from models.intent import IntentClassifier

            self.intent = IntentClassifier.load(resolve_model(cfg.routing.intent.model))
            if unknown := sorted(set(self.intent.config.labels) - set(TASKS)):
                raise ValueError(f"routing.intent.model {cfg.routing.intent.model} predicts tasks {unknown} "
                                 f"that are not tasks of this router: {', '.join(TASKS)}")
        app.state.switchyard = self  # _Guard admits requests from here on

    # --- decision -------------------------------------------------------------------

    def _decide(self, f: Features, as_text: Features | None = None) -> Decision:
        start = time.perf_counter()
        if self.watching:
            self.watch.start()
        for name, state in self.states.items():
            state.healthy = self.breakers[name].available() and self.watch.available(name)
            if (live := self.watch.live(name)) is not None:  # autoscaled: the replicas running now
                state.capacity = max(1, live) * self.per_replica[name]
            if self.unhealthy_shown.get(name) != state.healthy:  # set on change: a set costs microseconds
                self.m_unhealthy.set(float(not state.healthy), tags={"backend": name})
                self.unhealthy_shown[name] = state.healthy
        decision = self.policy.decide(f, self.states, as_text)
        self.m_decide.observe(time.perf_counter() - start)
        self.m_decisions.inc(tags={"task": decision.task, "source": decision.task_source.split(":")[0],
                                   "backend": decision.backend})
        return decision

    async def _features(self, endpoint: str, body: ChatCompletionRequest | CompletionRequest,
                        caller: Caller) -> Features:
        """The text request's features, for `caller`; the intent classifier's guess when the task is not given."""
        if isinstance(body, ChatCompletionRequest):
            prompt = "\n".join(m.text() for m in body.messages)
            query = next((m.text() for m in reversed(body.messages) if m.role == "user"), prompt)
        else:
            prompt = query = body.prompt
        max_new = body.new_tokens(self.cfg.router.default_max_tokens)
        if max_new > self.cfg.router.max_tokens:
            raise ApiError(400, f"max_tokens {max_new} is above this server's limit of {self.cfg.router.max_tokens}",
                           param="max_tokens")
        f = text_features(endpoint=endpoint, prompt=prompt, documents=body.docs(), count_tokens=self.count_tokens,
                          max_new_tokens=max_new, model=body.model, task=body.task, query=query)
        f = replace(f, caller=caller)
        if self.intent is not None and f.task is None and f.backend is None and f.query.strip():
            # Only where the task picks the backend: a pinned model goes where it names whatever the task.
            # A thread: the MiniLM encoder takes milliseconds (bench.classifier) the event loop should not wait out.
            guess = await asyncio.to_thread(self.intent.predict, f.query)
            f = replace(f, intent=(guess.task, round(guess.confidence, 4)))
        return f

    async def _image_choice(self, image: bytes, f: Features, deadline: float) -> tuple[Features, dict[str, Any]]:
        """Classifies a chat request's image; a confident label picks the adapter its config maps it to.
        The summary says what was decided and why, for the response and the routing log."""
        if f.adapter is not None:
            return f, {"applied": False, "adapter": None, "reason": f"adapter {f.adapter!r} given by model"}
        g = Features(endpoint="chat", modality="image", tokens=0, max_new_tokens=0, pages=0, text="",
                     task="image_classification", caller=f.caller)
        try:
            out = _Outcome(self._decide(g))
        except RoutingError as exc:
            if exc.kind == "forbidden":
                return f, {"applied": False, "adapter": None,
                           "reason": f"image not classified: caller {f.caller.name} may not use a classifier"}
            if exc.kind != "unavailable":
                raise ApiError(400, "this server has no image classifier to read the image with (a chat image "
                               "picks the adapter through one)", param="messages") from None
            return f, {"applied": False, "adapter": None, "reason": f"image not classified: {exc.message}"}
        try:
            result = await self._call(out, "classify", image, deadline)
        except ApiError as exc:
            if exc.status == 400:  # the image itself is at fault
                raise
            return f, {"applied": False, "adapter": None, "reason": f"image not classified: {exc.message}"}
        cfg = self.cfg.backend(out.served_by)
        label, confidence = result["label"], round(result["confidence"], 4)
        choice = choose_adapter(label, confidence, cfg.label_adapters, cfg.adapter_min_confidence, f.backend)
        summary = {"backend": out.served_by, "label": label, "confidence": confidence, "applied": choice.applied,
                   "adapter": choice.adapter, "threshold": cfg.adapter_min_confidence, "reason": choice.reason}
        adapter = (choice.adapter or "").rpartition(":")[2]
        if choice.applied and not any(f.caller.may_use(b, adapter) for b, names in self.policy.adapters.items()
                                      if adapter in names and choice.backend in (None, b)):
            summary |= {"applied": False, "adapter": None,
                        "reason": f"{choice.reason}, but caller {f.caller.name} may not use {choice.adapter}: base model"}
        elif choice.applied:
            f = replace(f, adapter=adapter, backend=choice.backend)
        return f, summary

    # --- calls with fallback -------------------------------------------------------

    async def _call(self, out: _Outcome, method: str, arg: Any, deadline: float,
                    as_text: tuple[str, Any, Callable[[Any], Any]] | None = None,
                    check: Callable[[Any], str | None] | None = None) -> Any:
        """Calls the decision's candidates in order until one answers; returns its result. The
        decision's `as_text` backends get `as_text`'s (method, arg) instead, and their answers go
        through its converter. An answer that `check` faults (a repair that does not parse) moves on
        to the next candidate; when none does better, the first such answer is the result."""
        kept: tuple[str, Any] | None = None
        pending = deque(out.decision.candidates)
        while pending:
            name = pending.popleft()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if not self._may_call(out, name):
                continue
            text = as_text is not None and name in out.decision.as_text
            m, a = as_text[:2] if text else (method, arg)
            state = self.states[name]
            state.in_flight += 1
            response = getattr(self.handles[name], m).remote(_for(out, name, a))
            try:
                result = await until_lost(self.watch, name, response, remaining)
            except asyncio.TimeoutError:
                response.cancel()
                self._failed(out, name, f"no answer within the {self.cfg.router.request_timeout_s:g} s deadline")
                break
            except BackendLost:
                response.cancel()
                out.tried(name, _NO_REPLICA)
                continue
            except BackPressureError:  # full, not broken: no mark against its circuit
                out.tried(name, _OVERLOADED)
                continue
            except RayActorError as exc:
                if self._replica_died(out, name, exc):
                    pending.appendleft(name)
                continue
            except (RayTaskError, RequestCancelledError) as exc:
                self._failed(out, name, f"{type(exc).__name__}")
                continue
            finally:
                state.in_flight -= 1
            if self._answered(out, name, result):
                if text:
                    result = as_text[2](result)
                fault = check(result) if check is not None else None
                if fault is None:
                    return result
                out.tried(name, f"answer not kept: {fault}")
                kept = kept or (name, result)
        if kept is not None:  # no answer passed the check: the first one is the answer after all
            out.served_by = kept[0]
            out.attempts = [a for a in out.attempts if a.backend != kept[0] or not a.error.startswith("answer not kept")]
            return kept[1]
        raise self._exhausted(out, deadline)

    def _answered(self, out: _Outcome, name: str, result: Any) -> bool:
        """True when `result` is an answer; a Failure is a 400 (request at fault) or a recorded failure."""
        if isinstance(result, Failure):
            if result.kind == "unsupported" or (result.kind == "invalid" and name in out.decision.degraded):
                # this backend cannot take it, or the cut-down last resort refused it: the others may
                why = "cannot take it" if result.kind == "unsupported" else "degraded fallback refused"
                out.tried(name, f"{why}: {result.message}")
                return False
            if result.kind == "invalid":
                self.breakers[name].record(failed=False)  # the backend is fine: the request is not
                raise ApiError(400, result.message)
            self._failed(out, name, result.message)
            return False
        self.breakers[name].record(failed=False)
        out.served_by = name
        cut = getattr(result, "truncated_tokens", 0)  # the engine's count: the router's estimate may differ
        if name in out.decision.degraded and cut:
            out.degraded = f"{name}: {out.decision.degraded[name]} ({cut} tokens)"
        return True

    def _may_call(self, out: _Outcome, name: str) -> bool:
        """Whether `name` may be called now: a live replica and a closed circuit (or its probe's turn)."""
        if not self.watch.available(name):
            out.tried(name, _NO_REPLICA)
            return False
        if not self.breakers[name].try_call():
            out.tried(name, f"circuit {self.breakers[name].state}")
            return False
        return True

    def _replica_died(self, out: _Outcome, name: str, exc: RayActorError) -> bool:
        """A call failed because its replica died (or became unreachable): Serve does not retry it. The
        request tries the same backend once more when it has another live replica (Serve's handle
        routes around the dead one); otherwise, or the second time, it counts as the backend failing.
        True: retry `name`."""
        self.watch.died(name, exc.actor_id)
        error = f"replica died: {type(exc).__name__}"
        if self.watch.available(name) and not any(a.backend == name and a.error.startswith("replica died")
                                                  for a in out.attempts):
            out.tried(name, error + "; retried on another replica")
            return True
        self._failed(out, name, error)
        return False

    def _failed(self, out: _Outcome, name: str, error: str) -> None:
        logger.warning("backend %s failed: %s", name, error)
        out.tried(name, error)
        self.breakers[name].record(failed=True)

    def _exhausted(self, out: _Outcome, deadline: float) -> ApiError:
        tried = "; ".join(f"{a.backend}: {a.error}" for a in out.attempts) or "none"
        if out.attempts and all(a.error.startswith("cannot take it") for a in out.attempts):
            return ApiError(400, f"no backend can take this request: {tried}")
        if time.monotonic() >= deadline or any("deadline" in a.error for a in out.attempts):
            return ApiError(504, f"request deadline passed; tried {tried}", type_="timeout")
        if out.attempts and all(a.error == _OVERLOADED for a in out.attempts):
            return ApiError(503, f"every capable backend is at capacity; tried {tried}", type_="service_unavailable",
                            headers={"Retry-After": "1"})
        retry = max(1, round(self.cfg.router.unhealthy_cooldown_s))
        return ApiError(503, f"every capable backend failed; tried {tried}", type_="service_unavailable",
                        headers={"Retry-After": str(retry)})

    async def _open_stream(self, out: _Outcome, req: GenerationRequest, deadline: float
                           ) -> tuple[Any, Delta]:
        """Starts a stream on the first candidate that yields a first piece (fallback before any byte)."""
        pending = deque(out.decision.candidates)
        while pending:
            name = pending.popleft()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if not self._may_call(out, name):
                continue
            gen = self.handles[name].options(stream=True).stream.remote(_for(out, name, req))
            try:
                first = await until_lost(self.watch, name, gen.__anext__(), remaining)
            except asyncio.TimeoutError:
                gen.cancel()
                self._failed(out, name, "no first token before the deadline")
                break
            except BackendLost:
                gen.cancel()
                out.tried(name, _NO_REPLICA)
                continue
            except BackPressureError:
                gen.cancel()
                out.tried(name, _OVERLOADED)
                continue
            except RayActorError as exc:
                gen.cancel()
                if self._replica_died(out, name, exc):
                    pending.appendleft(name)
                continue
            except (RayTaskError, RequestCancelledError, StopAsyncIteration) as exc:
                gen.cancel()
                self._failed(out, name, type(exc).__name__)
                continue
            if isinstance(first, Failure):
                gen.cancel()
            if self._answered(out, name, first):
                return gen, first
        raise self._exhausted(out, deadline)

    # --- logging ---------------------------------------------------------------------

    def _record(self, endpoint: str, out: _Outcome | None, status: int, started: float, request_id: str,
                caller: Caller) -> None:
        d = out.decision if out else None
        entry = {
            "time": time.time(), "request_id": request_id, "caller": caller.name, "endpoint": endpoint,
            "status": status,
            "task": d.task if d else None, "task_source": d.task_source if d else None,
            "chosen": d.backend if d else None, "backend": out.served_by if out else None,
            "fallback": out.fallback if out else False, "attempts": [asdict(a) for a in out.attempts] if out else [],
            "reason": d.reason if d else None, "degraded": out.degraded if out else None,
            "intent": list(d.intent) if d and d.intent else None, "image": out.image if out else None,
            "latency_ms": round((time.perf_counter() - started) * 1e3, 2),
        }
        self.log.append(entry)
        if out is not None:
            out.logged = entry
        self.m_requests.inc(tags={"endpoint": endpoint, "backend": entry["backend"] or "none", "status": str(status)})
        for attempt in out.attempts if out else ():
            self.m_fallbacks.inc(tags={"endpoint": endpoint, "backend": attempt.backend})
        if self.log_sink is not None:
            self.log_sink.write(entry)
        if self.audit is not None and not (out is not None and out.streaming and status == 200):
            self._audit(entry, out)

    def _audit(self, entry: dict[str, Any], out: _Outcome | None) -> None:
        """The request's audit line; a stream's when it ends (with its token counts)."""
        usage = out.usage if out is not None else None
        line = {k: entry[k] for k in ("time", "request_id", "caller", "endpoint", "backend", "status", "fallback",
                                      "latency_ms")} | {"error": entry.get("error")}
        line |= {"adapter": out.adapter if out else None, "prompt_tokens": usage[0] if usage else None,
                 "completion_tokens": usage[1] if usage else None}
        if self.cfg.router.audit_include_prompt:
            line["prompt"] = out.prompt if out else None
        self.audit.write(line)

    def _ended(self, out: _Outcome, last: Delta | Failure | None) -> None:
        """A stream's audit line, when it has ended: cut short (the client left or the deadline passed)
        or failed mid-stream is in `error`. A mid-stream failure counts against the backend's circuit
        (its success was counted at the first piece)."""
        out.ended = True
        if isinstance(last, Failure) and out.served_by is not None and "deadline" not in last.message:
            self.breakers[out.served_by].record(failed=True)
        if self.audit is None or out.logged is None:
            return
        if isinstance(last, Delta):
            out.usage = (last.prompt_tokens, last.completion_tokens)
        error = last.message if isinstance(last, Failure) else "stream cut short" if last is None else None
        seconds = time.time() - out.logged["time"]
        self._audit(out.logged | {"latency_ms": round(out.logged["latency_ms"] + seconds * 1e3, 2), "error": error}, out)

    def __del__(self):  # Serve calls it when the replica shuts down: the last batch is written
        for writer in (self.log_sink, self.audit):
            if writer is not None:
                writer.close()

    async def _served(self, endpoint: str, request: Request, decide: Callable[[float], Any],
                      run: Callable[[_Outcome, float], Any]) -> Any:
        """Decide (given the deadline; synchronously or as a coroutine), run with fallback within the
        deadline, and record the outcome whatever happens."""
        started, request_id = time.perf_counter(), request.headers.get("x-request-id") or new_id("req")
        deadline = time.monotonic() + self.cfg.router.request_timeout_s
        out, status = None, 500
        try:
            decided = decide(deadline)
            out = await decided if inspect.isawaitable(decided) else decided
            response = await run(out, deadline)
            status = response.status_code
            return response
        except ApiError as exc:
            status = exc.status
            if out is not None and out.served_by is None and out.attempts:
                exc.headers = {**(exc.headers or {}), **out.headers()}
            raise
        except RoutingError as exc:
            status = _ROUTING_STATUS[exc.kind]
            raise
        finally:
            self._record(endpoint, out, status, started, request_id, _caller(request))

    # --- text endpoints ----------------------------------------------------------

    def _generation_request(self, body: ChatCompletionRequest | CompletionRequest, f: Features) -> GenerationRequest:
        chat = isinstance(body, ChatCompletionRequest)
        return GenerationRequest(
            request_id=new_id("gen"),
            prompt=None if chat else body.prompt,
            messages=[{"role": m.role, "content": m.text()} for m in body.messages] if chat else None,
            documents=[(d.text, d.page) for d in body.documents],
            max_tokens=f.max_new_tokens, temperature=body.temperature, top_p=body.top_p,
            stop=body.stop, seed=body.seed, adapter=f.adapter, speculation=body.speculation,
            ignore_eos=body.ignore_eos,
        )

    async def _text(self, endpoint: str, request: Request, body: ChatCompletionRequest | CompletionRequest):
        chat = isinstance(body, ChatCompletionRequest)
        image = _chat_image(body) if chat else None
        f = await self._features(endpoint, body, _caller(request))
        self.limiter.take(f.caller, "tokens", f.tokens + f.max_new_tokens)
        req = self._generation_request(body, f)

        async def decide(deadline: float) -> _Outcome:  # a chat image picks the adapter first
            nonlocal f, req
            f, summary = await self._image_choice(image, f, deadline)
            req = replace(req, adapter=f.adapter)
            return _Outcome(self._decide(f), image=summary)

        async def run(out: _Outcome, deadline: float):
            out.adapter, out.prompt = f.adapter, f.text if self.cfg.router.audit_include_prompt else None
            if body.stream:
                gen, first = await self._open_stream(out, req, deadline)
                model = out.served_by if f.adapter is None else f"{out.served_by}:{f.adapter}"
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                out.streaming = True
                on_end = lambda last: self._ended(out, last)  # noqa: E731
                events = _sse(gen, first, chat, model, out, deadline, include_usage, on_end)
                _on_drop(events, gen, out, on_end)
                return StreamingResponse(events, media_type="text/event-stream", headers=out.headers())
            result: Completion = await self._call(out, "generate", req, deadline)
            out.usage = (result.prompt_tokens, result.completion_tokens)
            model = out.served_by if f.adapter is None else f"{out.served_by}:{f.adapter}"
            return JSONResponse(_completion_body(result, chat, model, out), headers=out.headers())

        plain = lambda _: _Outcome(self._decide(f))  # noqa: E731
        return await self._served(endpoint, request, plain if image is None else decide, run)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request, body: ChatCompletionRequest):
        return await self._text("chat", request, body)

    @app.post("/v1/completions")
    async def completions(self, request: Request, body: CompletionRequest):
        return await self._text("completions", request, body)

    @app.post("/v1/route")
    async def route(self, request: Request):
        raw = await request.body()
        try:
            keys = json.loads(raw or b"null")
        except json.JSONDecodeError as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None
        model = ChatCompletionRequest if isinstance(keys, dict) and "messages" in keys else CompletionRequest
        body = await _json_body(request, model)
        f = await self._features("route", body, _caller(request))
        d = self._decide(f)
        return {"backend": d.backend, "fallbacks": list(d.fallbacks), "scores": d.scores, "excluded": d.excluded,
                "predicted_s": d.predicted_s, "quality_bits_per_byte": d.quality, "degraded": d.degraded,
                "reason": d.reason, "task": d.task, "task_source": d.task_source,
                "intent": {"task": f.intent[0], "confidence": f.intent[1]} if f.intent else None,
                "features": {"tokens": f.tokens, "pages": f.pages, "modality": f.modality,
                             "max_new_tokens": f.max_new_tokens}}

    # --- trm and dinov2 ------------------------------------------------------------

    @app.post("/v1/refine")
    async def refine(self, request: Request, body: RefineRequest):
        backend, adapter = split_model(body.model)
        payload = body.model_dump(include={"task", "grid", "code", "max_steps", "halt_threshold"})
        task = "puzzle_solving" if body.task == "sudoku" else "code_repair"
        f = Features(endpoint="refine", modality="grid", tokens=0, max_new_tokens=0, pages=0, text="",
                     task=task, backend=backend, adapter=adapter, caller=_caller(request))
        as_text = text_f = None
        if body.task == "code_repair":  # language models take it as text: the prompt training/lm.py taught
            prompt = f"{FIX_PROMPT}\n{body.code}"
            new = min(self.cfg.router.max_tokens, self.count_tokens(body.code) + 16)
            text_f = replace(f, modality="text", tokens=self.count_tokens(prompt), max_new_tokens=new, text=prompt)
            as_text = ("generate", GenerationRequest(
                request_id=new_id("gen"), messages=[{"role": "user", "content": prompt}], max_tokens=new,
                temperature=0.0, adapter=adapter), _repair_from)

        async def run(out: _Outcome, deadline: float):
            result = await self._call(out, "refine", payload, deadline, as_text,
                                      check=_unparsed if as_text else None)
            return JSONResponse({**result, "backend": out.served_by, "switchyard": out.body()}, headers=out.headers())

        return await self._served("refine", request, lambda _: _Outcome(self._decide(f, text_f)), run)

    @app.post("/v1/classify", openapi_extra={"requestBody": {"content": {
        "application/json": {"schema": ClassifyRequest.model_json_schema()},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "image": {"type": "string", "format": "binary"}, "model": {"type": "string"}}, "required": ["image"]}},
    }, "required": True}})
    async def classify(self, request: Request):
        image, model = await _image_from(request)
        backend, adapter = split_model(model)
        f = Features(endpoint="classify", modality="image", tokens=0, max_new_tokens=0, pages=0, text="",
                     task="image_classification", backend=backend, adapter=adapter, caller=_caller(request))

        async def run(out: _Outcome, deadline: float):
            result = await self._call(out, "classify", image, deadline)
            adapter_for = self.cfg.backend(out.served_by).label_adapters.get(result["label"])
            return JSONResponse({**result, "adapter": adapter_for, "backend": out.served_by,
                                 "switchyard": out.body()}, headers=out.headers())

        return await self._served("classify", request, lambda _: _Outcome(self._decide(f)), run)

    # --- introspection -------------------------------------------------------------

    @app.get("/v1/models")
    async def models(self, request: Request):
        """The backends and adapters this caller may use."""
        caller = _caller(request)
        backends = [b for b in self.cfg.backends if caller.may_use(b.name)]
        infos = await asyncio.gather(*(self._info(b.name) for b in backends))
        data = [{"id": "auto", "object": "model", "created": self.started, "owned_by": "switchyard",
                 "switchyard": {"kind": "router", "backends": [b.name for b in backends]}}]
        for b, info in zip(backends, infos):
            meta = {"kind": b.kind, **info, "circuit": self.breakers[b.name].state,
                    "in_flight": self.states[b.name].in_flight, "capability": b.capability.model_dump()}
            data.append({"id": b.name, "object": "model", "created": self.started, "owned_by": "switchyard",
                         "switchyard": meta})
            for a in (a for a in getattr(b, "adapters", {}) if caller.may_use(b.name, a)):
                data.append({"id": f"{b.name}:{a}", "object": "model", "created": self.started,
                             "owned_by": "switchyard", "parent": b.name, "switchyard": {"kind": "adapter"}})
        return {"object": "list", "data": data}

    async def _info(self, name: str) -> dict[str, Any]:
        try:
            info = await asyncio.wait_for(self.handles[name].info.remote(), 5)
            return {**info, "health": "ok"}
        except (asyncio.TimeoutError, RayActorError, RayTaskError) as exc:
            return {"health": f"unreachable: {type(exc).__name__}"}

    @app.get("/v1/routing/log")
    async def routing_log(self, limit: int = Query(100, ge=1, le=10_000),
                          backend: str | None = Query(None, description="Chosen or served by this backend."),
                          reason: str | None = Query(None, description="Words in the reason, any case."),
                          since: float | None = Query(None, ge=0, description="Unix time: entries at or after it.")):
        """The latest decisions first, filtered."""
        data = []
        for entry in reversed(self.log):
            if since is not None and entry["time"] < since:
                break  # entries are in time order
            if backend is not None and backend not in (entry["backend"], entry["chosen"]):
                continue
            if reason is not None and reason.lower() not in (entry["reason"] or "").lower():
                continue
            data.append(entry)
            if len(data) == limit:
                break
        return {"object": "list", "data": data}

    @app.get("/healthz")
    async def healthz(self):
        return {"status": "ok", "backends": {n: {"closed": "ok", "open": "circuit open", "half_open": "probing"}[
            self.breakers[n].state] for n in self.handles}}
