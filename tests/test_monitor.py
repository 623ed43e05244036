"""metrics.jsonl holds the same keys on every line: absent values are null, never missing keys."""

from __future__ import annotations

import json

from opd.runtime.monitor import MetricsLogger, read_metrics


def _logger(run_dir, start_step=0):
    return MetricsLogger(run_dir, total_steps=4, start_step=start_step, tensorboard=False, progress=False)


def test_every_line_has_the_same_keys_when_values_are_absent_on_some_steps(tmp_path):
    logger = _logger(tmp_path)
    logger.log(1, {"loss": 1.0, "reward/math/implicit_mean": 0.5})
    logger.log(2, {"loss": 2.0, "eval/gsm8k/avg_at_k": 0.25})  # no math rows this step; an evaluation
    logger.log(3, {"loss": float("nan")})
    # Before close (a crash now): each line already holds every key known when it was written.
    written = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert written[2] == {"step": 3, "loss": "nan", "reward/math/implicit_mean": None, "eval/gsm8k/avg_at_k": None}
    logger.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(line) for line in lines] == [sorted(["step", "loss", "reward/math/implicit_mean",
                                                        "eval/gsm8k/avg_at_k"])] * 3
    assert [line["reward/math/implicit_mean"] for line in lines] == [0.5, None, None]
    assert [line["eval/gsm8k/avg_at_k"] for line in lines] == [None, 0.25, None]
    assert [line["loss"] for line in lines] == [1.0, 2.0, "nan"]


def test_a_resumed_segment_keeps_the_key_set_of_the_earlier_one(tmp_path):
    logger = _logger(tmp_path)
    logger.log(1, {"loss": 1.0, "eval/gsm8k/avg_at_k": 0.25})
    logger.log(2, {"loss": 2.0})
    logger.close()
    logger = _logger(tmp_path, start_step=1)  # the checkpoint was at step 1: step 2 is logged again
    logger.log(2, {"loss": 3.0, "reward/code/implicit_mean": 0.1})
    logger.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert all(set(r) == {"step", "loss", "eval/gsm8k/avg_at_k", "reward/code/implicit_mean"} for r in records)
    assert records[1]["eval/gsm8k/avg_at_k"] is None and records[0]["reward/code/implicit_mean"] is None
