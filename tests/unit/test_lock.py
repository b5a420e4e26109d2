"""The environment the tests run in is the lock's (lock/README.md): `make setup` installed exactly
lock/requirements.txt, so what passes here is what a fresh clone gets."""

import re
import sysconfig
from importlib import metadata

from tests.support import ROOT


def pins(path) -> dict[str, str]:
    return {name.lower(): version for name, version in re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)", path.read_text(), re.M)}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_locked_package_is_installed_at_its_locked_version():
    locked = {canonical(n): v for f in ("requirements.txt", "weights.txt") for n, v in pins(ROOT / "lock" / f).items()}
    # the venv's own site-packages: once something imports setuptools (litellm does), its vendored copies
    # of packaging, zipp... are on sys.path too, with dist-infos of older versions
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {canonical(d.metadata["Name"]): d.version for d in metadata.distributions(path=site)}
    wrong = {n: (v, installed.get(n)) for n, v in locked.items() if installed.get(n) != v}
    assert not wrong, f"(locked, installed): {wrong}; `make setup` after `rm -rf .venv` installs the lock"


def test_both_locks_take_the_same_torch_and_ray():
    main, vllm = pins(ROOT / "lock" / "requirements.txt"), pins(ROOT / "lock" / "requirements-vllm.txt")
    assert main["torch"] == vllm["torch"] == "2.13.0+cpu"
    assert main["ray"] == vllm["ray"]  # one Ray for both environments of the app
    # the router (.venv) and the vLLM replica (.venv-vllm) exchange pickled dataclasses and pydantic models
    assert all(main[p] == vllm[p] for p in ("pydantic", "pydantic-core", "cloudpickle", "msgpack"))
