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


def build_objective(config) -> Objective:
    """The objective named by config.name, built from the ObjectiveConfig's plain values."""
    if config.name not in _REGISTRY:
        raise ValueError(f"unknown objective {config.name!r}; registered: {registered_names()}")
    return _REGISTRY[config.name].from_config(config)


from opd.objectives import pg  # noqa: E402,F401  (registers opd and gopd)
