"""`opd eval --temperature 0`: greedy decoding, the argmax of the model at every token (against a decoding
by hand), and one sample per problem (more are refused)."""

from __future__ import annotations

import json

import pytest
from support import argmax_decode

from opd.evaluate.run import EvalSettings
from opd.evaluate.sampling import EvalBackend, open_eval_sampler
from opd.runtime.models import load_model
from opd.runtime.tiny import build_model, build_tokenizer

BENCHMARK, LIMIT, NEW_TOKENS = "arc_challenge", 3, 6


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_greedy")
    tokenizer = build_tokenizer(root / "student")
    # initializer_range 0.2: peaked distributions, so a sampled token would differ from the argmax
    build_model(root / "student", tokenizer, seed=0, initializer_range=0.2)
    return str(root / "student")


def test_opd_eval_at_temperature_0_writes_the_argmax_completions(folder, tmp_path):
    from opd.cli import main
    from opd.evaluate.benchmarks import load_benchmark

    out = tmp_path / "eval"
    main(["eval", folder, "--benchmarks", BENCHMARK, "--limit", str(LIMIT), "--temperature", "0",
          "--max-new-tokens", str(NEW_TOKENS), "--output-dir", str(out)])
    samples = json.loads((out / "results.json").read_text())["benchmarks"][BENCHMARK]["samples"]
    problems = load_benchmark(BENCHMARK)[:LIMIT]
    model = load_model(folder)
    with open_eval_sampler(folder, EvalBackend(), problems, NEW_TOKENS) as opened:
        expected = {p.problem_id: opened.tokenizer.decode(
            argmax_decode(model, opened.prompts[p.problem_id], NEW_TOKENS, opened.end_of_sequence_ids),
            skip_special_tokens=True) for p in problems}
    assert {s["problem_id"]: s["completion"] for s in samples} == expected
    assert any(expected.values())  # real text compared, not only empty completions


def test_more_than_one_greedy_sample_is_refused(folder, tmp_path):
    from opd.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["eval", folder, "--benchmarks", BENCHMARK, "--limit", "1", "--temperature", "0", "--samples", "4",
              "--output-dir", str(tmp_path / "eval")])
    message = str(exited.value.code)
    assert message.startswith("opd: eval: --temperature 0") and "--samples 4" in message, message
    assert not (tmp_path / "eval").exists()  # refused before anything ran
    with pytest.raises(ValueError, match="temperature 0 .*greedy"):  # the Python API refuses it too
        EvalSettings(temperature=0, samples=2)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        EvalSettings(temperature=-0.5)
