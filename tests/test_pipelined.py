"""The rollout thread's schedule (pipelined.py) with a fake producer and trainer: every batch is sampled with
the weights of exactly max_staleness steps before the one that trains it, the servers never take weights
while a batch is being produced, and errors and stops end the thread."""

from __future__ import annotations

import time

import pytest
import torch

from opd.collect import rollout_seed
from opd.pipelined import RolloutPipeline, ScoredBatch, StaleBatch, check_staleness
from opd.rollout.batch import SamplingSettings, build_batch, fixed_responses
from opd.rollout.batch import draws as generator_of
from opd.served.engine import sampling_body
from opd.types import RolloutBatch, TeacherScores

STEPS = 6


def scored(step: int, version: int) -> ScoredBatch:
    empty = torch.zeros(1, 1)
    batch = RolloutBatch(prompt_ids=empty.long(), prompt_mask=empty.bool(), response_ids=empty.long(),
                         response_mask=empty.bool(), from_teacher=empty.bool(), sampler_logprobs=empty,
                         truncated=torch.zeros(1, dtype=torch.bool), domain=("math",), prompt_index=(0,))
    teacher = TeacherScores(logprobs=empty, topk_ids=None, topk_logprobs=None, ref_logprobs=None,
                            has_reference=torch.zeros(1, dtype=torch.bool), has_teacher=torch.ones(1, dtype=torch.bool),
                            floored=empty.bool())
    return ScoredBatch(step=step, weight_version=version, batch=batch, teacher=teacher, rollout_seconds=0.0,
                       score_seconds=0.0)


class FakeServers:
    """Records which version sampled each batch, and any weight reload while a batch was being produced."""

    def __init__(self, produce_seconds: float):
        self.produce_seconds = produce_seconds
        self.in_flight = False
        self.versions: dict[int, int] = {}
        self.reloads_in_flight = 0

    def produce(self, step: int, version: int) -> ScoredBatch:
        self.in_flight = True
        time.sleep(self.produce_seconds)
        self.in_flight = False
        self.versions[step] = version
        return scored(step, version)

    def take_weights(self) -> None:
        self.reloads_in_flight += self.in_flight


def train_through(pipeline: RolloutPipeline, servers: FakeServers, train_seconds: float,
                  first: int = 0) -> list[int]:
    """The trainer's loop: each step's batch (refused if too stale), a slow 'optimizer step', the sync."""
    staleness = []
    for version in range(first, pipeline.last_step):
        batch, _ = pipeline.next_batch(version + 1)
        staleness.append(check_staleness(batch, version, pipeline.max_staleness))
        time.sleep(train_seconds)
        pipeline.sync(version + 1, servers.take_weights)
    return staleness


@pytest.mark.parametrize("max_staleness", [0, 1, 2])
def test_every_batch_is_sampled_exactly_max_staleness_versions_behind(max_staleness):
    # A fast producer and a slow trainer: without the producer's wait for weights it would run ahead.
    servers = FakeServers(produce_seconds=0.001)
    with RolloutPipeline(servers.produce, first_version=0, last_step=STEPS, max_staleness=max_staleness) as pipeline:
        staleness = train_through(pipeline, servers, train_seconds=0.02)
    assert servers.versions == {step: max(0, step - 1 - max_staleness) for step in range(1, STEPS + 1)}
    assert staleness == [min(version, max_staleness) for version in range(STEPS)]
    assert servers.reloads_in_flight == 0


def test_the_servers_never_reload_while_a_batch_is_produced():
    # A slow producer and a fast trainer: without the sync's wait the trainer would reload mid-batch.
    servers = FakeServers(produce_seconds=0.02)
    with RolloutPipeline(servers.produce, first_version=0, last_step=STEPS, max_staleness=1) as pipeline:
        train_through(pipeline, servers, train_seconds=0.0)
    assert servers.reloads_in_flight == 0
    assert servers.versions == {step: max(0, step - 2) for step in range(1, STEPS + 1)}


def test_a_resumed_segment_starts_from_its_checkpoints_version():
    servers = FakeServers(produce_seconds=0.001)
    with RolloutPipeline(servers.produce, first_version=3, last_step=STEPS, max_staleness=1) as pipeline:
        staleness = train_through(pipeline, servers, train_seconds=0.01, first=3)
    assert servers.versions == {4: 3, 5: 3, 6: 4}
    assert staleness == [0, 1, 1]


def test_a_batch_staler_than_allowed_is_refused():
    with pytest.raises(StaleBatch, match="staleness 2, rollout.max_staleness 1"):
        check_staleness(scored(step=4, version=1), trainer_version=3, max_staleness=1)
    assert check_staleness(scored(step=4, version=2), trainer_version=3, max_staleness=1) == 1


def test_the_rollout_threads_error_reaches_the_trainer_at_that_step():
    class ServerDown(RuntimeError):
        pass

    def produce(step: int, version: int) -> ScoredBatch:
        if step == 3:
            raise ServerDown("http://127.0.0.1:1 refused")
        return scored(step, version)

    trained = []
    with RolloutPipeline(produce, first_version=0, last_step=STEPS, max_staleness=1) as pipeline:
        with pytest.raises(ServerDown, match="refused"):
            for version in range(STEPS):
                pipeline.next_batch(version + 1)
                trained.append(version + 1)
                pipeline.sync(version + 1, lambda: None)  # the batches already produced still train
    assert trained == [1, 2]
    assert not pipeline._thread.is_alive()


def test_close_stops_a_rollout_thread_waiting_for_weights():
    servers = FakeServers(produce_seconds=0.0)
    pipeline = RolloutPipeline(servers.produce, first_version=0, last_step=STEPS, max_staleness=1)
    with pipeline:
        pipeline.next_batch(1)  # batches 1 and 2 are produced; batch 3 waits for version 1, which never comes
        deadline = time.monotonic() + 5
        while 2 not in servers.versions and time.monotonic() < deadline:
            time.sleep(0.001)
    assert not pipeline._thread.is_alive()
    assert sorted(servers.versions) == [1, 2]


def test_busy_fraction_is_the_share_of_the_window_spent_producing():
    pipeline = RolloutPipeline(lambda step, version: scored(step, version), first_version=0, last_step=1,
                               max_staleness=0)
    pipeline._busy = [(1.0, 2.0), (3.0, 4.0)]  # produce intervals, as the rollout thread records them
    assert pipeline.busy_fraction(1.5, 3.5) == pytest.approx(0.5)
    pipeline._generating_since = 5.0  # a batch still being produced counts up to the window's end
    assert pipeline.busy_fraction(4.0, 6.0) == pytest.approx(0.5)


def test_a_steps_draws_come_from_its_own_seed_not_from_other_threads():
    """The rollout thread shares torch's global generator with the trainer: a step's request seeds and
    noise must not depend on it, or the threads' timing would decide the samples."""
    def draws(step: int, global_seed: int) -> tuple[int, torch.Tensor]:
        torch.manual_seed(global_seed)  # whatever the other thread has drawn
        settings = SamplingSettings(samples_per_prompt=1, temperature=1.0, top_p=1.0, max_new_tokens=4,
                                    batch_size=2, end_of_sequence_ids=(0,), pad_id=0,
                                    seed=rollout_seed(seed=7, rank=0, step=step))
        seed = sampling_body([1, 2], 1, 4, settings, generator_of(settings, stream=0))["seed"]
        batch = build_batch([[1, 2], [3]], [0, 1], ["math", "math"],
                            fixed_responses([[4, 5], [6]], settings, from_teacher=False), settings, step=step)
        return seed, batch.noise

    seed, noise = draws(step=3, global_seed=0)
    same_seed, same_noise = draws(step=3, global_seed=1)
    assert seed == same_seed and torch.equal(noise, same_noise)
    other_seed, other_noise = draws(step=4, global_seed=0)
    assert other_seed != seed and not torch.equal(other_noise, noise)
