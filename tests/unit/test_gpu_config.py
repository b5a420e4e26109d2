"""serve_config.gpu.yaml is a tested artefact: it validates, routes as the CPU config does, and its
engine_kwargs are what its engines take (vLLM's AsyncEngineArgs fields, HFEngine's parameters)."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import yaml

from deployments.config import AppConfig, LMBackend
from models.vllm_engine import adapter_rank, engine_args
from tests.unit.test_vllm_engine import FIELDS

ROOT = Path(__file__).resolve().parents[2]


def app_args(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())["applications"][0]["args"]


@pytest.fixture(scope="module")
def config() -> AppConfig:
    return AppConfig.model_validate(app_args("serve_config.gpu.yaml"))


def lm(config: AppConfig, engine: str) -> list[LMBackend]:
    return [b for b in config.backends if isinstance(b, LMBackend) and b.engine == engine]


def test_routing_is_the_cpu_configs_and_tokens_are_counted_by_the_transformers_tokenizer():
    gpu, cpu = app_args("serve_config.gpu.yaml"), app_args("serve_config.yaml")
    assert gpu["routing"] == cpu["routing"]
    assert {**gpu["router"], "tokenizer": None, "deployment": None} == {**cpu["router"], "tokenizer": None, "deployment": None}
    # the GPU cluster runs two routers, so that losing a node leaves one (the CPU quickstart has one machine)
    assert {**gpu["router"]["deployment"], "num_replicas": 1} == cpu["router"]["deployment"]
    transformer = next(b for b in gpu["backends"] if b["name"] == "transformer")
    assert gpu["router"]["tokenizer"] == transformer["model"]
    assert [b["name"] for b in gpu["backends"]] == [b["name"] for b in cpu["backends"]]


def test_cuda_backends_ask_ray_for_a_gpu(config):
    for backend in config.backends:
        gpus = backend.deployment.ray_actor_options.get("num_gpus", 0)
        assert (gpus > 0) == backend.device.startswith("cuda"), backend.name


def vllm_args(backend: LMBackend, fields) -> dict:
    rank = max(map(adapter_rank, backend.adapters.values()), default=None)
    return engine_args(backend.model, backend.device, backend.dtype, backend.capability.max_context,
                       backend.adapters, backend.engine_kwargs, fields, lora_rank=rank)


def test_vllm_backend_translates(config):
    (transformer,) = lm(config, "vllm")
    out = vllm_args(transformer, FIELDS)
    assert (out["model"], out["max_model_len"]) == ("meta-llama/Llama-3.1-8B-Instruct", 32768)
    assert out["speculative_config"]["method"] == "eagle"


def test_vllm_backend_against_the_installed_vllm(config):
    pytest.importorskip("vllm")
    from vllm import AsyncEngineArgs

    fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    for backend in lm(config, "vllm"):
        assert set(vllm_args(backend, fields)) <= fields


def test_hf_engine_kwargs_are_hf_engine_parameters(config):
    from models.hf_engine import HFEngine

    params = set(inspect.signature(HFEngine).parameters)
    for backend in lm(config, "hf"):
        assert set(backend.engine_kwargs) <= params, backend.name
