"""`opd eval MODEL --server URL`: samples from a vLLM server serving MODEL (tests/served_support.py), with the
results format of the other backends; a server serving another folder is refused."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from opd.evaluate.run import EvalSettings, evaluate  # noqa: E402
from opd.evaluate.sampling import EvalBackend  # noqa: E402


def test_eval_through_a_server_grades_every_sample(servers, served_models, tmp_path):
    settings = EvalSettings(samples=2, temperature=1.0, top_p=1.0, max_new_tokens=8, limit=3)
    backend = EvalBackend(name="server", server=servers["student"])
    results = evaluate(["arc_challenge"], settings, str(tmp_path), model_dir=str(served_models / "student"),
                       backend=backend)
    assert results["settings"]["backend"] == "server"
    samples = results["benchmarks"]["arc_challenge"]
    assert samples["problems"] == 3 and samples["answered"] == 3, samples


def test_a_server_at_temperature_0_decodes_the_argmax(servers, served_models, tmp_path):
    """Greedy through a server: each completion is the argmax decoding by hand of the served folder."""
    from support import argmax_decode

    from opd.evaluate.benchmarks import load_benchmark
    from opd.evaluate.sampling import open_eval_sampler
    from opd.runtime.models import load_model

    folder = str(served_models / "student")
    settings = EvalSettings(samples=1, temperature=0.0, max_new_tokens=6, limit=3)
    results = evaluate(["arc_challenge"], settings, str(tmp_path), model_dir=folder,
                       backend=EvalBackend(name="server", server=servers["student"]))
    problems, model = load_benchmark("arc_challenge")[:3], load_model(folder)
    with open_eval_sampler(folder, EvalBackend(), problems, 6) as opened:
        expected = {p.problem_id: opened.tokenizer.decode(
            argmax_decode(model, opened.prompts[p.problem_id], 6, opened.end_of_sequence_ids),
            skip_special_tokens=True) for p in problems}
    samples = results["benchmarks"]["arc_challenge"]["samples"]
    assert {s["problem_id"]: s["completion"] for s in samples} == expected


def test_a_server_serving_another_folder_is_refused(servers, served_models, tmp_path):
    settings = EvalSettings(samples=1, temperature=1.0, top_p=1.0, max_new_tokens=8, limit=1)
    with pytest.raises(ValueError, match="the server serves .*teacher.*, not .*student"):
        evaluate(["arc_challenge"], settings, str(tmp_path), model_dir=str(served_models / "student"),
                 backend=EvalBackend(name="server", server=servers["teacher"]))
