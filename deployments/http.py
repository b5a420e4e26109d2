"""The router's HTTP edge: OpenAI-shaped errors and their handlers, the ASGI guard in front of every
route (admission, body size, caller, request rate), and request bodies (JSON, base64, multipart).

Status codes come from routing.outcome's rules; this module only shapes them (STYLE 7).
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.api import ChatCompletionRequest, ClassifyRequest, ImagePart, openai_error
from routing import outcome
from routing.access import ANONYMOUS, AccessError, Caller
from routing.policy import RoutingError

logger = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.type = type_ or outcome.error_type(status)

    @classmethod
    def of(cls, verdict: outcome.Verdict, param: str | None = None) -> ApiError:
        headers = None if verdict.retry_after is None else {"Retry-After": str(verdict.retry_after)}
        return cls(verdict.status, verdict.message, verdict.type, param, headers)


def error(status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None,
          type_: str | None = None) -> JSONResponse:
    return JSONResponse(openai_error(message, type_ or outcome.error_type(status), param), status_code=status,
                        headers=headers)


def access_headers(exc: AccessError) -> dict[str, str] | None:
    if exc.status == 401:
        return {"WWW-Authenticate": "Bearer"}
    if exc.retry_after is not None:
        return {"Retry-After": str(max(1, round(exc.retry_after + 0.5)))}
    return None


def status_of(exc: Exception) -> int:
    """The status a request that raised `exc` was answered with (for its records)."""
    if isinstance(exc, ApiError):
        return exc.status
    if isinstance(exc, RoutingError):
        return outcome.ROUTING_STATUS[exc.kind]
    if isinstance(exc, AccessError):
        return exc.status
    return 500


def install(app: FastAPI) -> None:
    """The exception handlers and the guard."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error(exc.status, exc.message, exc.param, exc.headers, exc.type)

    @app.exception_handler(AccessError)
    async def _access_error(_: Request, exc: AccessError) -> JSONResponse:
        return error(exc.status, exc.message, headers=access_headers(exc))

    @app.exception_handler(RoutingError)
    async def _routing_error(request: Request, exc: RoutingError) -> JSONResponse:
        verdict = outcome.routing(exc.kind, exc.message, request.app.state.switchyard.cfg.router.retry_after_s)
        e = ApiError.of(verdict, exc.param)
        return error(e.status, e.message, e.param, e.headers, e.type)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error(400, *describe(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error in the router")
        return error(500, "internal error; the router's log has the details", type_="internal_server_error")

    app.add_middleware(Guard)


def describe(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """pydantic's errors as one message and the first offending field, without echoing input."""
    parts, param = [], None
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        if e.get("type") == "json_invalid":
            return f"request body is not valid JSON: {e.get('ctx', {}).get('error', e['msg'])}", None
        param = param or loc or None
        if e.get("type") == "extra_forbidden":
            msg = "unknown parameter; docs/api.md lists the parameters this server takes"
        else:
            msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts) or "invalid request", param


# --- the guard -------------------------------------------------------------------------

# path -> the endpoint name roles permit (routing.access.ENDPOINTS)
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/route": "route",
             "/v1/refine": "refine", "/v1/classify": "classify", "/v1/models": "models",
             "/v1/routing/log": "routing_log"}
OPEN = {"/healthz"}  # no caller needed


class _BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware in front of every route: admission (503 beyond router.max_in_flight), the body
    size limit (413), then the caller (401, 403 for the endpoint, 429 for its request rate). The caller
    goes to the handlers in `request.state.caller`. It reads the Router through `app.state.switchyard`,
    set at start."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        router = getattr(scope["app"].state, "switchyard", None)  # deployments.router.Router
        if router is None:  # not started: fail closed
            return await _send(scope, receive, send, 503, "the router is starting")
        r = router.cfg.router
        if router.active >= r.max_in_flight:  # before Serve's proxy would queue: see config
            wait = outcome.retry_after(503, r.retry_after_s)
            return await _send(scope, receive, send, 503, f"this router replica is handling {router.active} "
                               "requests, its limit; retry shortly", {"Retry-After": str(wait)})
        router.active += 1
        try:
            await self._admitted(router, scope, receive, send)
        finally:
            router.active -= 1

    async def _admitted(self, router: Any, scope: dict, receive: Callable, send: Callable) -> None:
        limit = router.cfg.router.max_body_bytes
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _send(scope, receive, send, 413, f"request body is {int(length)} bytes; the limit is {limit}")
        path, root = scope.get("path", ""), scope.get("root_path", "").rstrip("/")
        if root and (path == root or path.startswith(root + "/")):  # the app's own path under a route prefix
            path = path[len(root):] or "/"
        if path not in OPEN:
            try:
                scope.setdefault("state", {})["caller"] = _admit(router, path, headers)
            except AccessError as exc:
                return await _send(scope, receive, send, exc.status, exc.message, access_headers(exc))
        await _Counted(self.app, limit, scope, receive, send).run()


def _admit(router: Any, path: str, headers: dict[bytes, bytes]) -> Caller:
    caller = router.access.authenticate(headers.get(b"authorization", b"").decode("latin-1") or None)
    endpoint = ENDPOINTS.get(path)
    if endpoint is not None and not caller.may_call(endpoint):
        raise AccessError(403, f"caller {caller.name!r} may not call {path}")
    if endpoint is not None:
        router.limiter.take(caller, "requests", 1)
    return caller


class _Counted:
    """One request whose body is counted as it arrives (one without content-length may still be too
    large): once past the limit, the answer is the 413, whatever the app started to send."""

    def __init__(self, app: Any, limit: int, scope: dict, receive: Callable, send: Callable):
        self.app, self.limit, self.scope, self.receive, self.send = app, limit, scope, receive, send
        self.seen, self.too_large, self.answered = 0, False, False

    async def run(self) -> None:
        try:
            await self.app(self.scope, self._receive, self._send)
        except _BodyTooLarge:
            await self._too_large()

    async def _receive(self) -> dict:
        message = await self.receive()
        self.seen += len(message.get("body", b""))
        if self.seen > self.limit:
            self.too_large = True
            raise _BodyTooLarge()
        return message

    async def _send(self, message: dict) -> None:
        if self.too_large:
            return await self._too_large()
        self.answered = self.answered or message["type"] == "http.response.start"
        await self.send(message)

    async def _too_large(self) -> None:
        if not self.answered:
            self.answered = True
            await _send(self.scope, self.receive, self.send, 413, f"request body is over the limit of {self.limit} bytes")


async def _send(scope: dict, receive: Callable, send: Callable, status: int, message: str,
                headers: dict[str, str] | None = None) -> None:
    await error(status, message, headers=headers)(scope, receive, send)


def caller(request: Request) -> Caller:
    return getattr(request.state, "caller", ANONYMOUS)


# --- request bodies --------------------------------------------------------------------

async def json_body(request: Request, model: type) -> Any:
    raw = await request.body()
    try:
        return model.model_validate_json(raw or b"null")
    except ValidationError as exc:
        message, param = describe(exc.errors())
        raise ApiError(400, message, param=param) from None


def decode_base64(data: str, param: str) -> bytes:
    """Bytes of base64 text or of a base64 data: URI."""
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if not header.endswith(";base64"):
            raise ApiError(400, f"{param}: only base64 data: URIs are accepted", param=param)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{param} is not valid base64", param=param) from None


async def image_from(request: Request) -> tuple[bytes, str]:
    """The image bytes and `model` from a JSON body (base64 or data URI) or a multipart upload."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("image") or form.get("file")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "multipart body needs a file field named 'image'", param="image")
        return await upload.read(), str(form.get("model") or "auto")
    body = await json_body(request, ClassifyRequest)
    return decode_base64(body.image, "image"), body.model


def chat_image(body: ChatCompletionRequest) -> bytes | None:
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
    return decode_base64(part.image_url.url, param)
