"""The benchmark commands run in a reduced size so that they cannot rot. They check that every variant was
measured and that the tables carry ratios against the same-run baseline; the figures live in
docs/benchmarks.md, measured by the full commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from opd.bench import run_in_subprocess
from opd.bench.packed_step import MIN_RESPONSE_TOKENS, response_lengths


def run_bench(name, tmp_path, *arguments, timeout=600):
    output = tmp_path / f"{name}.json"
    result = subprocess.run([sys.executable, "-m", "opd", "bench", name, "--quick", "--output", str(output),
                             *arguments], capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result.stdout, json.loads(output.read_text())


def test_bench_memory_quick(tmp_path):
    table, raw = run_bench("memory", tmp_path)
    rows = raw["results"]
    assert {r["variant"] for r in rows} == {"naive", "opd", "trl"}
    assert all("error" not in r for r in rows), rows
    assert "memory / naive" in table
    by = {(r["tokens"], r["variant"]): r for r in rows}
    # Even at the quick size, opd's loss path needs less memory than the full-logits one at the larger size.
    assert by[(2048, "opd")]["peak_extra_bytes"] < by[(2048, "naive")]["peak_extra_bytes"]


def test_bench_overhead_quick(tmp_path):
    table, raw = run_bench("overhead", tmp_path)
    result, parts = raw["results"], raw["results"]["parts_seconds"]
    assert set(parts) == {"generate", "teacher forward", "student forward + backward"}
    assert result["step_seconds"] > 0 and all(seconds > 0 for seconds in parts.values()), result
    assert result["response_tokens"] > 0
    # The ratio is the measured step over the sum of the measured bare parts, and the table prints that one.
    assert result["ratio"] == pytest.approx(result["step_seconds"] / sum(parts.values()))
    assert f"| **ratio (opd / bare)** | {result['ratio']:.3f} |" in table
    assert f"| **sum of bare parts** | {sum(parts.values()):.3f} |" in table


def test_bench_step_quick(tmp_path):
    table, raw = run_bench("step", tmp_path, "--variants", "trl,opd,opd-vllm")
    assert [r["variant"] for r in raw["results"]] == ["trl", "opd", "opd-vllm"]
    assert all("error" not in r for r in raw["results"]), raw["results"]
    assert "throughput / TRL" in table


@pytest.mark.slow  # starts two vLLM servers on one core (minutes)
def test_bench_step_served_variants_quick(tmp_path):
    pytest.importorskip("vllm")
    table, raw = run_bench("step", tmp_path, "--variants", "opd-served,opd-async", timeout=1800)
    rows = {r["variant"]: r for r in raw["results"]}
    assert list(rows) == ["opd-served", "opd-async"]
    assert all("error" not in r for r in rows.values()), raw["results"]
    served, pipelined = rows["opd-served"], rows["opd-async"]
    assert all(r["step_seconds"] > 0 and r["generation_seconds"] > 0 and r["training_seconds"] > 0
               for r in rows.values())
    bound = max(pipelined["generation_seconds"], pipelined["training_seconds"])
    assert f"| opd-async | {pipelined['step_seconds']:.3f} |" in table and f"{pipelined['step_seconds'] / bound:.2f}" in table
    assert f"async / sync step time: {pipelined['step_seconds'] / served['step_seconds']:.2f}" in table


@pytest.mark.slow  # two training processes per variant, an engine in each (minutes on the CPU)
def test_bench_step_colocated_variants_quick(tmp_path):
    pytest.importorskip("vllm")
    table, raw = run_bench("step", tmp_path, "--variants", "opd-2proc,opd-colocated", timeout=1800)
    rows = {r["variant"]: r for r in raw["results"]}
    assert list(rows) == ["opd-2proc", "opd-colocated"]
    assert all("error" not in r for r in rows.values()), raw["results"]
    assert all(r["processes"] == 2 and r["tokens_per_second"] > 0 and r["measured_tokens"] > 0 for r in rows.values())
    assert [r["backend"] for r in rows.values()] == ["hf", "vllm"]  # as each run recorded it
    baseline, colocated = rows["opd-2proc"], rows["opd-colocated"]
    # the ratios printed are the colocated run's figures over the baseline's of the same run
    throughput = colocated["tokens_per_second"] / baseline["tokens_per_second"]
    memory = colocated["peak_rss_bytes"] / baseline["peak_rss_bytes"]
    assert f"| {throughput:.2f} | {memory:.2f} |" in table.split("opd-colocated: a vLLM engine per rank")[1]
    assert "| 1.00 | 1.00 |" in table.split("opd-2proc: HF generate")[1].splitlines()[0]


def test_bench_step_packed_variants_quick(tmp_path):
    table, raw = run_bench("step", tmp_path, "--variants", "opd-packed")  # one of the pair runs both
    rows = {r["variant"]: r for r in raw["results"]}
    assert list(rows) == ["opd-padded", "opd-packed"]
    assert all("error" not in r for r in rows.values()), raw["results"]
    padded, packed = rows["opd-padded"], rows["opd-packed"]
    assert padded["rounds"] == packed["rounds"] == 2
    # The same batch, lengths spread from 2 tokens to the cap: the packed forward runs on fewer tokens,
    # and the step computes the same loss.
    assert packed["response_tokens"] == padded["response_tokens"] < packed["forward_tokens"] < padded["forward_tokens"]
    assert packed["first_loss"] == pytest.approx(padded["first_loss"], rel=1e-4)
    assert all(r["training_seconds"] > 0 and r["scoring_seconds"] > 0 and r["peak_extra_bytes"] > 0
               for r in rows.values())
    assert (f"padded / packed: training time {padded['training_seconds'] / packed['training_seconds']:.2f}, "
            f"scoring time {padded['scoring_seconds'] / packed['scoring_seconds']:.2f}, "
            f"peak extra memory {padded['peak_extra_bytes'] / packed['peak_extra_bytes']:.2f}") in table
    assert "first-step loss the same" in table


def test_bench_step_grouped_variants_quick(tmp_path):
    table, raw = run_bench("step", tmp_path, "--variants", "opd-grouped")  # its pair alone, both of it
    rows = {r["variant"]: r for r in raw["results"]}
    assert list(rows) == ["opd-consecutive", "opd-grouped"]
    assert all("error" not in r for r in rows.values()), raw["results"]
    consecutive, grouped = rows["opd-consecutive"], rows["opd-grouped"]
    assert consecutive["rounds"] == grouped["rounds"] == 2
    assert grouped["first_loss"] == pytest.approx(consecutive["first_loss"], rel=1e-4)
    # The same rows, each grouped forward at its own rows' width: fewer tokens through the model.
    assert grouped["response_tokens"] == consecutive["response_tokens"] < grouped["forward_tokens"] \
        < consecutive["forward_tokens"]
    assert "opd-padded" not in table  # the other pair was not asked for
    assert (f"consecutive / grouped (4 micro-batches): training time "
            f"{consecutive['training_seconds'] / grouped['training_seconds']:.2f}, scoring time "
            f"{consecutive['scoring_seconds'] / grouped['scoring_seconds']:.2f}, peak extra memory "
            f"{consecutive['peak_extra_bytes'] / grouped['peak_extra_bytes']:.2f}") in table
    assert "first-step loss the same" in table


def test_batch_lengths_are_shuffled_so_consecutive_rows_mix_lengths():
    from opd.bench.packed_step import batch_lengths

    lengths = batch_lengths(16, 128)
    assert sorted(lengths) == response_lengths(16, 128) and lengths != sorted(lengths)
    assert lengths == batch_lengths(16, 128)  # a fixed order: every variant gets the same batch


def test_response_lengths_spread_from_a_few_tokens_to_the_cap():
    lengths = response_lengths(16, 128)
    assert lengths[0] == MIN_RESPONSE_TOKENS and lengths[-1] == 128 and lengths == sorted(lengths)
    assert sum(lengths) / len(lengths) < 128 / 3  # mostly short: padding to the longest costs most


def test_bench_rollout_quick(tmp_path):
    table, raw = run_bench("rollout", tmp_path)
    results = raw["results"]
    assert [(r["workload"], r["variant"]) for r in results] == [
        (workload, variant) for workload in ("full length", "ragged") for variant in ("generate", "hf", "vllm")]
    assert all("error" not in r for r in results), results
    assert all(r["tokens"] > 0 and r["tokens_per_second"] > 0 for r in results)
    tokens = {(r["workload"], r["variant"]): r["tokens"] for r in results}
    # Same seed, same model: generate and opd's loop sample the same tokens; the ragged rows end early.
    assert tokens["full length", "generate"] == tokens["full length", "hf"]
    assert tokens["ragged", "generate"] == tokens["ragged", "hf"] < tokens["full length", "hf"] / 2
    assert "throughput / HF generate" in table and "| ragged | opd HF sampler (decode loop) |" in table


def test_a_variant_runs_in_its_own_process_and_its_failure_is_reported(tmp_path):
    (tmp_path / "fake_variant.py").write_text(
        "import json, sys, time\n"
        "variant = sys.argv[1]\n"
        "if variant == 'slow': time.sleep(60)\n"
        "if variant == 'broken': raise RuntimeError('out of ideas at ' + sys.argv[2])\n"
        "print('a log line first')\n"
        "print(json.dumps({'variant': variant, 'args': sys.argv[2:]}))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    assert run_in_subprocess("fake_variant", "fine", "7", env=env) == {"variant": "fine", "args": ["7"]}
    assert run_in_subprocess("fake_variant", "broken", "7", env=env) == {
        "variant": "broken", "error": "RuntimeError: out of ideas at 7"}
    assert run_in_subprocess("fake_variant", "slow", env=env, timeout=1) == {
        "variant": "slow", "error": "timeout after 1s"}
