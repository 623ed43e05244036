"""Every registered objective trains end to end on tiny real HF folders, and guidance follows its schedule."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from conftest import make_config
from support import parameters_of

from opd.grading import graders
from opd.assemble import assemble, seed_everything
from opd.collect import CollectSettings, collect, draw_prefix, max_prefix_length
from opd.runtime.monitor import read_metrics
from opd.objectives import registered_names
from opd.rollout.hf import HfSampler
from opd.train import train

ROWS = [
    {"prompt": "what is 12 + 7?", "domain": "math", "answer": "19", "response": "12 + 7 = 19"},
    {"prompt": "count the letters", "domain": "code", "answer": "3", "response": "answer: 3"},
    {"prompt": "what is 3 * 4?", "domain": "math", "answer": "12", "response": "3 * 4 = 12"},
    {"prompt": "hello world, repeat it", "domain": "code", "answer": "hello", "response": "hello world"},
]

# What each objective must log (besides the common metrics), proving its own code ran.
OBJECTIVE_METRIC = {
    "opd": "opd/advantage_mean", "gopd": "gopd/advantage_mean", "tropd": "tropd/outlier_fraction",
    "fkl_topk": "fkl_topk/loss", "jsd_topk": "jsd_topk/forward_term", "gkd": "gkd/jsd",
    "eopd": "eopd/gated_fraction", "reopold": "reopold/stage", "entropy_opd": "entropy_opd/selected_fraction",
    "aopd": "aopd/positive_fraction", "sft": "sft/nll", "grpo": "grpo/reward_mean",
}
OBJECTIVE_SETTINGS = {
    "gopd": {"lam": 1.25},
    "gkd": {"onpolicy_fraction": 0.5},
    "eopd": {"topk": 16, "eopd": {"entropy_threshold": 0.5}},
    "reopold": {"reopold": {"entropy_selection": True}},
}


@pytest.fixture
def rows_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


@pytest.fixture
def length_grader(monkeypatch):
    """A grader a random tiny model passes about half the time, so GRPO advantages are not all zero."""
    monkeypatch.setitem(graders.GRADERS, "exact", lambda row, completion: float(len(completion) % 2 == 0))


def test_every_registered_objective_is_covered():
    assert sorted(OBJECTIVE_METRIC) == registered_names()


@pytest.mark.parametrize("name", sorted(OBJECTIVE_METRIC))
def test_objective_trains_three_steps(name, model_dir, rows_file, tmp_path, length_grader):
    grader = "exact" if name == "grpo" else "none"
    config = make_config(
        model_dir, rows_file, tmp_path / "run",
        objective={"name": name, "lam": 1.0, **OBJECTIVE_SETTINGS.get(name, {})},
        teachers=[{"domain": "math", "path": str(model_dir / "teacher"), "grader": grader},
                  {"domain": "code", "path": str(model_dir / "teacher_b"), "grader": grader}],
        rollout={"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 8},
    )
    final = train(config)
    before, after = parameters_of(model_dir / "student"), parameters_of(final)
    assert any(not torch.equal(before[n], after[n]) for n in before), "no parameter moved"
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(records) == 3
    assert all(OBJECTIVE_METRIC[name] in r for r in records), (name, sorted(records[0]))
    if name == "grpo":
        assert all("reward/accuracy" in r for r in records)
    if name in ("fkl_topk", "jsd_topk"):  # the real training forward takes the student's own top-k
        assert all(0 <= r["topk/overlap"] <= 1 and 0 < r["topk/student_mass"] <= 1 for r in records)


def test_tropd_with_guidance_follows_the_cosine_schedule(model_dir, rows_file, tmp_path):
    config = make_config(
        model_dir, rows_file, tmp_path / "run",
        objective={"name": "tropd", "lam": 1.0, "guidance": {"enabled": True, "fraction": 0.5, "max_prefix_tokens": 6}},
        rollout={"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 8},
    )
    train(config)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["guidance/max_prefix_length"] for r in records] == [6, 3, 0]
    assert records[-1]["rollout/teacher_token_fraction"] == 0  # the last step is fully on-policy
    assert all("guidance/prefix_tokens" in r for r in records)


def test_guided_rollouts_flag_teacher_prefix_tokens(model_dir, rows_file, tmp_path):
    config = make_config(model_dir, rows_file, tmp_path / "run", objective={"name": "tropd", "lam": 1.0},
                         rollout={"prompts_per_step": 2, "samples_per_prompt": 4, "max_new_tokens": 8})
    seed_everything(0)
    run = assemble(config)
    settings = CollectSettings(prompts_per_step=2, shuffle=True,
                               guidance=True, guidance_fraction=0.5, max_prefix_tokens=8, total_steps=10,
                               teacher_written=False, onpolicy_fraction=1.0, seed=0)
    run = dataclasses.replace(run, collect=settings)
    lengths = []
    for step in range(3):
        batch = collect(run, step, [0, 1], {})
        prefix_lengths = batch.from_teacher.sum(dim=1)
        guided = torch.tensor([k < 2 for _ in range(2) for k in range(4)])
        assert (prefix_lengths[~guided] == 0).all()  # only guidance_fraction of each prompt's rollouts
        assert (prefix_lengths <= max_prefix_length(step, 10, 8)).all()
        for row in range(batch.num_rows):  # prefix tokens come first and are response tokens
            flags = batch.from_teacher[row]
            assert not (flags[1:] & ~flags[:-1]).any()
            assert (batch.response_mask[row] | ~flags).all()
            assert (batch.sampler_logprobs[row][flags] == 0).all()
        lengths.extend(prefix_lengths[guided].tolist())
    assert max(lengths) > 0


def test_prefix_schedule_and_draws():
    assert [max_prefix_length(s, 5, 100) for s in range(5)] == [100, 85, 50, 14, 0]
    assert max_prefix_length(0, 1, 100) == 0
    rng = random.Random(0)
    draws = [draw_prefix([5, 6, 7, 8, 1], 10, (1,), rng) for _ in range(200)]
    assert {len(d) for d in draws} == {0, 1, 2, 3, 4}  # uniform up to the length, never the final EOS
    assert all(d == [5, 6, 7, 8][: len(d)] for d in draws)
    assert {len(draw_prefix([5, 6, 7, 8], 2, (1,), rng)) for _ in range(100)} == {0, 1, 2}


def test_sft_generates_teacher_responses_once_per_prompt(model_dir, rows_file, tmp_path, monkeypatch):
    config = make_config(model_dir, rows_file, tmp_path / "run", objective={"name": "sft", "lam": 1.0})
    seed_everything(0)
    run = assemble(config)
    settings = CollectSettings(prompts_per_step=2, shuffle=True,
                               guidance=False, guidance_fraction=0.5, max_prefix_tokens=8, total_steps=3,
                               teacher_written=True, onpolicy_fraction=1.0, seed=0)
    run = dataclasses.replace(run, collect=settings)
    generated = []
    real = HfSampler.sample

    def counting(sampler, prompts, *args, **kwargs):  # the teachers' writers (sft never samples the student)
        generated.append(len(prompts))
        return real(sampler, prompts, *args, **kwargs)

    monkeypatch.setattr(HfSampler, "sample", counting)
    cache: dict = {}
    first = collect(run, 0, [0, 1], cache)
    assert (first.from_teacher == first.response_mask).all()
    assert sorted(cache) == [0, 1] and all(len(v) == 2 for v in cache.values())
    assert len(generated) == 2 and sum(generated) == 4  # rows 0 and 1 have different domains
    again = collect(run, 5, [1, 0], cache)  # a later visit reuses the cached trajectories
    assert len(generated) == 2
    # All of a step's new prompts of one domain in one batched generation, not one generation per prompt;
    # a cached prompt (row 0) is not generated again.
    collect(run, 6, [0, 2], {0: cache[0]})
    assert generated[2:] == [2]
    collect(run, 7, [0, 2], {})
    assert generated[3:] == [4]
    for batch in (first, again):
        for row in range(batch.num_rows):
            sample = row % 2
            written = batch.response_ids[row][batch.response_mask[row]].tolist()
            assert written == cache[batch.prompt_index[row]][sample][: len(written)]


@pytest.mark.parametrize("grader", ["math", "code"])
def test_training_logs_graded_accuracy_with_real_graders(grader, model_dir, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"what is {i} + {i}?", "domain": "math", "answer": str(2 * i),
                                        "tests": [f"assert double({i}) == {2 * i}"]}) + "\n" for i in range(4)))
    config = make_config(model_dir, rows, tmp_path / "run", objective={"name": "opd", "lam": 1.0},
                         teachers=[{"domain": "math", "path": str(model_dir / "teacher"), "reference": None,
                                    "grader": grader}], train={"steps": 2})
    train(config)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    # A random tiny model solves nothing: the pipeline, not the score, is under test here.
    assert all(r["reward/accuracy"] == 0.0 and r["reward/math/accuracy"] == 0.0 for r in records)


def _full_vocabulary_entropy(run, batch, temperature: float) -> torch.Tensor:  # [N, T] float64, brute force
    from opd.scoring import output_head, response_hidden_states

    with torch.no_grad():
        hidden = response_hidden_states(run.student, batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                                        batch.response_mask)
        weight, bias = output_head(run.student)
        logits = hidden.double() @ weight.double().T + (bias.double() if bias is not None else 0.0)
        logprobs = torch.log_softmax(logits / temperature, dim=-1)
    return -(logprobs.exp() * logprobs).sum(dim=-1)


@pytest.mark.parametrize("case", ["sft", "guidance"])
def test_student_entropy_is_logged_where_the_student_sampled_and_where_it_was_given_tokens(
        case, model_dir, rows_file, tmp_path):
    from opd.metrics import rollout_metrics
    from opd.teachers import score_batch
    from opd.assemble import StepSettings
    from opd.train import student_forward

    objective = {"name": "sft", "lam": 1.0} if case == "sft" else {"name": "gopd"}
    config = make_config(model_dir, rows_file, tmp_path / "run", objective=objective)
    seed_everything(0)
    run = assemble(config)
    settings = CollectSettings(prompts_per_step=2, shuffle=True,
                               guidance=case == "guidance", guidance_fraction=1.0, max_prefix_tokens=4,
                               total_steps=3, teacher_written=case == "sft", onpolicy_fraction=1.0, seed=0)
    run = dataclasses.replace(run, collect=settings)
    batch = collect(run, 0, [0, 1, 2, 3], {})
    given = batch.response_mask & ~batch.sampled_by_student
    assert given.any()
    if case == "guidance":
        assert batch.sampled_by_student.any() and batch.sampler_entropy is not None
    step = StepSettings(aggregation="token-mean", micro_batch_size=8, temperature=run.sampling.temperature,
                        chunk_size=5, max_grad_norm=None)
    scores = score_batch(batch, run.scorers, run.scoring)
    entropy = student_forward(run.student, batch, scores, run.objective, step).entropy
    reference = _full_vocabulary_entropy(run, batch, run.sampling.temperature)
    # Tokens the student was given: the forward's entropy of the student's distribution (not the record's 0).
    torch.testing.assert_close(entropy[given].double(), reference[given], atol=1e-5, rtol=1e-5)
    metrics = rollout_metrics(batch, scores, torch.zeros(batch.response_mask.shape), entropy)
    assert metrics["student/entropy_given_tokens"].value == pytest.approx(float(reference[given].mean()), rel=1e-5)
    if case == "sft":
        assert "student/entropy" not in metrics  # nothing was sampled by the student: no made-up 0
    else:  # sampled tokens keep the sampler's record
        sampled = batch.sampled_by_student
        assert torch.equal(entropy[sampled], batch.sampler_entropy[sampled])
        assert metrics["student/entropy"].value == pytest.approx(float(batch.sampler_entropy[sampled].mean()), rel=1e-6)
