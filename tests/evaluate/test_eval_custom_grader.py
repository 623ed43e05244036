"""Custom graders in `opd eval`: a prompt file as a benchmark, graded by `--grader module:function` or a
registered name, on given responses and on sampled ones; a grader that raises stops the evaluation naming
the problem id and row, never counting it as wrong; the refusals of a file without a grader and of a
grader without a file."""

from __future__ import annotations

import json

import pytest

from opd.evaluate.run import EvalSettings, evaluate
from opd.evaluate.sampling import EvalBackend
from opd.grading.custom import register_grader, unregister_grader
from opd.runtime.tiny import build_model, build_tokenizer

ROWS = [{"id": "a", "prompt": "say red", "answer": "red", "domain": "colours"},
        {"id": "b", "prompt": "say blue", "answer": "blue", "domain": "colours"},
        {"prompt": [{"role": "user", "content": "say green"}], "answer": "green", "domain": "colours"}]

GRADER_MODULE = '''
def contains_answer(row, completion):
    return float(row.answer in completion)

def fails_on_blue(row, completion):
    if row.answer == "blue":
        raise ZeroDivisionError("no blue here")
    return 1.0
'''


@pytest.fixture
def benchmark(tmp_path, monkeypatch):
    (tmp_path / "my_graders.py").write_text(GRADER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "colours.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def _responses(tmp_path, completions: dict[str, str]):
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps({"problem_id": i, "completion": c}) + "\n" for i, c in completions.items()))
    return str(path)


def _opd_eval(*arguments):
    from opd.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["eval", *arguments])
    message = str(exited.value.code)
    assert message.startswith("opd: "), message
    return message


def test_a_benchmark_file_is_graded_by_a_module_function(benchmark, tmp_path, capsys):
    from opd.cli import main

    # the third row has no id: its line number names it
    responses = _responses(tmp_path, {"a": "red!", "b": "it is green", "3": "green"})
    main(["eval", "--responses", responses, "--benchmark", str(benchmark), "--grader", "my_graders:contains_answer",
          "--output-dir", str(tmp_path / "eval")])
    result = json.loads((tmp_path / "eval" / "results.json").read_text())["benchmarks"][str(benchmark)]
    assert [(s["problem_id"], s["correct"]) for s in result["samples"]] == [("a", True), ("b", False), ("3", True)]
    assert result["avg_at_k"] == pytest.approx(2 / 3) and result["domain"] == "colours"
    assert result["samples"][1]["reason"] == "my_graders:contains_answer: reward 0"
    assert "0.667" in capsys.readouterr().out


def test_a_grader_that_raises_stops_the_evaluation_naming_the_problem(benchmark, tmp_path):
    responses = _responses(tmp_path, {"a": "red", "b": "blue", "3": "green"})
    message = _opd_eval("--responses", responses, "--benchmark", str(benchmark), "--grader", "my_graders:fails_on_blue",
                        "--output-dir", str(tmp_path / "eval"))
    assert "problem 'b'" in message and "ZeroDivisionError: no blue here" in message, message
    assert f"{benchmark}:2" in message, message  # the row's file:line
    assert not (tmp_path / "eval" / "results.json").exists()  # never a score with the failure counted as wrong


def test_a_registered_grader_grades_sampled_completions(benchmark, tmp_path):
    root = tmp_path / "model"
    tokenizer = build_tokenizer(root)
    build_model(root, tokenizer, seed=0)
    seen = []

    def grade(row, completion):
        seen.append((row.extra.get("id"), row.domain, completion))
        return 1.0 if row.answer == "red" else 0.0

    register_grader("colour_check", grade)
    try:
        results = evaluate([str(benchmark)], EvalSettings(samples=2, max_new_tokens=3), str(tmp_path / "eval"),
                           model_dir=str(root), backend=EvalBackend(), grader="colour_check")
    finally:
        unregister_grader("colour_check")
    result = results["benchmarks"][str(benchmark)]
    assert result["problems"] == 3 and len(result["samples"]) == 6
    assert result["avg_at_k"] == pytest.approx(1 / 3)  # row a's two samples
    assert sorted({(identity, domain) for identity, domain, _ in seen}, key=str) == sorted(
        {("a", "colours"), ("b", "colours"), (None, "colours")}, key=str)
    # graded in parallel: the grader saw every sampled completion, in some order
    assert sorted(s["completion"] for s in result["samples"]) == sorted(c for _, _, c in seen)


@pytest.mark.parametrize("arguments, expected", [
    (["--grader", None], "needs --grader module:function"),
    (["--benchmarks", "arc_challenge", "--grader", "my_graders:contains_answer"], "applies to benchmark files"),
    (["--grader", "math"], "a custom grader .* is needed"),
    (["--grader", "my_graders:missing"], "has no 'missing'"),
], ids=["file without grader", "grader without file", "built-in grader", "unknown function"])
def test_graders_and_benchmark_files_are_checked_before_anything_runs(benchmark, tmp_path, arguments, expected):
    import re

    flags = ["--benchmarks", str(benchmark)] if "--benchmarks" not in arguments else []
    flags += [a for a in arguments if a is not None]
    if "--grader" in flags and flags[-1] == "--grader":
        flags = flags[:-1]
    message = _opd_eval(str(tmp_path / "no-model-needed"), *flags, "--output-dir", str(tmp_path / "eval"))
    assert re.search(expected, message), message
