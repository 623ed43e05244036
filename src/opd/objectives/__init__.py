"""Objectives: registered by name, each declares the facts the rest of opd asks of it, and returns
per-token losses.

The facts: `needs` (the signals to compute before it runs, including what the rollout must provide:
sampler entropy, teacher-written responses), `uses_lam` (its advantage reads each domain's lam, so lam != 1
is meaningful) and `takes_dataset_responses` (its loss is valid on dataset responses, GKD's off-policy
share). Config validation and the collector ask these; nothing outside this package tests an objective's
name.

An objective never reduces over tokens (aggregate.py does, once) and never reads the config: its builder
turns an ObjectiveConfig (and a BuildContext) into an object that holds plain values. This package does
not import opd.config (config imports it, for the option blocks and to ask the facts).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

from opd.types import RolloutBatch, Signal, StudentOutputs, TeacherScores, TokenLoss

# Signals that only a domain teacher can provide: an objective needing one needs a teacher model.
TEACHER_SIGNALS = frozenset({Signal.TEACHER_LOGPROBS, Signal.TEACHER_TOPK, Signal.TEACHER_ENTROPY,
                             Signal.FULL_DISTRIBUTIONS, Signal.TEACHER_RESPONSES})
DEFAULT_OBJECTIVE = "gopd"  # ObjectiveConfig.name's default
# For messages: the objectives (and options) whose advantage reads lam.
LAM_READERS = "gopd, or tropd with objective.tropd.advantage: gopd"


class Objective(Protocol):
    needs: frozenset[Signal]
    uses_lam: bool
    takes_dataset_responses: bool

    def __call__(self, student: StudentOutputs, batch: RolloutBatch, teacher: TeacherScores) -> TokenLoss: ...


@dataclass(frozen=True, kw_only=True, slots=True)
class BuildContext:
    """What a builder needs besides the objective's own options."""

    temperature: float = 1.0  # the scoring temperature (full-vocabulary objectives apply it to both models)
    lam_by_domain: Mapping[str, float] = field(default_factory=dict)  # every domain's resolved lam


Builder = Callable[[Any, BuildContext], Objective]
_REGISTRY: dict[str, Builder] = {}


def register_builder(name: str, builder: Builder) -> None:
    """Make an objective constructible by its docs/algorithms.md name."""
    if name in _REGISTRY:
        raise ValueError(f"objective {name!r} is registered twice")
    _REGISTRY[name] = builder


def register(name: str):
    """Class decorator: register a class by its `from_config(config, context)`."""

    def decorate(cls):
        register_builder(name, cls.from_config)
        return cls

    return decorate


def unregister(name: str) -> None:
    """Remove a registration (tests that register throwaway objectives clean up with this)."""
    del _REGISTRY[name]


def registered_names() -> list[str]:
    return sorted(_REGISTRY)


def options(block) -> dict[str, Any]:
    """An option block's fields as keyword arguments, for objectives whose fields carry the same names."""
    return {f.name: getattr(block, f.name) for f in dataclasses.fields(block)}


def build_single(name: str, config, context: BuildContext = BuildContext()) -> Objective:
    if name not in _REGISTRY:
        raise ValueError(f"unknown objective {name!r}; registered: {registered_names()}")
    return _REGISTRY[name](config, context)


def build_objective(config, *, temperature: float = 1.0, lam_by_domain: Mapping[str, float] | None = None) -> Objective:
    """The configured objective: `name`, plus weighted `add` terms, plus the guidance term when enabled.

    `temperature` is the scoring temperature; `lam_by_domain` every domain's lam (Config.lam_by_domain).
    Without it, an objective that reads lam refuses every row (its domain has no lam).
    """
    context = BuildContext(temperature=temperature, lam_by_domain=dict(lam_by_domain or {}))
    main = build_single(config.name, config, context)
    terms = [(term.weight, build_single(term.name, config, context)) for term in config.add]
    if config.guidance.enabled:
        terms.append((1.0, PrefixImitation(beta=config.guidance.beta)))
    if not terms:
        return main
    return Weighted(terms=((1.0, main), *terms))


# Importing the modules registers their objectives (they import `register` from here, hence the end).
from opd.objectives import baselines, kl, pg, tropd  # noqa: E402,F401
from opd.objectives.compose import PrefixImitation, Weighted  # noqa: E402
