"""The `secure` app (auth on, trm and dinov2 only): keys, JWT, roles, rate limits and the body
limit through real HTTP."""

from __future__ import annotations

import asyncio
import base64
import time

import httpx

import jwt

from tests.serve.conftest import JWT_SECRET, SECURE_DEADLINE_S
from tests.serve.test_app import SUDOKU, assert_openai_error, png

REFINE = {"task": "sudoku", "grid": SUDOKU, "max_steps": 2}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_no_or_wrong_credentials_are_401_and_healthz_is_open(client):
    err = assert_openai_error(client.post("/secure/v1/refine", json=REFINE), 401)
    assert err["type"] == "authentication_error"
    r = client.post("/secure/v1/refine", json=REFINE, headers=bearer("sk-wrong"))
    assert_openai_error(r, 401)
    assert r.headers["www-authenticate"] == "Bearer"
    assert_openai_error(client.get("/secure/v1/models"), 401)
    assert_openai_error(client.get("/secure/openapi.json"), 401)
    assert client.get("/secure/healthz").status_code == 200


def test_a_role_permits_endpoints_and_backends(client):
    ok = client.post("/secure/v1/refine", json=REFINE, headers=bearer("sk-refiner"))
    assert ok.status_code == 200 and ok.json()["backend"] == "trm"
    image = base64.b64encode(png()).decode()
    err = assert_openai_error(client.post("/secure/v1/classify", json={"image": image},
                                          headers=bearer("sk-refiner")), 403)
    assert "may not call /v1/classify" in err["message"] and err["type"] == "permission_error"
    assert client.post("/secure/v1/classify", json={"image": image}, headers=bearer("sk-admin")).status_code == 200
    models = client.get("/secure/v1/models", headers=bearer("sk-refiner")).json()["data"]
    assert [m["id"] for m in models] == ["auto", "trm"]  # dinov2 is not the refiner's to use
    entry = client.get("/secure/v1/routing/log", params={"limit": 10}, headers=bearer("sk-admin")).json()["data"]
    assert {"refiner", "admin"} <= {e["caller"] for e in entry}


def test_jwt(client):
    claims = {"sub": "jay", "aud": "switchyard", "exp": int(time.time()) + 60, "roles": ["refiner"]}
    r = client.post("/secure/v1/refine", json=REFINE, headers=bearer(jwt.encode(claims, JWT_SECRET)))
    assert r.status_code == 200, r.text
    expired = jwt.encode(claims | {"exp": int(time.time()) - 5}, JWT_SECRET)
    err = assert_openai_error(client.post("/secure/v1/refine", json=REFINE, headers=bearer(expired)), 401)
    assert "expired" in err["message"]


def test_rate_limit_is_429_with_retry_after(client):
    codes = [client.post("/secure/v1/refine", json=REFINE, headers=bearer("sk-slow")) for _ in range(4)]
    assert [r.status_code for r in codes[:3]] == [200, 200, 200]
    err = assert_openai_error(codes[3], 429)
    assert err["type"] == "rate_limit_error" and int(codes[3].headers["retry-after"]) >= 1


def test_body_over_the_limit_is_413(client):
    big = {"task": "code_repair", "code": "x = 1\n" * 20000}
    err = assert_openai_error(client.post("/secure/v1/refine", json=big, headers=bearer("sk-admin")), 413)
    assert "the limit is 65536" in err["message"]

    def chunks():  # no content-length: counted as it arrives
        for _ in range(20):
            yield b" " * 8192

    r = client.post("/secure/v1/refine", content=chunks(), headers=bearer("sk-admin") | {"content-type": "application/json"})
    assert_openai_error(r, 413)


def test_a_burst_beyond_capacity_is_503_with_retry_after_never_500(server):
    """trm here takes 4 at once and queues 4: of 80 at once (10x), the excess is turned away, as 503s
    with the capacity rule's Retry-After of 1 s (a wait for the deadline would have been a 504, a
    failing backend's 503 says the cooldown)."""

    async def burst() -> list[tuple[int, str | None, str]]:
        async with httpx.AsyncClient(base_url=server, timeout=60, headers=bearer("sk-admin")) as c:
            async def one():
                r = await c.post("/secure/v1/refine", json=REFINE | {"max_steps": 16, "halt_threshold": 1.0})
                return r.status_code, r.headers.get("retry-after"), r.text[:200]
            return await asyncio.gather(*(one() for _ in range(80)))

    results = asyncio.run(burst())
    codes = [code for code, *_ in results]
    assert set(codes) <= {200, 503} and codes.count(200) >= 8 and codes.count(503) >= 1, codes
    turned_away = [(retry, text) for code, retry, text in results if code == 503]
    assert all(retry == "1" and "at capacity" in text for retry, text in turned_away), turned_away[:3]


def test_a_backend_that_hangs_is_504_within_the_deadline_and_its_call_is_cancelled(client):
    cancelled = lambda: next(m for m in client.get("/secure/v1/models", headers=bearer("sk-admin")).json()["data"]  # noqa: E731
                             if m["id"] == "hang")["switchyard"]["cancelled"]
    before = cancelled()
    start = time.perf_counter()
    r = client.post("/secure/v1/completions", json={"prompt": "hello", "max_tokens": 4}, headers=bearer("sk-admin"))
    seconds = time.perf_counter() - start
    err = assert_openai_error(r, 504)
    assert err["type"] == "timeout" and seconds >= SECURE_DEADLINE_S  # not before the deadline
    for _ in range(600):  # wait for the cancellation to reach the replica (no bound on how soon)
        if cancelled() > before:
            break
        time.sleep(0.05)
    assert cancelled() == before + 1

