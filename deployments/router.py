"""The router: start-up and the endpoints. The decision is routing.Policy's; calls with fallback are
deployments.dispatch's; statuses are routing.outcome's rules, shaped in deployments.http; what each
request did is kept by deployments.records.
"""

import asyncio
import json
import logging
import time
from dataclasses import replace
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from deployments import http
from deployments.api import (ChatCompletionRequest, Chunks, ClassifyRequest, CompletionRequest, RefineRequest,
                             completion_body, model_card, new_id, now)
from deployments.config import AppConfig
from deployments.dispatch import Call, Dispatcher
from deployments.http import ApiError
from deployments.records import Outcome, Records
from deployments.streams import sse_response, tool_call_stream
from deployments.replicas import ReplicaWatch, serve_fetch
from models import code_grid
from models.checkpoints import resolve_model
from models.engine import Completion, GenerationRequest
from routing import outcome
from routing.access import Access, Caller, RateLimiter
from routing.breaker import CircuitBreaker
from routing.config import TASKS
from routing.features import Features, split_model, text_features
from routing.policy import BackendState, Decision, Policy, RoutingError, choose_adapter

logger = logging.getLogger(__name__)

app = FastAPI(title="Switchyard", version="0.1.0", description="One endpoint for several model architectures.")
http.install(app)


class Repair(Call):
    """A code repair: trm takes the grid; a language model takes it as text (the prompt training/lm.py
    taught) and its answer is kept when it parses."""

    def __init__(self, payload: dict[str, Any], as_text: GenerationRequest | None):
        super().__init__("refine", payload)
        self.as_text = as_text

    def to(self, name: str, decision: Decision) -> tuple[str, Any]:
        if self.as_text is not None and name in decision.as_text:
            return Call("generate", self.as_text).to(name, decision)
        return super().to(name, decision)

    def accept(self, name: str, decision: Decision, result: Any) -> tuple[Any, str | None]:
        if self.as_text is None:
            return result, None
        if isinstance(result, Completion):  # a language model's repair in the shape of trm's answer
            result = {"code": result.text, "valid": code_grid.is_valid(result.text), "steps": None,
                      "confidence": None, "completion_tokens": result.completion_tokens,
                      "finish_reason": result.finish_reason}
        return result, None if result["valid"] else "the repaired code does not parse"


# serve.ingress pickles the app when it decorates: everything the class uses is defined above.
@serve.ingress(app)
class Router:
    def __init__(self, cfg: AppConfig, handles: dict[str, DeploymentHandle]):
        self.cfg, self.handles = cfg, handles
        r = cfg.router
        self.policy = Policy({b.name: b.capability for b in cfg.backends}, cfg.routing,
                             adapters={b.name: list(getattr(b, "adapters", {})) for b in cfg.backends})
        self.per_replica = {b.name: b.deployment.max_ongoing_requests for b in cfg.backends}
        self.states = {b.name: BackendState(capacity=outcome.capacity(b.deployment.num_replicas, self.per_replica[b.name]))
                       for b in cfg.backends}
        self.breakers = {b.name: CircuitBreaker(r.unhealthy_after, r.unhealthy_cooldown_s, r.breaker_failure_rate,
                                                r.breaker_window) for b in cfg.backends}
        self.active = 0  # HTTP requests in progress here (http.Guard)
        try:
            app_name = serve.get_replica_context().app_name
        except RayServeException:  # built outside a replica (unit tests): every backend taken as running
            app_name = None
        self.watch = ReplicaWatch(handles, serve_fetch(app_name, handles), poll_s=r.replica_poll_s)
        self.watching = app_name is not None
        self.dispatch = Dispatcher(r, handles, self.watch, self.breakers, self.states)
        self.records = Records(r)
        self.started = now()
        from transformers import AutoTokenizer  # the router process needs it only here

        tokenizer = AutoTokenizer.from_pretrained(resolve_model(r.tokenizer))
        self.fast = getattr(tokenizer, "backend_tokenizer", None)  # the Rust tokenizer: half the cost per call
        self.tokenizer = tokenizer
        self.access = Access(cfg.auth)
        replicas = r.deployment.num_replicas
        if not isinstance(replicas, int):
            replicas = (r.deployment.autoscaling_config or {}).get("max_replicas", 1)
        self.limiter = RateLimiter(replicas=replicas)  # each router replica holds 1/replicas of every limit
        self.intent = None
        if cfg.routing.intent is not None:
            from models.intent import IntentClassifier

            self.intent = IntentClassifier.load(resolve_model(cfg.routing.intent.model))
            if unknown := sorted(set(self.intent.config.labels) - set(TASKS)):
                raise ValueError(f"routing.intent.model {cfg.routing.intent.model} predicts tasks {unknown} "
                                 f"that are not tasks of this router: {', '.join(TASKS)}")
        app.state.switchyard = self  # http.Guard admits requests from here on

    def count_tokens(self, text: str) -> int:
        if self.fast is not None:
            return len(self.fast.encode(text, add_special_tokens=False).ids)
        return len(self.tokenizer(text, add_special_tokens=False, verbose=False).input_ids)

    def __del__(self):  # Serve calls it when the replica shuts down: the last batch is written
        self.records.close()

    async def check_health(self) -> None:
        """Serve restarts a router whose view of the backends stopped updating."""
        if self.watching and self.watch.stopped():
            raise RuntimeError("the replica watch stopped polling Serve's controller")

    # --- decision ------------------------------------------------------------------

    def _decide(self, f: Features, as_text: Features | None = None) -> Decision:
        start = time.perf_counter()
        if self.watching:
            self.watch.start()
        for name, state in self.states.items():
            state.healthy = self.breakers[name].available() and self.watch.available(name)
            if (live := self.watch.live(name)) is not None:  # autoscaled: the replicas running now
                state.capacity = max(1, live) * self.per_replica[name]
            self.records.health(name, state.healthy)
        decision = self.policy.decide(f, self.states, as_text)
        self.records.decided(decision, time.perf_counter() - start)
        return decision

    async def _features(self, endpoint: str, body: ChatCompletionRequest | CompletionRequest, out: Outcome) -> Features:
        """The text request's features; the intent classifier's guess when the task is not given."""
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
        f = replace(f, caller=out.caller, outputs=body.outputs())
        if self.intent is not None and f.task is None and f.backend is None and f.query.strip():
            # Only where the task picks the backend: a pinned model goes where it names whatever the task.
            # A thread: the MiniLM encoder takes milliseconds (bench.classifier) the event loop should not wait out.
            guess = await asyncio.to_thread(self.intent.predict, f.query)
            f = replace(f, intent=(guess.task, round(guess.confidence, 4)))
        return f

    async def _image_choice(self, image: bytes, f: Features, out: Outcome) -> Features:
        """Classifies a chat request's image; a confident label picks the adapter its config maps it to.
        `out.image` says what was decided and why."""
        if f.adapter is not None:
            out.image = {"applied": False, "adapter": None, "reason": f"adapter {f.adapter!r} given by model"}
            return f
        g = Features(endpoint="chat", modality="image", tokens=0, max_new_tokens=0, pages=0, text="",
                     task="image_classification", caller=f.caller)
        sub = Outcome(caller=f.caller, deadline=out.deadline)
        try:
            sub.decision = self._decide(g)
            result = await self.dispatch.call(sub, Call("classify", image))
        except RoutingError as exc:
            if exc.kind not in ("forbidden", "unavailable"):
                raise ApiError(400, "this server has no image classifier to read the image with (a chat image "
                               "picks the adapter through one)", param="messages") from None
            why = f"caller {f.caller.name} may not use a classifier" if exc.kind == "forbidden" else exc.message
            out.image = {"applied": False, "adapter": None, "reason": f"image not classified: {why}"}
            return f
        except ApiError as exc:
            if exc.status == 400:  # the image itself is at fault
                raise
            out.image = {"applied": False, "adapter": None, "reason": f"image not classified: {exc.message}"}
            return f
        finally:
            out.waited_s += sub.waited_s
        cfg = self.cfg.backend(sub.served_by)
        label, confidence = result["label"], round(result["confidence"], 4)
        choice = outcome.permitted(choose_adapter(label, confidence, cfg.label_adapters, cfg.adapter_min_confidence,
                                                  f.backend), f.caller, self.policy.adapters)
        out.image = {"backend": sub.served_by, "label": label, "confidence": confidence, "applied": choice.applied,
                     "adapter": choice.adapter, "threshold": cfg.adapter_min_confidence, "reason": choice.reason}
        if choice.applied:
            f = replace(f, adapter=(choice.adapter or "").rpartition(":")[2], backend=choice.backend)
        return f

    def _request(self, endpoint: str, request: Request):
        return self.records.request(endpoint, request.headers.get("x-request-id") or new_id("req"),
                                    http.caller(request))

    # --- text endpoints ------------------------------------------------------------

    async def _text(self, endpoint: str, request: Request, body: ChatCompletionRequest | CompletionRequest):
        chat = isinstance(body, ChatCompletionRequest)
        with self._request(endpoint, request) as out:
            if chat and body.auto_tools():
                raise ApiError(400, "tool_choice 'auto' (the default with tools) needs a tool-call parser for the "
                               "backend's model, and no backend here has one: their models have no tool-call format. "
                               "Use tool_choice 'required' or name a function; the answer is then a call whose "
                               "arguments follow the function's parameters", param="tool_choice")
            schema, k = body.json_schema(), body.logprobs_k()
            image = http.chat_image(body) if chat else None
            f = await self._features(endpoint, body, out)
            self.limiter.take(f.caller, "tokens", f.tokens + f.max_new_tokens)
            if image is not None:  # a chat image picks the adapter first
                f = await self._image_choice(image, f, out)
            out.decision = self._decide(f)
            out.adapter, out.prompt = f.adapter, f.text if self.cfg.router.audit_include_prompt else None
            req = GenerationRequest(
                request_id=new_id("gen"), prompt=None if chat else body.prompt,
                messages=[{"role": m.role, "content": m.text()} for m in body.messages] if chat else None,
                documents=[(d.text, d.page) for d in body.documents], max_tokens=f.max_new_tokens,
                temperature=body.temperature, top_p=body.top_p, stop=body.stop, seed=body.seed, adapter=f.adapter,
                speculation=body.speculation, ignore_eos=body.ignore_eos, logprobs=k, json_schema=schema,
                tools=[t.model_dump(exclude_none=True) for t in body.tools] if chat and body.tools else None)
            tools = chat and body.calls_tools()
            if body.stream and not tools:  # a tool call is streamed whole, once made (below)
                opened = await self.dispatch.open(out, req)
                model = opened.backend if f.adapter is None else f"{opened.backend}:{f.adapter}"
                out.streaming = True
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                return sse_response(self.records, out, self.dispatch.relay(out, req, opened), opened,
                                    Chunks(chat, model), include_usage)
            try:
                result: Completion = await self.dispatch.call(out, Call("generate", req))
            except ApiError as exc:
                if tools and exc.param == "response_format":  # the schema was a tool's parameters
                    exc.param = "tools"
                raise
            out.usage = (result.prompt_tokens, result.completion_tokens)
            model = out.served_by if f.adapter is None else f"{out.served_by}:{f.adapter}"
            calls = body.tool_calls(result.text, result.finish_reason == "stop") if tools else None
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                return tool_call_stream(Chunks(chat, model), calls, result, include_usage, out)
            answer = completion_body(result.text, result.finish_reason, out.usage, chat, model, out.body(),
                                     result.logprobs, calls)
            return JSONResponse(answer, headers=out.headers())

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
        body = await http.json_body(request, model)
        f = await self._features("route", body, Outcome(caller=http.caller(request)))
        d = self._decide(f)
        return {"backend": d.backend, "fallbacks": list(d.fallbacks), "scores": d.scores,
                "excluded": {n: {"kind": e.kind, "reason": e.reason} for n, e in d.excluded.items()},
                "predicted_s": d.predicted_s, "quality_bits_per_byte": d.quality, "degraded": d.degraded,
                "reason": d.reason, "task": d.task, "task_source": d.task_source,
                "intent": {"task": f.intent[0], "confidence": f.intent[1]} if f.intent else None,
                "features": {"tokens": f.tokens, "pages": f.pages, "modality": f.modality,
                             "max_new_tokens": f.max_new_tokens}}

    # --- trm and dinov2 ------------------------------------------------------------

    @app.post("/v1/refine")
    async def refine(self, request: Request, body: RefineRequest):
        with self._request("refine", request) as out:
            backend, adapter = split_model(body.model)
            payload = body.model_dump(include={"task", "grid", "code", "max_steps", "halt_threshold"})
            task = "puzzle_solving" if body.task == "sudoku" else "code_repair"
            f = Features(endpoint="refine", modality="grid", tokens=0, max_new_tokens=0, pages=0, text="",
                         task=task, backend=backend, adapter=adapter, caller=out.caller)
            as_text = text_f = None
            if body.task == "code_repair":  # language models take it as text
                prompt = f"{code_grid.FIX_PROMPT}\n{body.code}"
                new = min(self.cfg.router.max_tokens, self.count_tokens(body.code) + 16)
                text_f = replace(f, modality="text", tokens=self.count_tokens(prompt), max_new_tokens=new, text=prompt)
                as_text = GenerationRequest(request_id=new_id("gen"), messages=[{"role": "user", "content": prompt}],
                                            max_tokens=new, temperature=0.0, adapter=adapter)
            out.decision = self._decide(f, text_f)
            result = await self.dispatch.call(out, Repair(payload, as_text))
            return JSONResponse({**result, "backend": out.served_by, "switchyard": out.body()}, headers=out.headers())

    @app.post("/v1/classify", openapi_extra={"requestBody": {"content": {
        "application/json": {"schema": ClassifyRequest.model_json_schema()},
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "image": {"type": "string", "format": "binary"}, "model": {"type": "string"}}, "required": ["image"]}},
    }, "required": True}})
    async def classify(self, request: Request):
        with self._request("classify", request) as out:
            image, model = await http.image_from(request)
            backend, adapter = split_model(model)
            out.decision = self._decide(Features(endpoint="classify", modality="image", tokens=0, max_new_tokens=0,
                                                 pages=0, text="", task="image_classification", backend=backend,
                                                 adapter=adapter, caller=out.caller))
            result = await self.dispatch.call(out, Call("classify", image))
            adapter_for = self.cfg.backend(out.served_by).label_adapters.get(result["label"])
            return JSONResponse({**result, "adapter": adapter_for, "backend": out.served_by,
                                 "switchyard": out.body()}, headers=out.headers())

    # --- introspection ---------------------------------------------------------------

    @app.get("/v1/models")
    async def models(self, request: Request):
        """The backends and adapters this caller may use."""
        return {"object": "list", "data": await self._cards(http.caller(request))}

    @app.get("/v1/models/{model}")
    async def model(self, request: Request, model: str):
        """One of /v1/models' entries: `auto`, a backend, or `backend:adapter`."""
        backend = model.partition(":")[0]
        cards = await self._cards(http.caller(request), backend if backend in self.handles else None)
        card = next((c for c in cards if c["id"] == model), None)
        if card is None:
            raise ApiError(404, f"model {model!r} does not exist, or this caller may not use it", "model_not_found",
                           "model")
        return card

    async def _cards(self, caller: Caller, only: str | None = None) -> list[dict[str, Any]]:
        """Model objects for `auto` and every backend and adapter the caller may use (`only`: that backend's)."""
        backends = [b for b in self.cfg.backends if caller.may_use(b.name) and only in (None, b.name)]
        infos = await asyncio.gather(*(self._info(b.name) for b in backends))
        data = [model_card("auto", self.started, {"kind": "router", "backends": [b.name for b in backends]})]
        for b, info in zip(backends, infos):
            data.append(model_card(b.name, self.started, {
                "kind": b.kind, **info, "circuit": self.breakers[b.name].state,
                "in_flight": self.states[b.name].in_flight, "capability": b.capability.model_dump()}))
            data += [model_card(f"{b.name}:{a}", self.started, {"kind": "adapter"}, parent=b.name)
                     for a in getattr(b, "adapters", {}) if caller.may_use(b.name, a)]
        return data

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
        for entry in reversed(self.records.log):
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
        """The router's view of each backend: `ok`, `circuit open`, `probing` (the circuit's probe is
        due) or `no live replica` (a replica still starting, as a vLLM replica loading its model, is not
        live). 200 while some backend can be called, else 503."""
        if self.watching:
            await self.watch.first_read(timeout=2.0)
        backends = {}
        for name in self.handles:
            breaker = self.breakers[name]
            state = "ok" if breaker.state == "closed" else "probing" if breaker.available() else "circuit open"
            backends[name] = {"state": state if self.watch.available(name) else "no live replica",
                              "live_replicas": self.watch.live(name), "in_flight": self.states[name].in_flight}
        usable = [n for n, b in backends.items() if b["state"] in ("ok", "probing")]
        status = "ok" if len(usable) == len(backends) else "degraded" if usable else "unavailable"
        body = {"status": status, "backends": backends}
        if usable:
            return body
        return JSONResponse(body, 503, {"Retry-After": str(outcome.retry_after(503, self.cfg.router.retry_after_s))})

