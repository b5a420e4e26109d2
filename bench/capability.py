"""Writing measured figures into the serve configs: each backend's one-line `capability.KEY: {...}`,
replaced where it is or added after the backend's `cost:` line, comments kept (bench.long_context
writes `cost`, bench.quality writes `quality`); and running a backend's measurement in a process of its
own, on the interpreter Serve gives it."""

from __future__ import annotations

import multiprocessing
import re
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# serve_config.yaml and the RayService that embeds its applications (tests/unit/test_k8s.py)
CONFIGS = (ROOT / "serve_config.yaml", ROOT / "k8s" / "rayservice-cpu.yaml")


def configs_for(config: Path) -> tuple[Path, ...]:
    """The files a --write updates: both for serve_config.yaml, else the one named."""
    return CONFIGS if config.resolve() == CONFIGS[0] else (config,)


def write_lines(key: str, values: dict[str, str], paths=CONFIGS) -> None:
    """Sets `KEY: VALUE` (VALUE a one-line flow mapping) in each named backend's capability."""
    for path in paths:
        out, current = [], None
        for line in path.read_text().splitlines(keepends=True):
            if m := re.match(r"\s*- name: (\S+)", line):
                current = m.group(1)
            if current in values and re.match(rf"\s*{key}: ", line):
                if key == "cost":
                    out.append(re.match(r"\s*", line).group(0) + f"{key}: {values[current]}\n")
                continue  # not cost: written again below, after cost
            out.append(line)
            if key != "cost" and current in values and (m := re.match(r"(\s*)cost: ", line)):
                out.append(f"{m.group(1)}{key}: {values[current]}\n")
        path.write_text("".join(out))


def on_backend_interpreter(backend: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` in a fresh process on the interpreter Serve would give `backend` (deployments.config's
    LMBackend: its runtime_env py_executable, .venv-vllm for vLLM, else this one), as Serve runs each
    backend in an actor process of its own: two engines in one process compete for the cores even when
    one is idle (bench.long_context measured it). `fn` is a module-level function; `args` plain data."""
    module = fn.__module__
    if module == "__main__":  # run with -m: the child imports it by its name
        module = sys.modules["__main__"].__spec__.name
    context = multiprocessing.get_context("spawn")
    runtime_env = backend.deployment.ray_actor_options.get("runtime_env") or {}
    context.set_executable(runtime_env.get("py_executable", sys.executable))
    try:
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            return pool.submit(_call, f"{module}:{fn.__qualname__}", *args).result()
    finally:
        context.set_executable(sys.executable)


def _call(target: str, *args: Any) -> Any:
    """In the child: its own interpreter's site-packages in place of the parent's (spawn hands the
    parent's sys.path over: .venv's torch would shadow .venv-vllm's), then `module:function`(*args),
    imported only now for that reason."""
    import importlib
    import site

    own = site.getsitepackages()
    sys.path[:] = [p for p in sys.path if "site-packages" not in p or p in own]
    for directory in own:
        if directory not in sys.path:
            site.addsitedir(directory)  # with its .pth files
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)(*args)
