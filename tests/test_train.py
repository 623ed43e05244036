"""End to end on tiny real HF folders: training, metrics, multi-teacher routing, accumulation, resume."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_config
from support import parameters_of

from opd.assemble import assemble, seed_everything
from opd.runtime.monitor import read_metrics
from opd.collect import collect
from opd.teachers import score_batch
from opd.assemble import StepSettings
from opd.samples import TokenRecord
from opd.train import accumulate_gradients, train

REQUIRED_METRICS = [
    "teacher/kl_k1", "teacher/kl_k3", "rollout/response_length", "student/entropy",
    "optim/grad_norm", "gopd/is_weight_mean", "gopd/is_truncated_fraction", "gopd/advantage_mean",
    "gopd/advantage_std", "optim/skipped_steps", "rollout/truncated_fraction",
    "perf/tokens_per_second", "loss", "optim/lr", "rollout/sampler_gap_max",
]


def test_three_steps_move_parameters_write_metrics_and_save_an_hf_folder(model_dir, prompts_file, tmp_path):
    config = make_config(model_dir, prompts_file, tmp_path / "run", train={"tensorboard": True})
    final = train(config)
    before, after = parameters_of(model_dir / "student"), parameters_of(final)
    moved = [name for name in before if not torch.equal(before[name], after[name])]
    assert len(moved) == len(before), f"parameters that did not move: {set(before) - set(moved)}"
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    for name in REQUIRED_METRICS:
        assert all(name in r for r in records), name
    assert all(set(r) == set(records[0]) for r in records)  # absent values are null, never missing keys
    # The implicit reward lT - lR is logged per domain present in the step's batch.
    for record in records:
        domains = {key.split("/")[1] for key in record if key.startswith("reward/")}
        assert domains and domains <= {"math", "code"}
        for domain in domains:
            for statistic in ("implicit_mean", "implicit_p1", "implicit_p99", "implicit_max"):
                assert f"reward/{domain}/{statistic}" in record
    assert {key.split("/")[1] for r in records for key in r if key.startswith("reward/")} == {"math", "code"}
    assert all(r["optim/skipped_steps"] == 0 for r in records)
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    assert (final / "tokenizer.json").is_file()


def test_multi_teacher_routing_scores_each_row_with_its_domain_teacher(model_dir, prompts_file, tmp_path):
    config = make_config(model_dir, prompts_file, tmp_path / "run", rollout={"prompts_per_step": 6},
                         teachers=[{"domain": "math", "path": str(model_dir / "teacher"), "lam": 1.5},
                                   {"domain": "code", "path": str(model_dir / "teacher_b"),
                                    "reference": str(model_dir / "base")}])
    seed_everything(0)
    run = assemble(config)
    indices = list(range(6))
    batch = collect(run, 0, indices, {})
    scores = score_batch(batch, run.scorers, run.scoring)
    assert set(batch.domain) == {"math", "code"}
    for row, domain in enumerate(batch.domain):
        expected_lam = 1.5 if domain == "math" else 1.25
        assert run.objective.advantage.lam_by_domain[domain] == pytest.approx(expected_lam)
        # Score this row alone with each teacher and reference: only its own domain's models match.
        single = {d: s for d, s in run.scorers.items()}
        own = score_batch(_one_row(batch, row), {domain: single[domain]}, run.scoring)
        mask = batch.response_mask[row]
        torch.testing.assert_close(scores.logprobs[row][mask], own.logprobs[0][mask])
        torch.testing.assert_close(scores.ref_logprobs[row][mask], own.ref_logprobs[0][mask])
        other = "code" if domain == "math" else "math"
        foreign = score_batch(_one_row(batch, row, domain=other), {other: single[other]}, run.scoring)
        assert not torch.allclose(scores.logprobs[row][mask], foreign.logprobs[0][mask])
    # The code domain's reference is `base`, the math domain's the student's initial weights.
    assert run.scorers["code"].reference is not run.scorers["math"].reference


def _one_row(batch, row, domain=None):
    import dataclasses

    from opd.types import select_rows

    single = select_rows(batch, slice(row, row + 1))
    return dataclasses.replace(single, domain=(domain or single.domain[0],))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "token-sum"])
def test_gradient_accumulation_does_not_change_the_gradient(model_dir, prompts_file, tmp_path, mode):
    config = make_config(model_dir, prompts_file, tmp_path / "run", rollout={"prompts_per_step": 4})
    seed_everything(0)
    run = assemble(config)
    indices = [0, 1, 2, 3]
    batch = collect(run, 0, indices, {})
    # Rows of unequal length (a random tiny model rarely samples EOS): cut each row's mask differently.
    lengths = torch.tensor([8, 3, 5, 1, 8, 6, 2, 7])
    import dataclasses

    batch = dataclasses.replace(batch, response_mask=torch.arange(8)[None, :] < lengths[:, None])
    scores = score_batch(batch, run.scorers, run.scoring)
    # float64: each micro-batch runs at its own rows' width, so float32 rounding would differ by ~1e-6.
    run.student.to(torch.float64)
    gradients, logprobs = [], []
    # One micro-batch; four of consecutive rows; four of rows grouped by length (rows 3, 6 / 1, 2 / ...).
    for micro_batch_size, grouped in ((8, False), (2, False), (2, True)):
        run.student.zero_grad(set_to_none=True)
        settings = StepSettings(aggregation=mode, micro_batch_size=micro_batch_size, temperature=1.0,
                                chunk_size=7, max_grad_norm=None, group_by_length=grouped)
        record = TokenRecord()
        _, step_logprobs, _ = accumulate_gradients(run.student, batch, scores, run.objective, settings, record=record)
        gradients.append({n: p.grad.clone() for n, p in run.student.named_parameters()})
        logprobs.append(step_logprobs)
        # The sample log's per-token values are in the batch's row order too.
        torch.testing.assert_close(record.joined()[0], step_logprobs.float())
    for other in (1, 2):
        for name in gradients[0]:
            torch.testing.assert_close(gradients[other][name], gradients[0][name], rtol=1e-9, atol=1e-12)
        # The per-token log-probs come back in the batch's row order, whatever rows shared a micro-batch.
        torch.testing.assert_close(logprobs[other], logprobs[0], rtol=1e-9, atol=1e-12)


def _cut_batch(model_dir, prompts_file, tmp_path, lengths):
    """A collected batch of len(lengths) rows whose responses are cut at `lengths`, and its run."""
    import dataclasses

    config = make_config(model_dir, prompts_file, tmp_path / "run", rollout={"prompts_per_step": len(lengths) // 2})
    seed_everything(0)
    run = assemble(config)
    batch = collect(run, 0, list(range(len(lengths) // 2)), {})
    lengths = torch.tensor(lengths)
    mask = torch.arange(batch.response_mask.shape[1])[None, :] < lengths[:, None]
    return run, dataclasses.replace(batch, response_mask=mask)


def test_grouped_micro_batches_hold_rows_of_similar_length(model_dir, prompts_file, tmp_path):
    from opd.train import micro_batch_rows

    run, batch = _cut_batch(model_dir, prompts_file, tmp_path, [8, 3, 5, 1, 8, 6, 2, 7])
    lengths = (batch.prompt_mask.sum(dim=1) + batch.response_mask.sum(dim=1)).tolist()

    def rows(size, grouped, tokens=None):
        settings = StepSettings(aggregation="token-mean", micro_batch_size=size, temperature=1.0, chunk_size=7,
                                max_grad_norm=None, group_by_length=grouped, micro_batch_tokens=tokens)
        return [part.tolist() for part in micro_batch_rows(batch, settings)]

    assert rows(2, False) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert rows(8, True) == [list(range(8))]  # one micro-batch: the batch's own order, nothing to gain
    for parts in (rows(2, True), rows(3, True), rows(8, True, tokens=2 * batch.response_mask.shape[1] + 40)):
        assert sorted(row for part in parts for row in part) == list(range(8))  # every row once
        assert len(parts) > 1
        for first, second in zip(parts, parts[1:]):  # shortest first: no micro-batch reaches into the next
            assert max(lengths[row] for row in first) <= min(lengths[row] for row in second)
    assert rows(2, True)[0] == sorted(range(8), key=lengths.__getitem__)[:2]  # the two shortest rows


def test_grouped_scoring_gives_the_same_scores(model_dir, prompts_file, tmp_path):
    import dataclasses

    run, batch = _cut_batch(model_dir, prompts_file, tmp_path, [8, 8, 7, 6, 5, 3, 2, 1])
    whole = score_batch(batch, run.scorers, dataclasses.replace(run.scoring, rows_per_forward=8))
    from opd.runtime.lora import causal_lm

    teacher = causal_lm(next(iter(run.scorers.values())).teacher.model).base_model  # the body scoring runs
    widths = []  # the teacher's forwards: [rows, prompt + response width]
    hook = teacher.register_forward_pre_hook(lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape),
                                             with_kwargs=True)
    try:
        grouped = score_batch(batch, run.scorers, dataclasses.replace(run.scoring, rows_per_forward=2,
                                                                      group_by_length=True))
    finally:
        hook.remove()
    # Longest rows first in the batch, shortest first in the forwards, each at its own rows' width.
    assert len(widths) >= 2 and {rows for rows, _ in widths} == {2} and widths[0][1] < widths[-1][1]
    mask = batch.response_mask
    torch.testing.assert_close(grouped.logprobs[mask], whole.logprobs[mask])
    torch.testing.assert_close(grouped.ref_logprobs[mask], whole.ref_logprobs[mask])


def test_resume_gives_identical_weights(model_dir, prompts_file, tmp_path):
    straight = train(make_config(model_dir, prompts_file, tmp_path / "straight", train={"steps": 4}))
    halted = make_config(model_dir, prompts_file, tmp_path / "resumed", train={"steps": 2, "save_every": 2})
    train(halted)
    resumed = train(make_config(model_dir, prompts_file, tmp_path / "resumed", train={"steps": 4, "save_every": 2}),
                    resume=True)
    a, b = parameters_of(straight), parameters_of(resumed)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    records = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    straight_records = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    assert records[3]["teacher/kl_k1"] == straight_records[3]["teacher/kl_k1"]


def test_resume_after_a_crash_discards_unsaved_metrics_and_partial_checkpoints(model_dir, prompts_file, tmp_path):
    config = make_config(model_dir, prompts_file, tmp_path / "run", train={"steps": 3, "save_every": 2})
    train(config)
    run_dir = tmp_path / "run"
    # Simulate a crash: step 3's checkpoint half-written, and a stale step-4 record in the log.
    (run_dir / "checkpoints" / ".partial-step_000004").mkdir()
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write(json.dumps({"step": 4, "loss": 0.0}) + "\n")
    import shutil

    shutil.rmtree(run_dir / "checkpoints" / "step_000003")
    train(make_config(model_dir, prompts_file, tmp_path / "run", train={"steps": 4, "save_every": 2}), resume=True)
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]


def test_existing_run_without_resume_is_refused(model_dir, prompts_file, tmp_path):
    config = make_config(model_dir, prompts_file, tmp_path / "run", train={"steps": 1})
    train(config)
    with pytest.raises(FileExistsError, match="--resume"):
        train(config)


def _poison_gradients(monkeypatch, steps):
    """The gradient of the first parameter becomes nan in the given (0-based) steps."""
    import opd.train as train_module

    original, calls = train_module.accumulate_gradients, []

    def poisoned(model, *args, **kwargs):
        result = original(model, *args, **kwargs)
        if len(calls) in steps:
            next(model.parameters()).grad.fill_(float("nan"))
        calls.append(1)
        return result

    monkeypatch.setattr(train_module, "accumulate_gradients", poisoned)


def test_non_finite_gradient_skips_the_step(model_dir, prompts_file, tmp_path, monkeypatch):
    _poison_gradients(monkeypatch, steps={0})
    config = make_config(model_dir, prompts_file, tmp_path / "run", train={"steps": 2, "save_every": 1})
    final = train(config)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["optim/skipped_steps"] for r in records] == [1, 1]
    before = parameters_of(model_dir / "student")
    skipped = parameters_of(tmp_path / "run" / "checkpoints" / "step_000001" / "model")
    assert all(torch.equal(before[n], skipped[n]) for n in before)  # nothing was applied in the skipped step
    after = parameters_of(final)
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the second step trained


def test_a_run_whose_every_step_was_skipped_fails_and_writes_no_final_model(model_dir, prompts_file, tmp_path,
                                                                           monkeypatch):
    """Earlier, such a run exited 0 with an unchanged student in final/ ("trained student written to")."""
    _poison_gradients(monkeypatch, steps={0, 1})
    config = make_config(model_dir, prompts_file, tmp_path / "run", train={"steps": 2})
    with pytest.raises(ValueError, match=r"every one of the 2 step\(s\) of this run was skipped: the gradient was "
                                         r"not finite"):
        train(config)
    assert [r["optim/skipped_steps"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    assert not (tmp_path / "run" / "final").exists()
    with pytest.raises(ValueError, match=r"every one of the 2 step\(s\)"):  # resuming with no step left to run
        train(config, resume=True)
    assert not (tmp_path / "run" / "final").exists()


def test_progress_bar_shows_the_key_figures():
    from opd.runtime.monitor import progress_figures

    text = progress_figures({"teacher/kl_k1": 0.5, "teacher/kl_k3": 0.4, "student/entropy": 2.0,
                             "rollout/response_length": 12, "optim/grad_norm": 1.5, "optim/skipped_steps": 0,
                             "perf/tokens_per_second": 900, "gopd/is_weight_mean": 1.0,
                             "gopd/is_truncated_fraction": 0.01, "reward/math/implicit_mean": 0.2,
                             "reward/math/implicit_p99": 1.5, "reward/math/implicit_max": 3.0})
    for piece in ("kl1 0.5", "kl3 0.4", "H 2", "len 12", "|g| 1.5", "skipped 0", "tok/s 900", "w 1 (cut 0.01)",
                  "r[math] 0.2/1.5/3"):
        assert piece in text, (piece, text)


def test_sft_resume_reuses_the_checkpointed_teacher_responses(model_dir, prompts_file, tmp_path):
    """sft caches teacher trajectories per prompt; the cache travels with the checkpoint, so a resumed run
    trains on exactly the trajectories an uninterrupted one does (and draws the same random numbers)."""
    sft = {"name": "sft", "lam": 1.0}
    settings = {"prompts_per_step": 2}
    straight = train(make_config(model_dir, prompts_file, tmp_path / "straight", objective=sft, rollout=settings,
                                 train={"steps": 4}))
    train(make_config(model_dir, prompts_file, tmp_path / "resumed", objective=sft, rollout=settings,
                      train={"steps": 2, "save_every": 2}))
    assert (tmp_path / "resumed" / "checkpoints" / "step_000002" / "state_0.pt").is_file()
    resumed = train(make_config(model_dir, prompts_file, tmp_path / "resumed", objective=sft, rollout=settings,
                                train={"steps": 4, "save_every": 2}), resume=True)
    a, b = parameters_of(straight), parameters_of(resumed)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_rollout_shared_noise_reaches_the_students_sampler(model_dir, prompts_file, tmp_path):
    """The config key reaches the run's sampler (what it does to the draws: test_rollout.py)."""
    for shared in (True, False):
        run = assemble(make_config(model_dir, prompts_file, tmp_path / f"run-{shared}", rollout={"shared_noise": shared}))
        assert run.sampler.shared_noise is shared
        run.close()
