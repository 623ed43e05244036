"""Start-up checks: each one triggers on a crafted bad input, with its message, before any training."""

from __future__ import annotations

import json
import re

import pytest
import torch
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


def test_in_process_vllm_teachers_are_refused_with_more_than_one_process(model_dir, prompts_file, tmp_path):
    """A colocated student engine per process is allowed; a second engine per process (a vLLM teacher) is not."""
    from opd.checks import check_process_count

    teachers = [{"domain": "math", "path": str(model_dir / "teacher"), "backend": "vllm"},
                {"domain": "code", "path": str(model_dir / "teacher_b")}]
    config = make_config(model_dir, prompts_file, tmp_path, teachers=teachers, objective={"score_temperature": 1.0})
    check_process_count(config, 1)
    with pytest.raises(StartupError, match=r"teachers.0.backend: vllm runs in one training process only"):
        check_process_count(config, 2)
    check_process_count(make_config(model_dir, prompts_file, tmp_path, rollout={"backend": "vllm"}), 2)


# --------------------------------------------------------------------------- no silently wrong run


def _copy_model(model_dir, tmp_path, name="teacher"):
    import shutil

    folder = tmp_path / f"{name}_copy"
    shutil.copytree(model_dir / name, folder)
    return folder


def _no_model_may_load(monkeypatch):
    """Checks that must run before any weights load: loading one fails the test."""
    import opd.assemble

    def refuse(*args, **kwargs):
        raise AssertionError("a model loaded before the check ran")

    monkeypatch.setattr(opd.assemble, "load_model", refuse)


def test_topk_above_the_vocabulary_is_refused_before_any_model_loads(model_dir, prompts_file, tmp_path, monkeypatch):
    from opd.assemble import assemble

    _no_model_may_load(monkeypatch)
    config = make_config(model_dir, prompts_file, tmp_path / "run", objective={"name": "fkl_topk", "lam": 1.0,
                                                                                "topk": 301})
    with pytest.raises(StartupError, match=r"objective.topk=301 is more than the vocabulary's 300 tokens"):
        assemble(config)


def test_a_chat_template_path_that_does_not_exist_is_refused(model_dir, prompts_file, tmp_path, monkeypatch):
    """Earlier, the path string itself became the teacher's template (every prompt rendered as the path)."""
    from opd.assemble import assemble

    _no_model_may_load(monkeypatch)
    missing = tmp_path / "templates" / "teacher.jinja"
    config = make_config(model_dir, prompts_file, tmp_path / "run",
                         teachers=[{"domain": "math", "path": str(model_dir / "teacher")},
                                   {"domain": "code", "path": str(model_dir / "teacher"),
                                    "chat_template": str(missing)}])
    with pytest.raises(FileNotFoundError, match=rf"teachers.1.chat_template: no such file '{re.escape(str(missing))}'"):
        assemble(config)


@pytest.mark.parametrize(
    "grader, rows, message",
    [
        ("exact", [{"prompt": "a", "answer": "1"}, {"prompt": "b"}], r"prompts.jsonl:2: 'answer' is missing"),
        ("math", [{"prompt": "a", "answer": 19.5}],
         r"prompts.jsonl:1: 'answer' must be text \(or an integer\), got 19.5"),
        ("exact", [{"prompt": "a", "answer": ["1"]}], r"prompts.jsonl:1: 'answer' must be text"),
        ("math", [{"prompt": "a", "answer": " "}], r"prompts.jsonl:1: 'answer' is empty"),
        ("code", [{"prompt": "a", "tests": "assert True"}, {"prompt": "b", "answer": "1"}],
         r"prompts.jsonl:2: 'tests' is missing"),
        ("code", [{"prompt": "a", "tests": {"assert": 1}}], r"prompts.jsonl:1: 'tests' must be test code"),
        ("code", [{"prompt": "a", "tests": ["assert True", 3]}], r"prompts.jsonl:1: 'tests' must be test code"),
    ],
)
def test_grader_fields_are_checked_on_every_row_before_any_model_loads(model_dir, tmp_path, monkeypatch, grader,
                                                                        rows, message):
    """Earlier, a row without the field its grader reads failed only when a step first sampled it."""
    from opd.assemble import assemble

    _no_model_may_load(monkeypatch)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = make_config(model_dir, data, tmp_path / "run", objective={"name": "gopd", "lam": 1.0},
                         teachers=[{"domain": "default", "path": str(model_dir / "teacher"), "grader": grader}])
    with pytest.raises(DataError, match=message + rf".*; teachers.0.grader={grader} grades domain 'default' by it"):
        assemble(config)


def test_graded_rows_that_carry_their_fields_pass(model_dir, tmp_path):
    from opd.checks import check_grader_fields
    from opd.data import PromptRow

    rows = [PromptRow(index=0, prompt="a", domain="m", answer=19), PromptRow(index=1, prompt="b", domain="c",
                                                                           tests=["assert f() == 1"]),
            PromptRow(index=2, prompt="c", domain="ungraded")]
    check_grader_fields(rows, {"m": ("teachers.0.grader", "math"), "c": ("teachers.1.grader", "code")}, "d.jsonl")


def _save_with(folder, change):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    with torch.no_grad():
        change(dict(model.named_parameters()))
    model.save_pretrained(str(folder))


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_non_finite_weights_are_refused_at_load_naming_the_model(model_dir, prompts_file, tmp_path, role):
    from opd.assemble import assemble

    folder = _copy_model(model_dir, tmp_path, role)
    _save_with(folder, lambda parameters: parameters["model.norm.weight"].__setitem__(0, float("nan")))
    if role == "student":
        config = make_config(model_dir, prompts_file, tmp_path / "run", student={"path": str(folder)})
        key = "student.path"
    else:
        config = make_config(model_dir, prompts_file, tmp_path / "run",
                             teachers=[{"domain": "math", "path": str(folder)},
                                       {"domain": "code", "path": str(model_dir / "teacher_b")}])
        key = "teachers.0.path"
    message = (rf"{key}: the model in '{re.escape(str(folder))}' has non-finite \(nan or inf\) weights in 1 "
               r"tensor\(s\), e.g. \['model.norm.weight'\]")
    with pytest.raises(ValueError, match=message):
        assemble(config)
    from opd.runtime.models import check_finite_weight_files  # what a vLLM teacher's folder is checked by

    with pytest.raises(ValueError, match=message):
        check_finite_weight_files(str(folder), key)


def test_a_vllm_folder_with_only_bin_weights_is_checked_for_non_finite_values_too(model_dir, tmp_path):
    """Earlier only *.safetensors were read: a .bin-only checkpoint with a nan reached vLLM unchecked."""
    from transformers import AutoModelForCausalLM

    from opd.runtime.models import check_finite_weight_files

    folder = _copy_model(model_dir, tmp_path, "teacher_b")
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    for file in folder.glob("*.safetensors"):
        file.unlink()
    weights = folder / "pytorch_model.bin"  # the pre-safetensors format, as older checkpoints ship it
    torch.save(model.state_dict(), weights)
    check_finite_weight_files(str(folder), "teachers.0.path")  # finite: accepted
    with torch.no_grad():
        model.get_parameter("model.norm.weight")[0] = float("inf")
    torch.save(model.state_dict(), weights)
    message = (rf"teachers.0.path: the model in '{re.escape(str(folder))}' has non-finite \(nan or inf\) weights "
               r"in 1 tensor\(s\), e.g. \['model.norm.weight'\]")
    with pytest.raises(ValueError, match=message):
        check_finite_weight_files(str(folder), "teachers.0.path")
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"teachers.0.path: '.*pytorch_model.*\.bin' is not a readable PyTorch"):
        check_finite_weight_files(str(folder), "teachers.0.path")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_corrupt_safetensors_file_names_the_file_and_the_key(model_dir, prompts_file, tmp_path, damage):
    """Earlier: a SafetensorError traceback that named neither the file nor the config key."""
    from opd.assemble import assemble

    folder = _copy_model(model_dir, tmp_path, "teacher_b")
    weights = folder / "model.safetensors"
    content = weights.read_bytes()
    weights.write_bytes(content[: len(content) // 2] if damage == "truncated" else b"\x00\x01 not safetensors" * 10)
    config = make_config(model_dir, prompts_file, tmp_path / "run",
                         teachers=[{"domain": "math", "path": str(model_dir / "teacher")},
                                   {"domain": "code", "path": str(folder)}])
    with pytest.raises(ValueError, match=rf"teachers.1.path: '{re.escape(str(weights))}' is not a readable "
                                         r"safetensors file \(.+\); is it truncated or corrupt\?"):
        assemble(config)


def test_a_student_without_a_tokenizer_is_blamed_on_the_student(model_dir, prompts_file, tmp_path):
    """Earlier, the student's missing tokenizer surfaced as the teacher's vocabulary differing."""
    from opd.assemble import assemble

    folder = _copy_model(model_dir, tmp_path, "student")
    for name in ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    config = make_config(model_dir, prompts_file, tmp_path / "run", student={"path": str(folder)})
    with pytest.raises(ValueError, match=rf"^student.path: '{re.escape(str(folder))}' has no tokenizer"):
        assemble(config)


def test_a_data_line_that_is_not_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:2: not UTF-8 text \(byte 0xe9 at byte 16 of the "
                                        r"line\)"):
        load_prompts(str(path))
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a byte-order mark is fine"}\n')
    assert load_prompts(str(path))[0].prompt == "a byte-order mark is fine"


def test_a_teacher_whose_end_of_sequence_ids_differ_is_refused_before_any_model_loads(model_dir, prompts_file,
                                                                                     tmp_path, monkeypatch):
    import shutil

    import opd.assemble as assemble_module

    other = tmp_path / "teacher_eos"
    shutil.copytree(model_dir / "teacher", other)
    (other / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 5], "pad_token_id": 0}))
    monkeypatch.setattr(assemble_module, "load_student", lambda *a: pytest.fail("a model was loaded"))
    config = make_config(model_dir, prompts_file, tmp_path / "run",
                         teachers=[{"domain": "math", "path": str(other)},
                                   {"domain": "code", "path": str(model_dir / "teacher")}])
    with pytest.raises(StartupError, match=r"teachers.0: its end-of-sequence ids \[1, 5\] .* differ from the "
                                           r"student's \[1\]"):
        train(config)


def test_drop_long_prompts_leaves_long_rows_out_and_says_how_many(model_dir, tmp_path, capsys):
    from opd.assemble import assemble

    rows = [{"prompt": "hi", "domain": "math"}, {"prompt": "a much longer prompt " * 8, "domain": "math"},
            {"prompt": "yo", "domain": "code"}]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    limited = {"max_prompt_tokens": 24, "path": str(data)}
    with pytest.raises(DataError, match=r"row 2 has \d+ prompt tokens, .*set data.drop_long_prompts: true"):
        assemble(make_config(model_dir, data, tmp_path / "run", data=limited))
    run = assemble(make_config(model_dir, data, tmp_path / "run", data={**limited, "drop_long_prompts": True}))
    assert [row.prompt for row in run.rows] == ["hi", "yo"] and [row.index for row in run.rows] == [0, 1]
    assert run.rows[1].where == f"{data}:3"  # still names its line in the file
    assert all(len(ids) <= 24 for ids in run.prompt_ids) and len(run.prompt_ids) == 2
    assert "dropped 1 of 3 rows" in capsys.readouterr().err
    run.close()


def test_async_with_more_than_one_process_needs_every_teacher_and_reference_served(model_dir, prompts_file,
                                                                                    tmp_path):
    from opd.checks import check_process_count

    served = {"backend": "vllm-server", "server": {"urls": ["http://127.0.0.1:1"], "sync": "folder"}}

    def config(lam=1.25, **teacher):
        return make_config(model_dir, prompts_file, tmp_path, rollout={**served, "async": True},
                           objective={"score_temperature": 1.0, "lam": lam},
                           teachers=[{"domain": domain, "path": str(model_dir / "teacher"), **teacher}
                                     for domain in ("math", "code")])

    in_process = config()  # hf teachers, student_init references
    check_process_count(in_process, 1)
    with pytest.raises(StartupError, match="rollout.async with more than one process needs every teacher and "
                                           "reference served: teachers.0.backend is hf"):
        check_process_count(in_process, 2)
    teacher_server = {"backend": "vllm-server", "server": {"urls": ["http://127.0.0.1:2"]}}
    with pytest.raises(StartupError, match="teachers.0.reference is student_init runs in the training process"):
        check_process_count(config(**teacher_server), 2)
    check_process_count(config(**teacher_server, reference="http://127.0.0.1:3"), 2)  # all served: allowed
    check_process_count(config(lam=1.0, **teacher_server, reference=None), 2)
