"""samples.jsonl: a few rollouts per domain, token by token, from a real tiny run (train.log_samples_every)."""

from __future__ import annotations

import json
import math

from conftest import make_config

from opd.train import train


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_samples_hold_every_token_value_of_the_step(model_dir, prompts_file, tmp_path):
    run_dir = tmp_path / "run"
    train(make_config(model_dir, prompts_file, run_dir, objective={"name": "tropd", "lam": 1.0},
                      train={"steps": 2, "log_samples_every": 2, "log_samples_per_domain": 1}))
    records = _records(run_dir / "samples.jsonl")
    assert {r["step"] for r in records} == {2}  # only every 2nd step
    counts = {}
    for record in records:
        counts[record["domain"]] = counts.get(record["domain"], 0) + 1
    assert all(count == 1 for count in counts.values())
    for record in records:
        assert record["prompt"] and isinstance(record["response"], str) and record["tokens"]
        for token in record["tokens"]:
            assert token["lT"] is not None and token["lS"] is not None and token["lOld"] is not None
            assert token["lR"] is not None  # student_init reference by default
            assert token["from_teacher"] is False
            p = token["trust_probability"]
            assert p is not None and 0.0 <= p <= 1.0
            # TrOPD's trust probability is min(pi_T / pi_S, 1) of the very lT and lS recorded beside it.
            assert math.isclose(p, min(math.exp(token["lT"] - token["lS"]), 1.0), rel_tol=1e-4, abs_tol=1e-6)
            assert isinstance(token["outlier"], bool)
            if not token["outlier"]:  # trusted tokens carry the opd advantage lT - lS
                assert math.isclose(token["advantage"], token["lT"] - token["lS"], rel_tol=1e-4, abs_tol=1e-5)
            else:  # the paper's fkl outliers get no advantage
                assert token["advantage"] is None


def test_samples_are_cut_back_on_resume(model_dir, prompts_file, tmp_path):
    run_dir = tmp_path / "run"
    train(make_config(model_dir, prompts_file, run_dir, train={"steps": 2, "save_every": 1, "log_samples_every": 1}))
    with (run_dir / "samples.jsonl").open("a") as handle:  # a crash after logging a step it never saved
        handle.write(json.dumps({"step": 3, "tokens": []}) + "\n")
    train(make_config(model_dir, prompts_file, run_dir, train={"steps": 3, "save_every": 1, "log_samples_every": 1}),
          resume=True)
    records = _records(run_dir / "samples.jsonl")
    assert sorted({r["step"] for r in records}) == [1, 2, 3]
    assert all(r["tokens"] for r in records)  # the stale step-3 line is gone
    advantage = [t["advantage"] for r in records for t in r["tokens"]]
    assert all(a is not None for a in advantage)  # gopd: every student token has an advantage
