"""Objectives: registered by name, each declares the signals it needs and returns per-token losses.

An objective never reduces over tokens (aggregate.py does, once) and never reads the config: `build`
turns an ObjectiveConfig into an object that holds plain values.
"""

from __future__ import annotations

from typing import Callable, Protocol

from opd.types import RolloutBatch, Signal, StudentOutputs, TeacherScores, TokenLoss


class Objective(Protocol):
    needs: frozenset[Signal]

    def __call__(self, student: StudentOutputs, batch: RolloutBatch, teacher: TeacherScores) -> TokenLoss: ...


_REGISTRY: dict[str, Callable[..., Objective]] = {}


def register(name: str):
    """Class decorator: make an objective constructible by its ALGORITHMS.md name."""

    def decorate(factory):
        if name in _REGISTRY:
            raise ValueError(f"objective {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return decorate


def registered_names() -> list[str]:
    return sorted(_REGISTRY)


def build_single(name: str, config, temperature: float = 1.0) -> Objective:
    if name not in _REGISTRY:
        raise ValueError(f"unknown objective {name!r}; registered: {registered_names()}")
    return _REGISTRY[name].from_config(config, temperature)


def build_objective(config, temperature: float = 1.0) -> Objective:
    """The configured objective: `name`, plus weighted `add` terms, plus the guidance term when enabled.

    `temperature` is the scoring temperature (full-vocabulary objectives apply it to both models' logits).
    """
    from opd.objectives.compose import PrefixImitation, Weighted

    main = build_single(config.name, config, temperature)
    terms = [(term.weight, build_single(term.name, config, temperature)) for term in config.add]
    if config.guidance.enabled:
        terms.append((1.0, PrefixImitation(beta=config.guidance.beta)))
    if not terms:
        return main
    return Weighted(terms=((1.0, main), *terms))


# Importing the modules registers their objectives.
from opd.objectives import baselines, grpo, kl, pg, tropd  # noqa: E402,F401
