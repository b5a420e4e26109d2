"""What crosses the handle boundary between the router and a backend besides results.

Backends return errors as values: `Failure("invalid", ...)` when the request is at fault
(the router answers 4xx and does not fall back), `Failure("unsupported", ...)` when this backend
cannot take a valid request (the router tries the next, and answers 400 if none takes it),
`Failure("internal", ...)` when the backend is at fault (the router falls back). Exceptions that still cross (a dead replica) mean the same as internal.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Literal, TypeVar

from models.engine import InvalidRequest, Unsupported

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Failure:
    kind: Literal["invalid", "unsupported", "internal"]
    message: str
    param: str | None = None  # the request field at fault (invalid)


def _failure(exc: Exception) -> Failure:
    if isinstance(exc, Unsupported):
        return Failure("unsupported", str(exc))
    if isinstance(exc, InvalidRequest):
        return Failure("invalid", str(exc), exc.param)
    logger.exception("backend call failed")
    return Failure("internal", f"{type(exc).__name__}: {exc}")


async def as_value(call: Awaitable[T]) -> T | Failure:
    try:
        return await call
    except Exception as exc:  # noqa: BLE001 - every error becomes a value for the router
        return _failure(exc)


async def stream_values(stream: AsyncIterator[T]) -> AsyncIterator[T | Failure]:
    try:
        async for item in stream:
            yield item
    except Exception as exc:  # noqa: BLE001 - the router sees it before or after the first byte
        yield _failure(exc)
