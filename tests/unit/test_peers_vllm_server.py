"""bench.peers starts vLLM's own server with the engine arguments the transformer backend gets: a config
group among them (structured_outputs_config) must reach vLLM's CLI as JSON, which its parser reads;
Python's repr of a dict made the server exit with a usage error."""

from __future__ import annotations

import json

from bench import peers
from deployments.config import AppConfig


def test_the_shipped_transformer_args_reach_the_cli_as_vllm_reads_them(monkeypatch):
    started = []
    monkeypatch.setattr(peers, "resolve_model", lambda ref: f"/models/{ref}")
    monkeypatch.setattr(peers, "adapter_rank", lambda path: 8)
    monkeypatch.setattr(peers.subprocess, "Popen", lambda cmd, **kwargs: started.append(cmd))
    backend = AppConfig.from_serve_config().backend("transformer")
    peers.vllm_server(backend, 8811)
    (cmd,) = started
    assert all(isinstance(part, str) for part in cmd)
    for key, value in backend.engine_kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            assert flag in cmd
        elif isinstance(value, dict):
            assert json.loads(cmd[cmd.index(flag) + 1]) == value
        else:
            assert cmd[cmd.index(flag) + 1] == str(value)
    assert cmd[cmd.index("--served-model-name") + 1] == backend.name
