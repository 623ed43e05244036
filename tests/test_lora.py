"""LoRA students through peft: only adapters move, the reference is the model with adapters disabled,
and the adapter and a merged model save as HF folders; resume works from the adapter checkpoint."""

from __future__ import annotations

import torch
from conftest import make_config
from support import parameters_of

from opd.assemble import assemble, seed_everything
from opd.runtime.lora import AdaptersDisabled, causal_lm
from opd.runtime.monitor import read_metrics
from opd.collect import collect
from opd.teachers import score_batch
from opd.train import train

LORA = {"rank": 4, "alpha": 8.0}


def lora_config(model_dir, prompts_file, output, **train_settings):
    return make_config(model_dir, prompts_file, output,
                       student={"path": str(model_dir / "student"), "lora": LORA},
                       objective={"name": "gopd", "lam": 1.25}, train=train_settings)


def test_only_adapters_train_and_both_folders_save(model_dir, prompts_file, tmp_path):
    config = lora_config(model_dir, prompts_file, tmp_path / "run")
    seed_everything(0)
    run = assemble(config)
    trainable = [n for n, p in run.student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    final = train(config)
    merged, base = parameters_of(final), parameters_of(model_dir / "student")
    assert any(not torch.equal(merged[n], base[n]) for n in base)  # the merged model carries the update
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter_folder = final.with_name("final_adapter")
    assert (adapter_folder / "adapter_config.json").is_file()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir / "student")),
                                         str(adapter_folder))
    lora_weights = {n: p for n, p in reloaded.named_parameters() if "lora_B" in n}
    assert lora_weights and any(p.abs().sum() > 0 for p in lora_weights.values())  # B moved away from 0
    # Base weights inside the adapted model never moved.
    for name, parameter in causal_lm(reloaded).named_parameters():
        if "lora_" not in name:
            plain = name.replace(".base_layer", "")
            torch.testing.assert_close(parameter, base[plain])
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(records) == 3 and all("reward/math/implicit_mean" in r or "reward/code/implicit_mean" in r
                                      for r in records)


def test_reference_is_the_base_model_with_adapters_disabled(model_dir, prompts_file, tmp_path):
    config = lora_config(model_dir, prompts_file, tmp_path / "run")
    seed_everything(0)
    run = assemble(config)
    reference = run.scorers["math"].reference
    assert isinstance(reference.model, AdaptersDisabled) and reference.model.model is run.student  # no second copy
    with torch.no_grad():  # give the adapters a nonzero effect, as after training
        for name, parameter in run.student.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    batch = collect(run, 0, [0, 2], {})
    scores = score_batch(batch, run.scorers, run.scoring)
    plain = make_config(model_dir, prompts_file, tmp_path / "plain", objective={"name": "gopd", "lam": 1.25})
    base_run = assemble(plain)  # the reference loaded as a separate copy of the base student
    expected = score_batch(batch, base_run.scorers, base_run.scoring)
    mask = batch.response_mask
    torch.testing.assert_close(scores.ref_logprobs[mask], expected.ref_logprobs[mask], atol=1e-5, rtol=1e-5)
    # ... while the adapted student itself scores differently.
    from opd.scoring import output_head, response_hidden_states, teacher_token_scores

    hidden = response_hidden_states(run.student, batch.prompt_ids, batch.prompt_mask, batch.response_ids, mask)
    weight, bias = output_head(run.student)
    adapted, _, _, _ = teacher_token_scores(hidden[mask].detach(), weight, bias, batch.response_ids[mask])
    assert not torch.allclose(adapted, expected.ref_logprobs[mask], atol=1e-3)


def test_lora_resume_gives_identical_weights(model_dir, prompts_file, tmp_path):
    straight = train(lora_config(model_dir, prompts_file, tmp_path / "straight", steps=4))
    train(lora_config(model_dir, prompts_file, tmp_path / "resumed", steps=2, save_every=2))
    resumed = train(lora_config(model_dir, prompts_file, tmp_path / "resumed", steps=4, save_every=2), resume=True)
    assert (tmp_path / "resumed" / "checkpoints" / "step_000002" / "adapter" / "adapter_config.json").is_file()
    a, b = parameters_of(straight), parameters_of(resumed)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_gradient_checkpointing_gives_the_same_step(model_dir, prompts_file, tmp_path):
    config = make_config(model_dir, prompts_file, tmp_path / "probe",
                         student={"path": str(model_dir / "student"), "gradient_checkpointing": True})
    assert causal_lm(assemble(config).student).is_gradient_checkpointing
    plain = train(make_config(model_dir, prompts_file, tmp_path / "plain", train={"steps": 2}))
    checkpointed = train(make_config(model_dir, prompts_file, tmp_path / "ckpt", train={"steps": 2},
                                     student={"path": str(model_dir / "student"), "gradient_checkpointing": True}))
    a, b = parameters_of(plain), parameters_of(checkpointed)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
