"""routing/access.py: API keys, JWT (HS256, RS256), roles, rate limits; and permission as a hard
filter in the routing policy. No Ray."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jwt
import pytest
import yaml

from routing.access import ANONYMOUS, Access, AccessError, AuthConfig, Caller, RateLimiter, caller_of, hash_key

ROLES = {
    "user": {"endpoints": ["chat", "completions", "models"], "backends": ["transformer"],
             "adapters": ["transformer:pydoc"], "requests_per_minute": 60, "tokens_per_minute": 6000},
    "admin": {},  # everything, unlimited
}
SECRET = "a-test-secret-of-32-bytes-or-more!!"


@pytest.fixture(scope="module")
def rsa_keys(tmp_path_factory) -> tuple[str, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = tmp_path_factory.mktemp("rsa") / "public.pem"
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture
def access(tmp_path: Path, rsa_keys, monkeypatch) -> Access:
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump([{"name": "alice", "sha256": hash_key("sk-alice"), "roles": ["user"]},
                                    {"name": "root", "sha256": hash_key("sk-root"), "roles": ["admin"]}]))
    monkeypatch.setenv("SWITCHYARD_TEST_KEYS", json.dumps([{"name": "bob", "sha256": hash_key("sk-bob"),
                                                            "roles": ["nobody-knows-me"]}]))
    monkeypatch.setenv("SWITCHYARD_TEST_JWT", SECRET)
    return Access(AuthConfig.model_validate({
        "enabled": True, "keys_file": str(keys), "keys_env": "SWITCHYARD_TEST_KEYS", "roles": ROLES,
        "jwt": {"algorithms": ["HS256", "RS256"], "secret_env": "SWITCHYARD_TEST_JWT",
                "public_key_file": str(rsa_keys[1]), "audience": "switchyard", "issuer": "tests"}}))


def token(key, alg="HS256", **claims) -> str:
    base = {"sub": "carol", "aud": "switchyard", "iss": "tests", "exp": int(time.time()) + 60, "roles": ["user"]}
    return jwt.encode({k: v for k, v in (base | claims).items() if v is not None}, key, algorithm=alg)


def test_keys_from_file_and_environment(access: Access):
    alice = access.authenticate("Bearer sk-alice")
    assert (alice.name, alice.roles, alice.requests_per_minute) == ("alice", ("user",), 60)
    assert access.authenticate("bearer sk-root").may_use("mamba", "anything")
    with pytest.raises(AccessError, match="no role this server knows") as err:
        access.authenticate("Bearer sk-bob")
    assert err.value.status == 403


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer   ", "Basic c2stYWxpY2U=", "Bearer sk-nobody",
                                    "Bearer " + hash_key("sk-alice")])  # the stored digest is not a key
def test_missing_or_wrong_credentials_are_401(access: Access, header):
    with pytest.raises(AccessError) as err:
        access.authenticate(header)
    assert err.value.status == 401


def test_jwt_hs256_and_rs256(access: Access, rsa_keys):
    carol = access.authenticate("Bearer " + token(SECRET))
    assert (carol.name, carol.roles) == ("jwt:carol", ("user",))  # apart from the API keys' names
    dave = access.authenticate("Bearer " + token(rsa_keys[0], "RS256", sub="dave", roles=["admin"]))
    assert dave.name == "jwt:dave" and dave.may_call("routing_log")


@pytest.mark.parametrize("claims, message", [
    ({"exp": int(time.time()) - 10}, "expired"),
    ({"exp": None}, "exp"),
    ({"aud": "someone-else"}, "(?i)audience"),
    ({"aud": None}, "aud"),
    ({"iss": "elsewhere"}, "(?i)issuer"),
    ({"sub": None}, "sub"),
    ({"roles": "user"}, "list of role names"),
])
def test_bad_jwts_are_401(access: Access, claims, message):
    with pytest.raises(AccessError, match=message) as err:
        access.authenticate("Bearer " + token(SECRET, **claims))
    assert err.value.status == 401


def test_jwt_signed_with_another_key_or_algorithm_is_401(access: Access):
    with pytest.raises(AccessError, match="Signature verification failed"):
        access.authenticate("Bearer " + token("another-secret-of-32-bytes-or-more"))
    with pytest.raises(AccessError, match="'HS512' is not accepted"):
        access.authenticate("Bearer " + token(SECRET + "x" * 40, "HS512"))
    unsigned = jwt.encode({"sub": "x", "aud": "switchyard", "exp": int(time.time()) + 60}, None, algorithm="none")
    with pytest.raises(AccessError, match="'none' is not accepted"):
        access.authenticate("Bearer " + unsigned)


def test_auth_off_is_the_anonymous_caller_with_every_permission():
    caller = Access(AuthConfig()).authenticate(None)
    assert caller is ANONYMOUS and caller.may_call("chat") and caller.may_use("mamba", "pydoc")
    assert caller.requests_per_minute is None


def test_config_refuses_auth_with_no_way_in_and_unknown_endpoints():
    with pytest.raises(ValueError, match="nobody could call"):
        AuthConfig(enabled=True)
    with pytest.raises(ValueError, match="unknown endpoints"):
        AuthConfig.model_validate({"roles": {"x": {"endpoints": ["chat", "admin"]}}})
    with pytest.raises(ValueError, match="HS256 needs secret_env"):
        AuthConfig.model_validate({"jwt": {"algorithms": ["HS256"], "audience": "a"}})


def test_roles_union_and_adapter_grants():
    from routing.access import Role

    roles = {"chat": Role(endpoints=["chat"], backends=["transformer"], adapters=["pydoc"], requests_per_minute=10),
             "refine": Role(endpoints=["refine"], backends=["trm"], adapters=[], requests_per_minute=100)}
    caller = caller_of("eve", ["chat", "refine", "unknown"], roles)
    assert caller.may_call("chat") and caller.may_call("refine") and not caller.may_call("classify")
    assert caller.may_use("transformer", "pydoc") and caller.may_use("trm") and not caller.may_use("mamba")
    assert caller.requests_per_minute == 100 and caller.tokens_per_minute is None  # the most generous
    scoped = caller_of("f", ["s"], {"s": Role(adapters=["transformer:pydoc"])})
    assert scoped.may_use("transformer", "pydoc") and not scoped.may_use("mamba", "pydoc")


def test_token_bucket_refills_and_says_when_to_retry():
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    caller = Caller("x", (), requests_per_minute=60)  # one a second, a minute's burst
    for _ in range(60):
        limiter.take(caller, "requests", 1)
    with pytest.raises(AccessError) as err:
        limiter.take(caller, "requests", 1)
    assert err.value.status == 429 and err.value.retry_after == pytest.approx(1.0)
    now[0] = 2.5
    limiter.take(caller, "requests", 1)
    limiter.take(caller, "requests", 1)
    with pytest.raises(AccessError):
        limiter.take(caller, "requests", 1)
    limiter.take(Caller("y", (), requests_per_minute=60), "requests", 1)  # another caller's bucket is full


def test_each_router_replica_holds_its_share():
    limiter = RateLimiter(replicas=4, clock=lambda: 0.0)
    caller = Caller("x", (), tokens_per_minute=1000)
    limiter.take(caller, "tokens", 250)
    with pytest.raises(AccessError, match="retry in"):
        limiter.take(caller, "tokens", 1)
    with pytest.raises(AccessError, match="more than the 250 a minute") as err:
        limiter.take(caller, "tokens", 251)
    assert err.value.status == 400 and err.value.retry_after is None  # it would never fit: no use retrying


def test_permission_is_a_hard_filter_in_the_policy():
    from deployments.config import AppConfig
    from routing.features import text_features
    from routing.policy import Excluded, Exclusion, Policy, RoutingError

    cfg = AppConfig.from_serve_config()
    policy = Policy({b.name: b.capability for b in cfg.backends}, cfg.routing,
                    adapters={b.name: list(getattr(b, "adapters", {})) for b in cfg.backends})
    only_transformer = Caller("t", ("user",), backends=frozenset({"transformer"}), adapters=frozenset())

    def feat(**kw):
        f = text_features(endpoint="chat", prompt="hi", documents=[], count_tokens=lambda t: 1, max_new_tokens=8,
                          **{k: v for k, v in kw.items() if k != "caller"})
        return type(f)(**{**f.__dict__, "caller": kw.get("caller", ANONYMOUS)})

    d = policy.decide(feat(caller=only_transformer, task="long_context"))  # mamba would be first
    assert (d.backend, d.fallbacks) == ("transformer", ())
    assert d.excluded["mamba"] == Excluded(Exclusion.forbidden, "not allowed for caller t")
    for model in ("mamba", "transformer:pydoc"):
        with pytest.raises(RoutingError) as err:
            policy.decide(feat(caller=only_transformer, model=model))
        assert err.value.kind == "forbidden" and "may not use" in err.value.message


def test_weak_or_broken_jwt_keys_fail_at_start(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("SHORT", "too-short")
    with pytest.raises(ValueError, match="needs 32 or more"):
        Access(AuthConfig.model_validate({"jwt": {"algorithms": ["HS256"], "secret_env": "SHORT", "audience": "a"}}))
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ValueError):
        Access(AuthConfig.model_validate({"jwt": {"algorithms": ["RS256"], "public_key_file": str(bad),
                                                  "audience": "a"}}))

