"""Asynchronous rollouts (`rollout.async`): a rollout thread produces the next steps' scored batches on the
servers while the training thread trains, with bounded staleness.

Versions count optimizer steps: the servers hold version v once the trainer has synced the weights of its
v-th step. Batch s is trained when the trainer is at version s - 1, and is sampled with version exactly
max(first, s - 1 - K), K = max_staleness, first = the version the run (or resumed segment) started with:

- the rollout thread, before generating batch s, waits until the synced version is >= s - 1 - K (the
  "generation waited for weights" time);
- the trainer syncs version v only once batch min(v + K, last) is produced, that is while the rollout thread
  waits for version v and no request is in flight (a server reloading during requests would mix weights).

So the staleness of every batch is fixed by the schedule, not by thread timing: a run is as reproducible as a
synchronous one (each step's random draws come from its own seed, collect.rollout_seed), and K = 0 is the
synchronous step on two threads, bit for bit. The trainer refuses a batch older than K versions (a guard
against a broken schedule). In-flight batches are not checkpointed: a resumed run regenerates them from the
checkpoint's weights (their staleness then starts again from 0).

The rollout thread runs only `produce` (collect, grade, score); every collective stays in the training
thread. With more than one process each runs its own rollout thread on its share of the prompts, and the
schedule above holds per process. That needs every teacher and reference served (checks.py): served models
are HTTP requests, while an in-process one may issue collectives on the rollout thread (a sharded teacher's
gathers, the HF sampler's synced lockstep) that would race the trainer's. A sync's reload waits for every process
(served/engine.py), so no process's requests are in flight while the servers take new weights.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from opd.types import RolloutBatch, TeacherScores

# How long close() waits for the rollout thread; a request to the servers can outlast it (their timeouts).
JOIN_SECONDS = 30.0


@dataclass(frozen=True, kw_only=True, slots=True)
class ScoredBatch:
    """A step's rollouts, graded and scored, ready to train on."""

    step: int  # the optimizer step it is trained in (1-based)
    weight_version: int  # optimizer steps of the weights the servers held when it was sampled
    batch: RolloutBatch
    teacher: TeacherScores
    rollout_seconds: float  # collect + grade
    score_seconds: float
    generation_wait_seconds: float = 0.0  # the rollout thread waited for weights before sampling it


class StaleBatch(RuntimeError):
    """A batch older than max_staleness reached the trainer: the schedule is broken (a bug, not user input)."""


def check_staleness(scored: ScoredBatch, trainer_version: int, max_staleness: int) -> int:
    """The batch's staleness (trainer version - weight version); raises StaleBatch past `max_staleness`."""
    staleness = trainer_version - scored.weight_version
    if not 0 <= staleness <= max_staleness:
        raise StaleBatch(f"step {scored.step}: batch sampled with weights of step {scored.weight_version}, trained "
                         f"at step {trainer_version} (staleness {staleness}, rollout.max_staleness {max_staleness})")
    return staleness


class RolloutPipeline:
    """The rollout thread and the schedule it shares with the trainer (one condition guards all state).

    `produce(step, weight_version)` returns the step's ScoredBatch; it runs on the rollout thread only.
    """

    def __init__(self, produce: Callable[[int, int], ScoredBatch], *, first_version: int, last_step: int,
                 max_staleness: int):
        self._produce = produce
        self.max_staleness = max_staleness
        self.last_step = last_step
        self._condition = threading.Condition()
        self._synced = first_version  # the version the servers hold
        self._produced_through = first_version  # batches up to this step are produced
        self._ready: dict[int, ScoredBatch] = {}
        self._generating_since: float | None = None  # while producing: when it started
        self._error: BaseException | None = None
        self._stopping = False
        self._busy: list[tuple[float, float]] = []  # the rollout thread's produce intervals (perf_counter)
        self._thread = threading.Thread(target=self._run, name="opd-rollouts", daemon=True)

    def __enter__(self) -> RolloutPipeline:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------------- the rollout thread

    def _run(self) -> None:
        try:
            for step in range(self._produced_through + 1, self.last_step + 1):
                waited = self._wait_for_weights(step)
                if waited is None:
                    return
                scored = self._produce(step, self._synced)  # the trainer syncs only once this batch is in
                finished = time.perf_counter()
                with self._condition:
                    self._busy.append((self._generating_since, finished))
                    self._generating_since = None
                    self._ready[step] = dataclasses.replace(scored, generation_wait_seconds=waited)
                    self._produced_through = step
                    self._condition.notify_all()
        except BaseException as error:  # noqa: BLE001 -- handed to the trainer, which raises it in its step
            with self._condition:
                self._generating_since = None
                self._error = error
                self._condition.notify_all()

    def _wait_for_weights(self, step: int) -> float | None:
        """Seconds waited until the servers hold version step - 1 - K, marking generation started; None on stop."""
        started = time.perf_counter()
        with self._condition:
            self._condition.wait_for(lambda: self._stopping or self._synced >= step - 1 - self.max_staleness)
            if self._stopping:
                return None
            self._generating_since = time.perf_counter()
            return self._generating_since - started

    # ----------------------------------------------------------------------- the training thread

    def next_batch(self, step: int) -> tuple[ScoredBatch, float]:
        """Step `step`'s batch and the seconds the trainer waited for it; the rollout thread's error if it
        failed before producing it (a server down: ServerUnavailable, named by the trainer's step)."""
        started = time.perf_counter()
        with self._condition:
            self._condition.wait_for(lambda: step in self._ready or self._error is not None)
            if step not in self._ready:
                raise self._error
            scored = self._ready.pop(step)
        return scored, time.perf_counter() - started

    def sync(self, version: int, take_weights: Callable[[], None]) -> float:
        """Hand the servers version `version` (`take_weights`: the sampler's sync) once the schedule allows:
        batch min(version + K, last) produced, or the rollout thread stopped by an error. Returns the
        seconds waited for that."""
        needed = min(version + self.max_staleness, self.last_step)
        started = time.perf_counter()
        with self._condition:
            self._condition.wait_for(lambda: self._produced_through >= needed or self._error is not None)
            waited = time.perf_counter() - started
            # The wait above makes this impossible (a bug guard): a reload during requests would mix weights.
            if self._generating_since is not None:
                raise RuntimeError(f"sync of version {version} while the rollout thread generates")
            take_weights()  # under the lock: the rollout thread cannot start a batch while servers reload
            self._synced = version
            self._condition.notify_all()
        return waited

    def busy_fraction(self, start: float, end: float) -> float:
        """Fraction of [start, end] the rollout thread spent producing (generating, grading, scoring)."""
        with self._condition:
            intervals = list(self._busy)
            if self._generating_since is not None:
                intervals.append((self._generating_since, end))
            self._busy = [(a, b) for a, b in self._busy if b > start]  # older ones are never asked again
        covered = sum(max(0.0, min(b, end) - max(a, start)) for a, b in intervals)
        return covered / (end - start) if end > start else 0.0

    def close(self) -> None:
        """Stop the rollout thread (a batch being produced finishes first) and join it, with a timeout."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if not self._thread.is_alive():
            return
        self._thread.join(JOIN_SECONDS)
        if self._thread.is_alive():
            print(f"opd: note: the rollout thread did not stop within {JOIN_SECONDS:.0f} s (a request to the "
                  "servers is still running); it ends with the process", file=sys.stderr)

