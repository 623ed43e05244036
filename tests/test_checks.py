"""Start-up checks: each one triggers on a crafted bad input, with its message, before any training."""

from __future__ import annotations

import json

import pytest
from conftest import make_config

from opd.checks import StartupError
from opd.data import DataError, load_prompts
from opd.runtime.tiny import build_model, build_tokenizer
from opd.train import train


def test_domain_without_a_teacher(model_dir, prompts_file, tmp_path):
    config = make_config(model_dir, prompts_file, tmp_path / "run",
                         teachers=[{"domain": "math", "path": str(model_dir / "teacher")}])
    with pytest.raises(StartupError, match=r"domain\(s\) with no teacher: 'code' \(3 rows, first at row 2\)"):
        train(config)
    assert not (tmp_path / "run").exists()  # nothing ran


def test_teacher_with_a_different_vocabulary(model_dir, prompts_file, tmp_path):
    other = tmp_path / "other"
    tokenizer = build_tokenizer(other, corpus=["completely different words", "zebra yak xylophone"], vocab_size=280)
    build_model(other, tokenizer)
    config = make_config(model_dir, prompts_file, tmp_path / "run",
                         teachers=[{"domain": "math", "path": str(other)},
                                   {"domain": "code", "path": str(model_dir / "teacher")}])
    with pytest.raises(StartupError, match=r"teachers.0: the tokenizer's vocabulary differs from the student's"):
        train(config)


def test_reference_with_a_different_vocabulary(model_dir, prompts_file, tmp_path):
    other = tmp_path / "other"
    tokenizer = build_tokenizer(other, corpus=["completely different words"], vocab_size=280)
    build_model(other, tokenizer)
    config = make_config(model_dir, prompts_file, tmp_path / "run",
                         teachers=[{"domain": "math", "path": str(model_dir / "teacher"), "reference": str(other)},
                                   {"domain": "code", "path": str(model_dir / "teacher")}])
    with pytest.raises(StartupError, match=r"teachers.0.reference: the tokenizer's vocabulary differs"):
        train(config)


def _teacher_with_template(model_dir, tmp_path, template):
    from transformers import AutoTokenizer

    folder = tmp_path / "templated"
    import shutil

    shutil.copytree(model_dir / "teacher", folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.chat_template = template
    tokenizer.save_pretrained(str(folder))
    return folder


OTHER_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>"
                  "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_teacher_whose_chat_template_renders_different_ids(model_dir, prompts_file, tmp_path):
    folder = _teacher_with_template(model_dir, tmp_path, OTHER_TEMPLATE)
    config = make_config(model_dir, prompts_file, tmp_path / "run",
                         teachers=[{"domain": "math", "path": str(folder)},
                                   {"domain": "code", "path": str(model_dir / "teacher")}])
    with pytest.raises(StartupError, match=r"teachers.0: its chat template renders .* row 1 to different token ids"):
        train(config)


def test_teacher_with_an_explicit_template_is_allowed_and_reads_its_own_prompt(model_dir, prompts_file, tmp_path):
    folder = _teacher_with_template(model_dir, tmp_path, OTHER_TEMPLATE)
    template = tmp_path / "teacher.jinja"
    template.write_text(OTHER_TEMPLATE)
    config = make_config(model_dir, prompts_file, tmp_path / "run", train={"steps": 1},
                         teachers=[{"domain": "math", "path": str(folder), "chat_template": str(template)},
                                   {"domain": "code", "path": str(model_dir / "teacher")}])
    from opd.assemble import assemble

    run = assemble(config)
    own = run.scorers["math"].teacher_prompts
    assert own is not None and own[0] != run.prompt_ids[0]  # the teacher reads its own rendering
    assert run.scorers["code"].teacher_prompts is None
    train(config)


def test_model_path_that_is_not_a_local_folder(model_dir, prompts_file, tmp_path):
    config = make_config(model_dir, prompts_file, tmp_path / "run", student={"path": "Qwen/Qwen3-4B"})
    with pytest.raises(FileNotFoundError, match=r"student.path: 'Qwen/Qwen3-4B' is not a local folder"):
        train(config)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "ok"}\n{"prompt": "broken"\n', r"prompts.jsonl:2: not valid JSON"),
        ('{"prompt": "ok"}\n{"question": "x"}\n', r"prompts.jsonl:2: missing 'prompt'"),
        ('{"prompt": ""}\n', r"prompts.jsonl:1: 'prompt' is empty"),
        ('{"prompt": [{"role": "robot", "content": "x"}]}\n', r"prompts.jsonl:1: prompt\[0\] needs role"),
        ('{"prompt": "ok", "domain": 3}\n', r"prompts.jsonl:1: 'domain' must be a non-empty string"),
        ('[1, 2]\n', r"prompts.jsonl:1: a row must be a JSON object"),
    ],
)
def test_malformed_rows_are_reported_with_file_and_line(tmp_path, line, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(line)
    with pytest.raises(DataError, match=message):
        load_prompts(str(path))


def test_parquet_prompts_load_and_report_rows(tmp_path):
    import datasets

    good = tmp_path / "good.parquet"
    datasets.Dataset.from_list([{"prompt": "a", "domain": "math"}, {"prompt": "b", "domain": "code"}]).to_parquet(str(good))
    rows = load_prompts(str(good))
    assert [r.domain for r in rows] == ["math", "code"]
    bad = tmp_path / "bad.parquet"
    datasets.Dataset.from_list([{"prompt": "a"}, {"prompt": ""}]).to_parquet(str(bad))
    with pytest.raises(DataError, match=r"bad.parquet: row 2: 'prompt' is empty"):
        load_prompts(str(bad))


def test_prompt_longer_than_the_limit_names_the_row(model_dir, prompts_file, tmp_path):
    config = make_config(model_dir, prompts_file, tmp_path / "run", data={"max_prompt_tokens": 9})
    with pytest.raises(DataError, match=r"row \d+ has \d+ prompt tokens, more than data.max_prompt_tokens=9"):
        train(config)


def test_rows_keep_answers_and_extra_fields(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "q", "answer": "4", "tests": ["assert f() == 1"], "source": "x"}) + "\n")
    row = load_prompts(str(path), default_domain="math")[0]
    assert (row.domain, row.answer, row.tests, row.extra) == ("math", "4", ["assert f() == 1"], {"source": "x"})


def test_vllm_teacher_for_an_objective_needing_full_distributions_is_refused(model_dir, prompts_file, tmp_path):
    """vLLM scoring returns log-probs and top-k only: gkd (full distributions) fails before any loading."""
    from opd.assemble import assemble

    config = make_config(model_dir, prompts_file, tmp_path, objective={"name": "gkd", "lam": 1.0},
                         teachers=[{"domain": "math", "path": str(model_dir / "teacher"), "backend": "vllm"},
                                   {"domain": "code", "path": str(model_dir / "teacher_b")}])
    with pytest.raises(StartupError, match=r"teachers.0.backend: objective \['gkd'\] needs full distributions"):
        assemble(config)
