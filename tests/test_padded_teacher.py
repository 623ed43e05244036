"""A teacher whose output head is wider than the student's (teachers.N.drop_padded_logits): refused for top-k
objectives without the option; with it, scored over the student's ids renormalised, against float64
references of the top-k log-probs, the fkl_topk gradient and the padded-mass metric."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from opd.assemble import StepSettings, assemble, seed_everything
from opd.checks import StartupError
from opd.collect import collect
from opd.config import ConfigError, load_config
from opd.metrics import padded_mass_metrics
from opd.rollout.hf import HfSampler
from opd.runtime.tiny import build_model, build_tokenizer
from opd.teachers import score_batch
from opd.train import accumulate_gradients

PADDING = 24  # extra output logits of the teacher, past the tokenizer (Qwen2.5-7B: 128)
TOPK = 4


@pytest.fixture(scope="module")
def padded_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("padded")
    tokenizer = build_tokenizer(root / "student")
    build_model(root / "student", tokenizer, seed=0, initializer_range=0.2)
    build_model(root / "teacher", tokenizer, seed=1, initializer_range=0.2, vocab_size=len(tokenizer) + PADDING)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": text, "domain": "math"}) + "\n"
                               for text in ("what is 12 + 7?", "the quick brown fox", "hello world", "count to 3")))
    return root, len(tokenizer)


def _config(root, drop: bool, objective: str = "fkl_topk", backend: str = "hf"):
    teacher = {"domain": "math", "path": str(root / "teacher"), "drop_padded_logits": drop, "backend": backend}
    if backend == "vllm-server":
        teacher["server"] = {"urls": ["http://127.0.0.1:9"]}
    return load_config(base={
        "student": {"path": str(root / "student")},
        "teachers": [teacher],
        "data": {"path": str(root / "prompts.jsonl")},
        "rollout": {"prompts_per_step": 4, "samples_per_prompt": 1, "max_new_tokens": 6},
        "objective": {"name": objective, "topk": TOPK, "lam": 1.0},
        "optim": {"lr": 1e-3, "micro_batch_size": 4},
        "train": {"steps": 1, "output_dir": str(root / "run"), "save_every": 0, "tensorboard": False,
                  "progress": False},
    })


def test_a_wider_teacher_is_refused_for_topk_naming_the_option(padded_folders):
    root, _ = padded_folders
    with pytest.raises(StartupError, match=r"teachers\.0\.drop_padded_logits: true"):
        assemble(_config(root, drop=False))


def test_the_option_is_refused_where_there_is_nothing_to_drop(padded_folders, tmp_path):
    root, _ = padded_folders
    same_width = load_config(base={
        "student": {"path": str(root / "student")},
        "teachers": [{"domain": "math", "path": str(root / "student"), "drop_padded_logits": True}],
        "data": {"path": str(root / "prompts.jsonl")},
        "objective": {"name": "fkl_topk", "topk": TOPK, "lam": 1.0},
        "train": {"output_dir": str(tmp_path / "run"), "tensorboard": False, "progress": False},
    })
    with pytest.raises(StartupError, match=r"teachers\.0\.drop_padded_logits: set, .* nothing to drop"):
        assemble(same_width)


def test_the_option_is_refused_for_served_teachers(padded_folders):
    root, _ = padded_folders
    with pytest.raises(ConfigError, match=r"teachers\.0\.drop_padded_logits: needs backend hf"):
        _config(root, drop=True, backend="vllm-server")


@pytest.fixture(scope="module")
def padded_run(padded_folders):
    root, vocabulary = padded_folders
    seed_everything(0)
    run = assemble(_config(root, drop=True))
    run.student.double()
    batch = collect(run, 0, [0, 1, 2, 3], {})
    scores = score_batch(batch, run.scorers, run.scoring)  # float32, as in a run
    reference = copy.deepcopy(run.scorers["math"].teacher.model).double()  # the same weights in float64
    return run, batch, scores, reference, vocabulary


def _row_logits(model, batch, row: int):
    """float64 logits [T_real, V_model] predicting row's real response tokens, one unpadded forward."""
    prompt = batch.prompt_ids[row][batch.prompt_mask[row]]
    response = batch.response_ids[row][batch.response_mask[row]]
    ids = torch.cat([prompt, response])[None]
    logits = model(input_ids=ids).logits[0].double()
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(response)], response


def test_topk_logprobs_and_padded_mass_match_a_float64_reference(padded_run):
    run, batch, scores, teacher, vocabulary = padded_run
    assert teacher.config.vocab_size == vocabulary + PADDING
    for row in range(batch.num_rows):
        mask = batch.response_mask[row]
        with torch.no_grad():
            logits, response = _row_logits(teacher, batch, row)
        kept = torch.log_softmax(logits[:, :vocabulary], dim=-1)
        values, ids = kept.topk(TOPK, dim=-1)
        torch.testing.assert_close(scores.topk_ids[row][mask].long(), ids)
        torch.testing.assert_close(scores.topk_logprobs[row][mask].double(), values, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(scores.logprobs[row][mask].double(), kept.gather(1, response[:, None]).squeeze(1),
                                   rtol=1e-5, atol=1e-6)
        mass = torch.softmax(logits, dim=-1)[:, vocabulary:].sum(dim=-1)
        assert float(mass.min()) > 1e-3  # the padded columns do carry mass here: dropping them shows
        torch.testing.assert_close(scores.padded_mass[row][mask].double(), mass, rtol=1e-5, atol=1e-7)


def test_the_padded_mass_is_logged_per_teacher(padded_run):
    run, batch, scores, teacher, vocabulary = padded_run
    masses = []
    for row in range(batch.num_rows):
        with torch.no_grad():
            logits, _ = _row_logits(teacher, batch, row)
        masses.append(torch.softmax(logits, dim=-1)[:, vocabulary:].sum(dim=-1))
    every = torch.cat(masses)
    metrics = padded_mass_metrics(batch, scores)
    assert metrics["teacher/math/padded_mass_mean"].value == pytest.approx(float(every.mean()), rel=1e-5)
    assert metrics["teacher/math/padded_mass_max"].value == pytest.approx(float(every.max()), rel=1e-5)


def test_the_fkl_topk_gradient_matches_a_float64_reference(padded_run):
    run, batch, scores, teacher, vocabulary = padded_run
    student = run.student
    student.zero_grad(set_to_none=True)
    step = StepSettings(aggregation="token-mean", temperature=1.0, chunk_size=5, max_grad_norm=None,
                        micro_batch_size=4)
    accumulate_gradients(student, batch, scores, run.objective, step)
    ours = {name: parameter.grad.clone() for name, parameter in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    total, tokens = 0.0, int(batch.response_mask.sum())
    for row in range(batch.num_rows):
        with torch.no_grad():
            teacher_logits, _ = _row_logits(teacher, batch, row)
        teacher_kept = torch.log_softmax(teacher_logits[:, :vocabulary], dim=-1)
        values, ids = teacher_kept.topk(TOPK, dim=-1)
        student_logits, _ = _row_logits(student, batch, row)
        student_logprobs = torch.log_softmax(student_logits, dim=-1).gather(1, ids)
        total = total + (values.exp() * (values - student_logprobs)).sum()  # fkl_topk, algorithms §4
    (total / tokens).backward()
    for name, parameter in student.named_parameters():
        # the teacher scored in float32, as in a run: agreement to its precision
        torch.testing.assert_close(ours[name], parameter.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_teacher_writer_never_samples_a_padded_id(padded_run):
    run, batch, scores, teacher, vocabulary = padded_run
    writer = run.scorers["math"].writer
    teacher = writer.model
    head = teacher.lm_head.weight
    saved = head.detach().clone()
    with torch.no_grad():  # padded ids made the likeliest by far: only the dropped columns stop them
        head[vocabulary:] = 50.0 * saved[:PADDING]
    prompts = [list(range(3, 8))] * 4
    try:
        whole_head = HfSampler(teacher).sample(prompts, run.sampling)
        responses = writer.sample(prompts, run.sampling)
    finally:
        with torch.no_grad():
            head.copy_(saved)
    assert int(whole_head.ids[whole_head.mask].max()) >= vocabulary  # the control: padded ids drawn
    assert int(responses.ids.max()) < vocabulary
