"""Routing policy settings: capabilities of each backend, score weights, task rules.

Plain pydantic models, validated once at start. They import neither Ray, torch nor FastAPI.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from routing.cost import CostModel

Modality = Literal["text", "image", "grid"]
Output = Literal["logprobs", "structured"]

Task = Literal[
    "text_generation",
    "code_generation",
    "code_analysis",
    "code_repair",
    "long_context",
    "streaming",
    "iterative_refinement",
    "reasoning",
    "puzzle_solving",
    "image_classification",
]
TASKS: tuple[str, ...] = get_args(Task)  # the tasks of DESIGN.md; an explicit `task` outside them is a 400


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Quality(Strict):
    """A backend's measured quality per task (`python -m bench.quality --write`)."""

    bits_per_byte: dict[Task, float] = Field(
        description="Bits per UTF-8 byte of held-out reference answers for each task, under the backend's own "
        "tokenizer and chat template: lower is better, and comparable across tokenizers."
    )
    score: dict[Task, float] = Field(
        default_factory=dict, description="A task score in [0, 1] where the task has one (exact match on short "
        "factual questions for text_generation); shown, not used to rank."
    )
    measured: str = Field("", description="Where and how it was measured (bench command, date).")


class Capability(Strict):
    """What one backend can do, as the router sees it."""

    modalities: list[Modality] = Field(description="Input kinds the backend accepts.", min_length=1)
    tasks: dict[Task, float] = Field(
        description="Task affinity in [0, 1]; a task missing here (or 0) is one the backend does not serve."
    )
    strength: float = Field(0.5, ge=0, le=1, description="Output quality relative to the other backends.")
    efficiency: float = Field(0.5, ge=0, le=1, description="Resource efficiency: 1 is the cheapest to run.")
    max_context: int = Field(gt=0, description="Longest prompt plus new tokens the backend accepts.")
    cost: CostModel | None = Field(
        None, description="Measured latency curves (bench.long_context --write); text backends with one are "
        "ranked by predicted latency under strategy 'cost'."
    )
    quality: Quality | None = Field(
        None, description="Measured quality per task (bench.quality --write); under strategy 'cost', a backend "
        "ranks by latency only while its quality is within routing.quality_margin of the best."
    )
    outputs: list[Output] = Field(
        default_factory=list, description="What its answers can carry beyond text: `logprobs`, and `structured` "
        "(JSON constrained to a schema: response_format, forced tool calls). A request that asks for one goes "
        "only to backends that list it. Language-model backends have both unless their config says otherwise."
    )

    @field_validator("tasks")
    @classmethod
    def _affinity_range(cls, tasks: dict[str, float]) -> dict[str, float]:
        bad = {t: a for t, a in tasks.items() if not 0 <= a <= 1}
        if bad:
            raise ValueError(f"task affinities must lie in [0, 1], got {bad}")
        return tasks


class Weights(Strict):
    """Score = task * affinity + strength * strength + efficiency * efficiency + headroom * headroom."""

    task: float = Field(0.4, ge=0, description="Weight of the backend's affinity for the task.")
    strength: float = Field(0.2, ge=0, description="Weight of the backend's strength.")
    efficiency: float = Field(0.2, ge=0, description="Weight of the backend's resource efficiency.")
    headroom: float = Field(0.2, ge=0, description="Weight of the free share of the backend's context.")
    load: float = Field(
        0.1, ge=0, le=1, description="Score is multiplied by (1 - load * busy share) for live load."
    )


class Rule(Strict):
    """Infers (or upgrades) the task from request features.

    A rule without `from_tasks` applies only while the task is still unknown (no explicit task).
    A rule with `from_tasks` rewrites a task already known, explicit or inferred, when it is in that
    list: the long-document rule turns text generation into long_context.
    A rule matches when any of its conditions holds.
    """

    name: str = Field(description="Shown in the decision's reason and the routing log.")
    task: Task = Field(description="The task the rule assigns.")
    from_tasks: list[Task] | None = Field(None, description="Tasks this rule rewrites; null: unknown task only.")
    min_tokens: int | None = Field(None, gt=0, description="Prompt plus documents of at least this many tokens.")
    min_pages: int | None = Field(None, gt=0, description="Documents spanning at least this many pages.")
    keywords: list[str] = Field(default_factory=list, description="Whole words or phrases, case-insensitive.")

    @model_validator(mode="after")
    def _has_condition(self) -> Rule:
        if self.min_tokens is None and self.min_pages is None and not self.keywords:
            raise ValueError(f"rule {self.name!r} needs min_tokens, min_pages or keywords")
        return self


class IntentSettings(Strict):
    """The learned text intent classifier (training/intent.py), tried before the rules."""

    model: str = Field(description="`embedded:NAME` or a directory written by training.intent.")
    threshold: float = Field(
        0.5, ge=0, le=1, description="Its task is used when its confidence (top class probability) is at least "
        "this; below, the keyword rules decide."
    )


class RoutingConfig(Strict):
    strategy: Literal["cost", "score"] = Field(
        "cost",
        description="cost: among the backends that can serve the request, the lowest predicted latency "
        "(backends without a cost model follow, by score); score: the weighted score alone.",
    )
    weights: Weights = Field(default_factory=Weights, description="Score weights.")
    quality_margin: float | None = Field(
        0.25, ge=0, description="Under strategy 'cost', in bits per byte: the backends whose measured quality for "
        "the task is within this of the best measured one are ranked by predicted latency, the rest after them, "
        "best quality first. 0: always the best; null: quality is ignored, always the cheapest."
    )
    default_task: Task = Field("text_generation", description="Task when neither request nor rule names one.")
    rules: list[Rule] = Field(default_factory=list, description="Task rules, tried in order; first match wins.")
    intent: IntentSettings | None = Field(
        None, description="Learned task inference for text requests: explicit task, then this when confident, "
        "then the rules, then default_task."
    )
