"""The router's own admission limit (deployments.http.Guard): beyond `router.max_in_flight` requests at once, a 503
in OpenAI's shape with Retry-After, before Serve's proxy would queue or refuse in plain text."""

import asyncio
import json
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from deployments.config import DeploymentOptions, RouterConfig
from deployments.http import Guard
from routing.access import Access, AuthConfig, RateLimiter


def test_the_router_must_take_more_than_it_admits():
    with pytest.raises(ValidationError, match=r"max_ongoing_requests \(64\) must be above router.max_in_flight \(256\)"):
        RouterConfig(deployment=DeploymentOptions(max_ongoing_requests=64))
    assert RouterConfig().deployment.max_ongoing_requests > RouterConfig().max_in_flight


def test_requests_beyond_max_in_flight_get_a_503_with_retry_after_and_the_count_returns():
    release = asyncio.Event()
    cfg = SimpleNamespace(router=RouterConfig(max_in_flight=2))
    router = SimpleNamespace(cfg=cfg, access=Access(AuthConfig()), limiter=RateLimiter(), active=0)

    async def inner(scope, receive, send):  # a handler that holds its request until released
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    guard = Guard(inner)

    async def call() -> tuple[int, dict, bytes]:
        sent: list[dict] = []

        async def receive():
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "path": "/v1/completions", "root_path": "", "headers": [], "method": "POST",
                 "app": SimpleNamespace(state=SimpleNamespace(switchyard=router))}
        await guard(scope, receive, send)
        start = next(m for m in sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return start["status"], dict(start["headers"]), body

    async def main():
        held = [asyncio.create_task(call()) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert router.active == 2
        status, headers, body = await call()
        assert status == 503 and headers[b"retry-after"] == b"1"
        error = json.loads(body)["error"]
        assert error["type"] == "service_unavailable" and "limit" in error["message"]
        release.set()
        assert [s for s, _, _ in await asyncio.gather(*held)] == [200, 200]
        assert router.active == 0
        assert (await call())[0] == 200

    asyncio.run(main())
