"""bench.peers' router hop against LiteLLM, the parts that need no server: the proxy's config, the venv it
runs from (its own lock, its own make target, never CI's), the message when that venv is missing, and
bench.router_overhead's interleaving that both benches measure with."""

from __future__ import annotations

import asyncio
import random
import re

import httpx
import pytest

from bench import peers
from bench.router_overhead import added_ms, interleaved
from tests.support import ROOT


def test_litellm_serves_the_backend_name_from_the_vllm_server():
    cfg = peers.litellm_config("transformer", "http://127.0.0.1:8811")
    (entry,) = cfg["model_list"]
    assert entry["model_name"] == "transformer"  # the name the chats send, as vLLM's --served-model-name
    assert entry["litellm_params"] == {"model": "hosted_vllm/transformer", "api_base": "http://127.0.0.1:8811/v1"}
    # no key checked on either side (vLLM's server, Switchyard's quickstart); LiteLLM must be told to start so
    assert cfg["general_settings"] == {"dangerously_permit_weak_or_unset_master_key": True}


def test_the_litellm_lock_pins_the_version_of_litellm_in_with_hashes():
    wanted = re.search(r"^litellm\[proxy\]==(\S+)", (ROOT / "lock" / "litellm.in").read_text(), re.M).group(1)
    lock = (ROOT / "lock" / "requirements-litellm.txt").read_text()
    assert re.search(rf"^litellm=={re.escape(wanted)} \\$", lock, re.M)
    pins = re.findall(r"^[A-Za-z0-9_.\-]+==\S+", lock, re.M)
    entries = re.split(r"\n(?=[A-Za-z0-9])", lock.strip())
    assert len(pins) == len(entries) and all("--hash=sha256:" in e for e in entries)  # pip --require-hashes


def rule(makefile: str, target: str) -> str:
    """The prerequisites of a Makefile rule."""
    return re.search(rf"^{re.escape(target)}:(.*)$", makefile, re.M).group(1)


def test_only_make_peers_installs_litellm():
    makefile = (ROOT / "Makefile").read_text()
    assert "$(LITELLM_STAMP)" in rule(makefile, "peers")
    assert "lock/requirements-litellm.txt" in rule(makefile, "$(LITELLM_STAMP)")
    for target in ("setup", "test", "test-random", "serve", "$(STAMP)", "$(VLLM_STAMP)"):
        assert "LITELLM" not in rule(makefile, target), target
    assert "-r lock/requirements-litellm.txt" in makefile and "--require-hashes" in makefile
    assert "compile lock/litellm.in $(LOCK_FLAGS) -o lock/requirements-litellm.txt" in makefile  # make lock


def test_a_missing_venv_names_the_make_target(tmp_path, monkeypatch):
    monkeypatch.setattr(peers, "ROOT", tmp_path)
    monkeypatch.setattr(peers, "LITELLM", tmp_path / ".venv-litellm" / "bin" / "litellm")
    monkeypatch.setattr(peers, "VLLM_PY", tmp_path / ".venv-vllm" / "bin" / "python")
    peers.VLLM_PY.parent.mkdir(parents=True)
    peers.VLLM_PY.touch()
    peers.check_venvs(["serving"])  # the serving table does not need LiteLLM
    with pytest.raises(SystemExit, match=r"needs \.venv-litellm: run `make peers`"):
        peers.check_venvs(["hop"])


def test_interleaved_keeps_rounds_after_warmup_each_path_once_a_round_in_changing_orders():
    sent: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request.url.path)
        return httpx.Response(200, headers={"x-path": request.url.path}, json={})

    seen: list[tuple[str, str]] = []
    calls = {name: (f"http://test/{name}", {}) for name in "abcd"}

    async def run() -> dict[str, list[float]]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            return await interleaved(client, calls, rounds=30, warmup=5, order=random.Random(1),
                                     seen=lambda key, r: seen.append((key, r.headers["x-path"])))

    lat = asyncio.run(run())
    assert {k: len(v) for k, v in lat.items()} == {k: 30 for k in calls}
    assert len(sent) == 35 * 4 and len(seen) == 30 * 4 and all(path == f"/{key}" for key, path in seen)
    rounds = [tuple(sent[i:i + 4]) for i in range(0, len(sent), 4)]
    assert all(sorted(r) == ["/a", "/b", "/c", "/d"] for r in rounds)
    assert len(set(rounds)) > 5  # the order changes from round to round


def test_added_is_the_difference_of_the_quantiles():
    assert added_ms([5.0, 6.0, 7.0], [1.0, 2.0, 30.0]) == 4.0
    assert added_ms([5.0, 6.0, 70.0], [1.0, 2.0, 3.0], 0.99) == 67.0
