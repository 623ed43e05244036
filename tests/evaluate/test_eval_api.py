"""`opd.evaluate(...)`: the Python call of `opd eval` (evaluate/api.py), returning what results.json holds."""

from __future__ import annotations

import json

import pytest

import opd


def test_opd_evaluate_returns_the_results_it_writes(model_dir, tmp_path):
    results = opd.evaluate(str(model_dir / "student"), benchmarks=["arc_challenge"], samples=2, limit=2,
                           max_new_tokens=3, output_dir=str(tmp_path / "eval"))
    assert results == json.loads((tmp_path / "eval" / "results.json").read_text())
    arc = results["benchmarks"]["arc_challenge"]
    assert arc["problems"] == 2 and arc["samples_per_problem"] == 2 and len(arc["samples"]) == 4
    assert results["settings"]["samples"] == 2 and results["settings"]["backend"] == "hf"
    import opd.evaluate.run as run  # the submodules stay reachable through the callable package

    assert run.evaluate is not None and callable(opd.evaluate)


def test_opd_evaluate_grades_given_responses_and_refuses_bad_calls(tmp_path):
    from opd.evaluate.benchmarks import load_benchmark

    problem = load_benchmark("arc_challenge")[0]
    responses = tmp_path / "responses.jsonl"
    responses.write_text(json.dumps({"problem_id": problem.problem_id, "completion": f"Answer: {problem.answer}"}))
    results = opd.evaluate(responses=str(responses), benchmarks="arc_challenge", limit=1,
                           output_dir=str(tmp_path / "eval"))
    assert results["benchmarks"]["arc_challenge"]["avg_at_k"] == 1.0
    with pytest.raises(ValueError, match="give model_dir or responses"):
        opd.evaluate(benchmarks=["arc_challenge"])
    with pytest.raises(ValueError, match="temperature 0 .*greedy"):
        opd.evaluate("some/model", benchmarks=["arc_challenge"], temperature=0, samples=3)
