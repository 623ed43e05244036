"""chat_template_kwargs per model: passed to the chat template wherever prompts are rendered, and checked."""

from __future__ import annotations

import shutil

import pytest
from conftest import make_config

from opd.assemble import assemble
from opd.checks import StartupError
from opd.config import ConfigError, load_config, to_dict
from opd.evaluate.problem import Problem
from opd.evaluate.sampling import EvalBackend, open_eval_sampler
from opd.runtime.models import load_tokenizer, render_prompt

# A template that reads a variable, as Qwen3's reads enable_thinking.
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>"
            "{% if enable_thinking is defined and not enable_thinking %}no thinking {% endif %}{% endif %}")
OFF = {"enable_thinking": False}


@pytest.fixture(scope="module")
def thinking_models(model_dir, tmp_path_factory):
    """student/ and teacher/ copies whose tokenizers carry TEMPLATE."""
    root = tmp_path_factory.mktemp("thinking")
    for name in ("student", "teacher"):
        shutil.copytree(model_dir / name, root / name)
        tokenizer = load_tokenizer(str(root / name))
        tokenizer.chat_template = TEMPLATE
        tokenizer.save_pretrained(str(root / name))
    return root


def text_of(tokenizer, ids) -> str:
    return tokenizer.decode(ids)


def test_render_prompt_passes_the_variables_to_the_template(thinking_models):
    tokenizer = load_tokenizer(str(thinking_models / "student"))
    assert "no thinking" in text_of(tokenizer, render_prompt(tokenizer, "hi", "chat", OFF))
    assert "no thinking" not in text_of(tokenizer, render_prompt(tokenizer, "hi", "chat"))


def _config(model_dir, prompts_file, tmp_path, thinking_models, teacher_kwargs="inherit"):
    teacher = {"domain": "math", "path": str(thinking_models / "teacher")}
    if teacher_kwargs != "inherit":
        teacher["chat_template_kwargs"] = teacher_kwargs
    return make_config(model_dir, prompts_file, tmp_path / "run",
                       student={"path": str(thinking_models / "student"), "chat_template_kwargs": OFF},
                       teachers=[teacher, {"domain": "code", "path": str(thinking_models / "teacher"),
                                           "chat_template_kwargs": OFF}])


def test_training_prompts_are_rendered_with_the_students_variables_and_teachers_agree(
        model_dir, prompts_file, tmp_path, thinking_models):
    run = assemble(_config(model_dir, prompts_file, tmp_path, thinking_models))
    try:
        assert all("no thinking" in text_of(run.tokenizer, ids) for ids in run.prompt_ids)
    finally:
        run.close()


def test_a_teacher_whose_variables_render_other_ids_is_refused(model_dir, prompts_file, tmp_path, thinking_models):
    with pytest.raises(StartupError, match=r"teachers\.0.*chat_template_kwargs: student \{'enable_thinking': "
                                           r"False\}, teacher \{\}"):
        assemble(_config(model_dir, prompts_file, tmp_path, thinking_models, teacher_kwargs={}))


def test_evaluation_prompts_are_rendered_with_the_variables(thinking_models):
    problem = Problem(benchmark="b", problem_id="1", domain="math", prompt="hi", answer="1")
    with open_eval_sampler(str(thinking_models / "student"), EvalBackend(), [problem], 4, OFF) as opened:
        assert "no thinking" in text_of(opened.tokenizer, opened.prompts["1"])


def test_the_config_takes_a_mapping_and_records_it(model_dir, prompts_file, tmp_path):
    config = make_config(model_dir, prompts_file, tmp_path, student={"path": "s", "chat_template_kwargs": OFF})
    assert to_dict(config)["student"]["chat_template_kwargs"] == OFF
    assert config.template_kwargs_for(config.teachers[0]) == OFF
    with pytest.raises(ConfigError, match="student.chat_template_kwargs: expected a mapping"):
        load_config(base={**to_dict(config), "student": {"path": "s", "chat_template_kwargs": "enable_thinking"}})
