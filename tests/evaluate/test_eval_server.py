"""`opd eval MODEL --server URL`: samples from a vLLM server serving MODEL (tests/served_support.py), with the
results format of the other backends and the HF path's avg@k up to binomial noise; a server serving another
folder is refused."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from opd.evaluate.run import EvalSettings, evaluate  # noqa: E402
from opd.evaluate.sampling import EvalBackend  # noqa: E402
from opd.served.client import ServerClient  # noqa: E402

# |z| beyond this: the two avg@k differ (two-sided, a false alarm about once in 1000 runs).
Z_LIMIT = 3.3


@pytest.fixture
def student_url(servers, served_models) -> str:
    """The student's server holding the folder's own weights: other tests sync trained weights into the
    shared server, and these compare it with the folder."""
    client = ServerClient(servers["student"])
    client.reload_weights(str(served_models / "student"))
    client.reset_prefix_cache()
    return servers["student"]


def test_eval_through_a_server_grades_every_sample(servers, served_models, tmp_path):
    settings = EvalSettings(samples=2, temperature=1.0, top_p=1.0, max_new_tokens=8, limit=3)
    backend = EvalBackend(name="server", server=servers["student"])
    results = evaluate(["arc_challenge"], settings, str(tmp_path), model_dir=str(served_models / "student"),
                       backend=backend)
    assert results["settings"]["backend"] == "server"
    samples = results["benchmarks"]["arc_challenge"]
    assert samples["problems"] == 3 and samples["answered"] == 3, samples


def test_a_server_at_temperature_0_decodes_the_argmax(student_url, served_models, tmp_path):
    """Greedy through a server: each completion is the argmax decoding by hand of the served folder."""
    from support import argmax_decode

    from opd.evaluate.benchmarks import load_benchmark
    from opd.evaluate.sampling import open_eval_sampler
    from opd.runtime.models import load_model

    folder = str(served_models / "student")
    settings = EvalSettings(samples=1, temperature=0.0, max_new_tokens=6, limit=3)
    results = evaluate(["arc_challenge"], settings, str(tmp_path), model_dir=folder,
                       backend=EvalBackend(name="server", server=student_url))
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


def greedy_first_token_grader(folder: str, problems: int):
    """A stand-in for `grade_all` whose rate moves with the temperature (a tiny random model answers no ARC
    question, and the rate of a property of the vocabulary, such as holding a vowel, hardly moves): a
    one-token completion is 'correct' when its text is that of the model's argmax token for the problem.
    On this model: about 0.23 of samples at temperature 1, 0.46 at 0.5 (exact, from the logits)."""
    from support import argmax_decode

    from opd.evaluate.benchmarks import load_benchmark
    from opd.evaluate.problem import Grade
    from opd.evaluate.sampling import open_eval_sampler
    from opd.runtime.models import load_model

    model = load_model(folder)
    with open_eval_sampler(folder, EvalBackend(), load_benchmark("arc_challenge")[:problems], 1) as opened:
        greedy = {problem_id: opened.tokenizer.decode(argmax_decode(model, prompt, 1, opened.end_of_sequence_ids),
                                                      skip_special_tokens=True)
                  for problem_id, prompt in opened.prompts.items()}

    def grade_all(pairs, on_grade=None):
        grades = [Grade(correct=completion == greedy[problem.problem_id], reason="the argmax token")
                  for problem, completion in pairs]
        for graded in grades:
            if on_grade is not None:
                on_grade(graded)
        return grades

    return grade_all


def test_server_and_hf_evaluations_agree_within_binomial_noise_and_a_temperature_apart_do_not(
        student_url, served_models, tmp_path, monkeypatch):
    """avg@k of `--server` and of the HF path, both at temperature 1 on the same 30 problems x 16 samples:
    a two-proportion z-test at |z| < 3.3, with the pooled rate away from 0 and 1. Per-problem rates differ,
    so the pooled binomial variance over-states the variance of the difference under the null: the test is
    conservative. Its power: the HF path at temperature 0.5 (rate 0.46 against 0.23, z about 7 at this
    size) is told apart from the server's at temperature 1 by the same test."""
    import opd.evaluate.run as run
    from support import two_proportion_z

    folder, samples, problems = str(served_models / "student"), 16, 30
    monkeypatch.setattr(run, "grade_all", greedy_first_token_grader(folder, problems))

    def correct(temperature: float, backend: EvalBackend) -> int:
        settings = EvalSettings(samples=samples, temperature=temperature, top_p=1.0, max_new_tokens=1,
                                limit=problems, batch_size=64)
        results = evaluate(["arc_challenge"], settings, str(tmp_path / f"{backend.name}-{temperature}"),
                           model_dir=folder, backend=backend)
        return round(results["benchmarks"]["arc_challenge"]["avg_at_k"] * problems * samples)

    total = problems * samples
    served = correct(1.0, EvalBackend(name="server", server=student_url))
    hf, colder = correct(1.0, EvalBackend()), correct(0.5, EvalBackend())
    assert 0.15 < (served + hf) / (2 * total) < 0.85, (served, hf)
    assert abs(two_proportion_z(served, hf, total)) < Z_LIMIT, (served, hf, colder)
    assert abs(two_proportion_z(served, colder, total)) > Z_LIMIT, (served, hf, colder)
