"""Who is calling and what they may do: API keys and JWTs to a Caller, roles to permissions, and
per-caller rate limits as token buckets.

Plain Python with PyJWT and hashlib: no Ray, torch or FastAPI. deployments/router.py calls
`Access.authenticate` for every request but /healthz, `Caller.may_call` for the endpoint, and
`RateLimiter.take` for requests and tokens; the caller's permissions reach routing.policy as a
hard filter, so a fallback never lands on a backend the caller may not use.

Keys are stored as sha256 hex digests, never in clear; a presented key is hashed and compared with
every stored digest in constant time (hmac.compare_digest, no early exit).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

ENDPOINTS = ("chat", "completions", "route", "refine", "classify", "models", "routing_log")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Role(Strict):
    """What a role permits; `*` is everything. A caller may do what any of its roles permits."""

    endpoints: list[str] = Field(default_factory=lambda: ["*"], description=f"Of {', '.join(ENDPOINTS)}.")
    backends: list[str] = Field(default_factory=lambda: ["*"], description="Backends it may be served by.")
    adapters: list[str] = Field(default_factory=lambda: ["*"], description="Adapters it may use (`BACKEND:NAME` "
                                "or `NAME` on any backend).")
    requests_per_minute: float | None = Field(None, gt=0, description="Per caller; unset: unlimited.")
    tokens_per_minute: float | None = Field(None, gt=0, description="Prompt plus max_tokens, per caller; unset: "
                                            "unlimited.")

    @model_validator(mode="after")
    def _endpoints(self) -> Role:
        if unknown := set(self.endpoints) - {"*", *ENDPOINTS}:
            raise ValueError(f"unknown endpoints {sorted(unknown)}; known: {', '.join(ENDPOINTS)}")
        return self


class KeyEntry(Strict):
    name: str = Field(min_length=1, description="The caller: in the audit log and rate limits.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 hex digest of the key.")
    roles: list[str] = Field(min_length=1)


class JWTSettings(Strict):
    algorithms: list[Literal["HS256", "RS256"]] = Field(min_length=1)
    secret_env: str | None = Field(None, description="Environment variable holding the HS256 secret.")
    public_key_file: str | None = Field(None, description="PEM file of the RS256 public key.")
    audience: str = Field(min_length=1, description="Required `aud`.")
    issuer: str | None = Field(None, description="Required `iss`, if set.")
    roles_claim: str = Field("roles", description="Claim holding the caller's roles (a list).")
    leeway_s: float = Field(0, ge=0, description="Clock skew allowed on `exp`.")

    @model_validator(mode="after")
    def _keys(self) -> JWTSettings:
        if "HS256" in self.algorithms and not self.secret_env:
            raise ValueError("HS256 needs secret_env")
        if "RS256" in self.algorithms and not self.public_key_file:
            raise ValueError("RS256 needs public_key_file")
        return self


class AuthConfig(Strict):
    enabled: bool = Field(False, description="Off: every request is the anonymous caller with every permission.")
    keys_file: str | None = Field(None, description="YAML or JSON list of {name, sha256, roles}: a mounted Secret.")
    keys_env: str | None = Field(None, description="Environment variable holding the same list as JSON.")
    jwt: JWTSettings | None = None
    roles: dict[str, Role] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _sources(self) -> AuthConfig:
        if self.enabled and not (self.keys_file or self.keys_env or self.jwt):
            raise ValueError("auth is enabled but no keys_file, keys_env or jwt is set: nobody could call")
        return self


class AccessError(Exception):
    def __init__(self, status: Literal[400, 401, 403, 429], message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


def _match(allowed: frozenset[str], name: str) -> bool:
    return "*" in allowed or name in allowed


@dataclass(frozen=True)
class Caller:
    name: str
    roles: tuple[str, ...]
    endpoints: frozenset[str] = frozenset({"*"})
    backends: frozenset[str] = frozenset({"*"})
    adapters: frozenset[str] = frozenset({"*"})
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None

    def may_call(self, endpoint: str) -> bool:
        return _match(self.endpoints, endpoint)

    def may_use(self, backend: str, adapter: str | None = None) -> bool:
        """Backend, and adapter on it if any (granted as `BACKEND:NAME` or as `NAME` on any backend)."""
        if not _match(self.backends, backend):
            return False
        return adapter is None or _match(self.adapters, adapter) or f"{backend}:{adapter}" in self.adapters


ANONYMOUS = Caller("anonymous", ())


def caller_of(name: str, roles: list[str], known: dict[str, Role]) -> Caller:
    """The caller with the union of its known roles' permissions and the most generous rate of them."""
    mine = [known[r] for r in roles if r in known]
    if not mine:
        raise AccessError(403, f"caller {name!r} has no role this server knows ({', '.join(roles) or 'none'})")

    def rate(attr: str) -> float | None:
        values = [getattr(r, attr) for r in mine]
        return None if any(v is None for v in values) else max(values)

    return Caller(name, tuple(roles),
                  frozenset(e for r in mine for e in r.endpoints), frozenset(b for r in mine for b in r.backends),
                  frozenset(a for r in mine for a in r.adapters), rate("requests_per_minute"),
                  rate("tokens_per_minute"))


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Access:
    """Bearer credentials to a Caller: an API key, or a JWT when it has a JWT's shape."""

    def __init__(self, config: AuthConfig):
        self.config = config
        entries: list[dict] = []
        if config.keys_file:
            entries += yaml.safe_load(Path(config.keys_file).read_text()) or []
        if config.keys_env:
            if config.keys_env not in os.environ:
                raise ValueError(f"auth.keys_env names {config.keys_env}, which is not set")
            entries += json.loads(os.environ[config.keys_env])
        self.keys = [KeyEntry.model_validate(e) for e in entries]
        self.jwt_keys: dict[str, object] = {}
        if config.jwt is not None:
            if config.jwt.secret_env:
                if config.jwt.secret_env not in os.environ:
                    raise ValueError(f"auth.jwt.secret_env names {config.jwt.secret_env}, which is not set")
                secret = os.environ[config.jwt.secret_env]
                if len(secret.encode()) < 32:
                    raise ValueError(f"{config.jwt.secret_env} holds {len(secret.encode())} bytes; an HS256 secret "
                                     "needs 32 or more")
                self.jwt_keys["HS256"] = secret
            if config.jwt.public_key_file:
                from cryptography.hazmat.primitives.serialization import load_pem_public_key

                pem = Path(config.jwt.public_key_file).read_bytes()
                load_pem_public_key(pem)  # a bad key fails at start, not at the first token
                self.jwt_keys["RS256"] = pem.decode()

    def authenticate(self, authorization: str | None) -> Caller:
        if not self.config.enabled:
            return ANONYMOUS
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AccessError(401, "this server needs an API key or a JWT: Authorization: Bearer <token>")
        token = token.strip()
        if self.config.jwt is not None and token.count(".") == 2:
            return self._from_jwt(token)
        digest, found = hash_key(token), None
        for entry in self.keys:  # every entry compared: the time does not say which one matched
            if hmac.compare_digest(digest, entry.sha256):
                found = entry
        if found is None:
            raise AccessError(401, "invalid API key")
        return caller_of(found.name, found.roles, self.config.roles)

    def _from_jwt(self, token: str) -> Caller:
        import jwt

        settings = self.config.jwt
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
            if algorithm not in settings.algorithms:
                raise AccessError(401, f"JWT algorithm {algorithm!r} is not accepted; accepted: "
                                  f"{', '.join(settings.algorithms)}")
            claims = jwt.decode(token, self.jwt_keys[algorithm], algorithms=[algorithm], audience=settings.audience,
                                issuer=settings.issuer, leeway=settings.leeway_s,
                                options={"require": ["exp", "aud", "sub"]})
        except jwt.ExpiredSignatureError:
            raise AccessError(401, "JWT has expired") from None
        except jwt.PyJWTError as exc:
            raise AccessError(401, f"invalid JWT: {exc}") from None
        roles = claims.get(settings.roles_claim) or []
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise AccessError(401, f"JWT claim {settings.roles_claim!r} must be a list of role names")
        # "jwt:" keeps a token's subject apart from the API keys' names (buckets, audit log)
        return caller_of(f"jwt:{claims['sub']}", roles, self.config.roles)


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class RateLimiter:
    """Token buckets per caller and kind ("requests", "tokens"), each holding a minute's allowance.

    Several router replicas: each enforces `1 / replicas` of every limit on its own (no shared
    state, no extra hop). The cluster therefore never admits more than the limit; a caller whose
    requests all land on one replica is held to `limit / replicas` at worst (Serve's proxy spreads
    requests over replicas, so it sees about the limit).
    """

    replicas: int = 1
    clock: Callable[[], float] = time.monotonic
    buckets: dict[tuple[str, str], _Bucket] = field(default_factory=dict)

    def take(self, caller: Caller, kind: Literal["requests", "tokens"], amount: float) -> None:
        per_minute = caller.requests_per_minute if kind == "requests" else caller.tokens_per_minute
        if per_minute is None:
            return
        capacity = per_minute / self.replicas
        now = self.clock()
        bucket = self.buckets.setdefault((caller.name, kind), _Bucket(capacity, now))
        bucket.tokens = min(capacity, bucket.tokens + (now - bucket.updated) * capacity / 60)
        bucket.updated = now
        if amount > capacity:  # it would never fit: a 400, not a 429 to retry
            raise AccessError(400, f"this request needs {amount:g} {kind}, more than the {capacity:g} a minute "
                              f"caller {caller.name!r} may use here; ask for fewer max_tokens")
        if bucket.tokens < amount:
            wait = (amount - bucket.tokens) * 60 / capacity
            raise AccessError(429, f"rate limit: {per_minute:g} {kind} a minute for caller {caller.name!r}; "
                              f"retry in {wait:.1f} s", retry_after=wait)
        bucket.tokens -= amount
