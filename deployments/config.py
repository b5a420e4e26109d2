"""The application's typed arguments: `args:` of serve_config.yaml, validated once by build_app.

A mistake fails at start with the path of the bad value (pydantic's message), not at the first request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from routing.access import AuthConfig
from routing.config import Capability, RoutingConfig

ROOT = Path(__file__).resolve().parents[1]  # the repository: relative interpreter paths start here


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeploymentOptions(Strict):
    """Ray Serve deployment options, passed to `serve.deployment` as they are."""

    num_replicas: int | Literal["auto"] = Field(1, description="Replicas, or 'auto' with autoscaling_config.")
    max_ongoing_requests: int = Field(8, gt=0, description="Requests one replica runs at once.")
    max_queued_requests: int = Field(-1, ge=-1, description="Requests a caller may queue; -1 is unbounded.")
    ray_actor_options: dict[str, Any] = Field(
        default_factory=dict, description="num_cpus, num_gpus, resources (custom node resources), memory, and "
        "runtime_env: `py_executable` runs the replica on another interpreter (the vLLM venv, .venv-vllm, which "
        "`make setup` builds); a relative path is taken from the repository root."
    )
    autoscaling_config: dict[str, Any] | None = Field(None, description="Serve autoscaling (min/max replicas...).")
    health_check_period_s: float = Field(10, gt=0, description="Seconds between check_health calls.")
    health_check_timeout_s: float = Field(30, gt=0, description="A check_health slower than this fails.")
    graceful_shutdown_timeout_s: float = Field(20, ge=0, description="Wait for in-flight requests on shutdown.")
    logging_config: dict[str, Any] | None = Field(
        None, description="Serve's LoggingConfig: log_level, encoding, enable_access_log, logs_dir."
    )

    @field_validator("ray_actor_options")
    @classmethod
    def _interpreter(cls, options: dict[str, Any]) -> dict[str, Any]:
        """A runtime_env py_executable made absolute, and there: a missing venv fails at start, not in a replica."""
        python = (options.get("runtime_env") or {}).get("py_executable")
        if python is None:
            return options
        path = Path(python) if Path(python).is_absolute() else ROOT / python
        if not path.exists():
            raise ValueError(f"runtime_env.py_executable {python} does not exist: `make setup` builds .venv-vllm")
        return options | {"runtime_env": options["runtime_env"] | {"py_executable": str(path)}}

    def options(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class BackendBase(Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_-]*$", description="Deployment name; the `model` users ask for.")
    model: str = Field(description="`embedded:NAME`, a local checkpoint directory, or a hub id.")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1.")
    capability: Capability = Field(description="What the router may send here.")
    deployment: DeploymentOptions = Field(default_factory=DeploymentOptions)


class LMBackend(BackendBase):
    """A causal language model (Llama-like or Mamba) behind the engine interface."""

    kind: Literal["lm"]
    engine: str = Field(
        "hf", description="`hf`, or `module:Class` of an Engine subclass taking the same arguments."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights' dtype.")
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="peft LoRA adapters: name -> `embedded:NAME`, a local directory or a hub id; "
        "a request selects one with `model: BACKEND:NAME`.",
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed to the engine as keyword arguments: for `hf` batching, speculation and the "
        "adapter cache; for `vllm` fields of vLLM's AsyncEngineArgs (checked at start).",
    )

    @model_validator(mode="before")
    @classmethod
    def _outputs(cls, data: Any) -> Any:
        """Both engines give logprobs and structured outputs: capability.outputs says so unless it is set."""
        if isinstance(data, dict) and isinstance(cap := data.get("capability"), dict) and "outputs" not in cap:
            data = data | {"capability": cap | {"outputs": ["logprobs", "structured"]}}
        return data


class BatchedBackend(BackendBase):
    """A backend whose replica gathers requests into batches with Serve's @serve.batch."""

    max_batch_size: int = Field(8, gt=0, description="Requests run together in one batch (serve.batch); at most "
                                "deployment.max_ongoing_requests, which is 8 unless set.")
    batch_wait_ms: float = Field(2.0, ge=0, description="How long a batch waits to fill.")

    @model_validator(mode="after")
    def _fill(self) -> BatchedBackend:
        if self.deployment.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"deployment.max_ongoing_requests {self.deployment.max_ongoing_requests} is below "
                             f"max_batch_size {self.max_batch_size}: batches could never fill")
        return self


class TRMBackend(BatchedBackend):
    """The Tiny Recursive Model: `model` refines 9x9 sudoku grids, `code_repair_model` the code grid."""

    kind: Literal["trm"]
    code_repair_model: str | None = Field(None, description="The code_repair TRM, like `model`; needed for "
                                          "capability.tasks.code_repair.")
    max_steps: int | None = Field(None, gt=0, description="Default supervision steps when a request names "
                                  "none; unset: each model's own (its config.json).")
    max_steps_limit: int = Field(64, gt=0, description="Largest max_steps a request may ask for.")
    halt_threshold: float | None = Field(None, gt=0, le=1, description="Default halting probability; unset: "
                                         "each model's own, calibrated by training.trm.")

    @model_validator(mode="after")
    def _steps(self) -> TRMBackend:
        if self.max_steps is not None and self.max_steps > self.max_steps_limit:
            raise ValueError(f"max_steps {self.max_steps} is above max_steps_limit {self.max_steps_limit}")
        if self.capability.tasks.get("code_repair", 0) > 0 and self.code_repair_model is None:
            raise ValueError("capability.tasks has code_repair but code_repair_model is not set")
        return self


class ClassifierBackend(BatchedBackend):
    """DINOv2 embeddings plus a linear head."""

    kind: Literal["classifier"]
    backbone: str | None = Field(None, description="Hub id or path of the backbone, if not in `model`.")
    pooling: Literal["cls", "mean"] | None = Field(
        None, description="Embedding: the CLS token or the mean of the patch tokens. The head was fitted on one "
        "(its head.json); unset: that one. A different one fails at start: the head would be wrong for it."
    )
    max_image_bytes: int = Field(8 << 20, gt=0, description="Largest encoded image accepted.")
    max_pixels: int = Field(4096 * 4096, gt=0, description="Largest width x height accepted.")
    label_adapters: dict[str, str] = Field(
        default_factory=dict, description="Label -> the adapter it selects for a chat request with an image: "
        "`NAME` (any language model with that adapter) or `BACKEND:NAME`."
    )
    adapter_min_confidence: float = Field(
        0.5, ge=0, le=1, description="A chat image's label picks its adapter when the label's probability is at "
        "least this; below, the base model answers and the response says so."
    )


Backend = Annotated[LMBackend | TRMBackend | ClassifierBackend, Field(discriminator="kind")]


class RouterConfig(Strict):
    tokenizer: str = Field(
        "embedded:tiny-llama", description="Tokenizer that counts prompt tokens for routing (the serving one)."
    )
    request_timeout_s: float = Field(60, gt=0, description="Deadline of one request, fallbacks included.")
    max_tokens: int = Field(1024, gt=0, description="Largest max_tokens a request may ask for (400 above).")
    default_max_tokens: int = Field(256, gt=0, description="max_tokens of a request that names none.")
    routing_log_size: int = Field(1000, gt=0, description="Decisions kept for GET /v1/routing/log.")
    max_body_bytes: int = Field(16 << 20, gt=0, description="Largest request body accepted (413 above).")
    max_in_flight: int = Field(
        256, gt=0, description="Requests one router replica handles at once; beyond, a 503 in OpenAI's shape with "
        "Retry-After. Below deployment.max_ongoing_requests, so that Serve's proxy never has to queue or refuse "
        "(its refusal is plain text without Retry-After)."
    )
    routing_log_path: str | None = Field(
        None, description="Also append every routing log entry to this file as a JSON line (opened in append "
        "mode, one write a line, so router replicas may share it)."
    )
    audit_log_path: str | None = Field(
        None, description="Append one JSON line per request here: time, caller, endpoint, backend, adapter, status, "
        "tokens in and out, latency, fallback (deployments/jsonl.py: batched, fsynced, reopened after rotation)."
    )
    audit_include_prompt: bool = Field(False, description="Also record the prompt text in the audit log.")
    audit_flush_s: float = Field(1.0, ge=0, description="Audit lines are written in batches this often (0: each).")
    unhealthy_after: int = Field(
        3, gt=0, description="Consecutive failed calls after which the router avoids a backend for a cooldown."
    )
    unhealthy_cooldown_s: float = Field(10, ge=0, description="How long the router avoids a failing backend "
                                        "before one probe call (routing/breaker.py).")
    breaker_failure_rate: float | None = Field(
        0.5, gt=0, le=1, description="Also open a backend's circuit when this share of its last breaker_window "
        "calls failed; null: consecutive failures only."
    )
    breaker_window: int = Field(20, gt=0, description="Calls the failure rate is taken over.")
    retry_after_s: float = Field(
        1, gt=0, description="Retry-After of every 503 the router gives (routing/outcome.py): at capacity, no "
        "backend available, every backend failed. Its view of replicas and circuits changes on that scale."
    )
    stream_stall_s: float = Field(
        30, gt=0, description="A stream that sends nothing for this long after its first byte is taken as failed "
        "and continued on the next candidate (deployments/dispatch.py)."
    )
    replica_poll_s: float = Field(
        0.5, gt=0, description="How often the router reads which backend replicas run (deployments/replicas.py): "
        "a backend with none left is skipped, and calls waiting on it move on, instead of waiting for the deadline."
    )
    deployment: DeploymentOptions = Field(
        default_factory=lambda: DeploymentOptions(max_ongoing_requests=320, max_queued_requests=1024))

    @model_validator(mode="after")
    def _admission(self) -> RouterConfig:
        if self.deployment.max_ongoing_requests <= self.max_in_flight:
            raise ValueError(f"router.deployment.max_ongoing_requests ({self.deployment.max_ongoing_requests}) must be "
                             f"above router.max_in_flight ({self.max_in_flight}): the router answers overload itself")
        return self


class AppConfig(Strict):
    router: RouterConfig = Field(default_factory=RouterConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig, description="API keys, JWT, roles and rate limits.")
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    backends: list[Backend] = Field(min_length=1, description="One deployment each.")

    @model_validator(mode="after")
    def _names(self) -> AppConfig:
        names = [b.name for b in self.backends]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"backend names must be unique; repeated: {dupes}")
        if reserved := {"auto", "router"} & set(names):
            raise ValueError(f"{sorted(reserved)} are reserved names and cannot name a backend")
        adapters = {b.name: set(b.adapters) for b in self.backends if isinstance(b, LMBackend)}
        for b in self.backends:
            for label, target in getattr(b, "label_adapters", {}).items():
                backend, _, adapter = target.rpartition(":")
                found = adapter in adapters.get(backend, ()) if backend else any(adapter in a for a in adapters.values())
                if not found:
                    raise ValueError(f"backends.{b.name}.label_adapters.{label}: no language model backend has "
                                     f"an adapter {target!r}")
        return self

    @classmethod
    def from_serve_config(cls, path: str | Path = "serve_config.yaml") -> AppConfig:
        """The `args:` of a serve config's first application, validated (benchmarks start from it)."""
        return cls.model_validate(yaml.safe_load(Path(path).read_text())["applications"][0]["args"])

    def backend(self, name: str) -> Backend:
        return next(b for b in self.backends if b.name == name)
