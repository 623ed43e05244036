"""Config loading: unknown keys, bad values and inconsistent settings fail at load time, naming the key."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import torch
import yaml

from opd.config import ConfigError, ObjectiveConfig, load_config, to_dict
from opd.objectives import register_builder, unregister
from opd.train import train
from opd.types import Signal

MINIMAL = {
    "student": {"path": "s"},
    "teachers": [{"domain": "default", "path": "t"}],
    "data": {"path": "d.jsonl"},
}


def write(tmp_path, data):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_minimal_config_loads_with_defaults(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.objective.name == "gopd" and config.objective.lam == 1.0
    assert config.teachers[0].reference == "student_init"
    assert config.score_temperature == config.rollout.temperature
    assert load_config(base=to_dict(config)) == config  # the run record round-trips


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rollout": {"temprature": 0.7}}, r"unknown key\(s\) \['rollout.temprature'\]"),
        ({"extra_section": {}}, r"unknown key\(s\) \['extra_section'\]"),
        ({"rollout": {"temperature": "hot"}}, r"rollout.temperature: expected a number, got 'hot'"),
        ({"rollout": {"temperature": 0}}, r"rollout.temperature: must be > 0"),
        ({"objective": {"aggregation": "mean"}}, r"objective.aggregation: 'mean' is not one of"),
        ({"objective": {"name": "nope"}}, r"objective.name: 'nope' is not one of"),
        ({"optim": {"micro_batch_size": 1.5}}, r"optim.micro_batch_size: expected an integer"),
        ({"optim": {"micro_batch_tokens": 0}}, r"optim.micro_batch_tokens: must be >= 1 or null"),
        ({"optim": {"pack_sequences": "yes"}}, r"optim.pack_sequences: expected"),
        ({"rollout": {"backend": "vllm", "shared_noise": True}}, r"rollout.shared_noise: needs rollout.backend hf"),
        ({"optim": {"group_by_length": "yes"}}, r"optim.group_by_length: expected"),
        ({"train": {"steps": 0}}, r"train.steps: must be >= 1"),
        ({"teachers": []}, r"teachers: at least one teacher"),
        ({"teachers": [{"domain": "a", "path": "t"}, {"domain": "a", "path": "u"}]}, r"more than one teacher"),
        ({"teachers": [{"path": "t"}]}, r"missing required key 'teachers.0.domain'"),
        # Silently wrong runs on earlier versions: each one trained (or exited 0 having trained nothing).
        ({"optim": {"lr": float("inf")}}, r"optim.lr: must be finite, got inf"),
        ({"rollout": {"temperature": float("inf")}}, r"rollout.temperature: must be finite, got inf"),
        ({"objective": {"tropd": {"clip_floor": float("nan")}}},
         r"objective.tropd.clip_floor: must be finite, got nan"),
        ({"objective": {"tropd": {"clip_floor": 0.5}}}, r"objective.tropd.clip_floor: must be < 0, got 0.5"),
        ({"objective": {"renormalize": True, "fkl_topk": {"tail_bucket": True}}},
         r"objective.fkl_topk.tail_bucket: a renormalised teacher top-k \(objective.renormalize\) leaves no tail"),
        ({"objective": {"lam": float("-inf")}}, r"objective.lam: must be finite, got -inf"),
        ({"rollout": {"vllm": {"kv_cache_gib": float("nan")}}}, r"rollout.vllm.kv_cache_gib: must be finite"),
        ({"optim": {"lr": 10**400}}, r"optim.lr: must be finite, got inf"),
        ({"optim": {"betas": [0.9, 1.0]}}, r"optim.betas.1: must be in \[0, 1\), got 1.0"),
        ({"optim": {"betas": [-0.1, 0.999]}}, r"optim.betas.0: must be in \[0, 1\), got -0.1"),
        ({"optim": {"eps": 0}}, r"optim.eps: must be > 0, got 0.0"),
        ({"optim": {"weight_decay": -0.01}}, r"optim.weight_decay: must be >= 0, got -0.01"),
        ({"train": {"seed": -1}}, r"train.seed: must be in \[0, 2\*\*32\) \(numpy's seed range\), got -1"),
        ({"train": {"seed": 2**32}}, r"train.seed: must be in \[0, 2\*\*32\)"),
        ({"objective": {"eopd": {"entropy_threshold": -1}}}, r"objective.eopd.entropy_threshold: must be >= 0"),
        ({"student": {"path": "s", "lora": {"alpha": 0}}}, r"student.lora.alpha: must be > 0"),
        ({"eval": {"max_new_tokens": 0}}, r"eval.max_new_tokens: must be >= 1"),
        ({"eval": {"limit": 0}}, r"eval.limit: must be >= 1 or null"),
    ],
)
def test_bad_config_fails_at_load_naming_the_key_and_file(tmp_path, change, message):
    data = {**MINIMAL, **{k: ({**MINIMAL.get(k, {}), **v} if isinstance(v, dict) else v) for k, v in change.items()}}
    with pytest.raises(ConfigError, match=message) as error:
        load_config(write(tmp_path, data))
    assert "run.yaml" in str(error.value)


def test_lam_without_reference_is_an_error_not_a_fallback(tmp_path):
    data = {**MINIMAL, "teachers": [{"domain": "default", "path": "t", "reference": None}], "objective": {"lam": 1.25}}
    with pytest.raises(ConfigError, match=r"teachers.0.reference: lam = 1.25 .* needs a reference model"):
        load_config(write(tmp_path, data))
    # Per-teacher lam counts too, and lam = 1 without a reference is fine (plain OPD).
    data["objective"] = {"lam": 1.0}
    assert load_config(write(tmp_path, data)).teachers[0].reference is None
    data["teachers"][0]["lam"] = 0.5
    with pytest.raises(ConfigError, match="lam = 0.5"):
        load_config(write(tmp_path, data))


def test_opd_objective_with_lam_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"objective \[.opd.\] ignores lam"):
        load_config(write(tmp_path, {**MINIMAL, "objective": {"name": "opd", "lam": 1.25}}))


def test_dotted_overrides(tmp_path):
    path = write(tmp_path, MINIMAL)
    config = load_config(path, ["objective.lam=1.25", "teachers.0.lam=1.5", "optim.lr=1e-5", "optim.max_grad_norm=null",
                                "rollout.top_p=0.9"])
    assert config.objective.lam == 1.25 and config.teachers[0].lam == 1.5
    assert config.optim.lr == 1e-5 and config.optim.max_grad_norm is None and config.rollout.top_p == 0.9
    with pytest.raises(ConfigError, match="index 3 out of range"):
        load_config(path, ["teachers.3.lam=1"])
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        load_config(path, ["objective.lam"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(path, ["objective.lamda=2"])


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_config_is_frozen(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    with pytest.raises(AttributeError):
        config.objective.lam = 2.0


def test_lora_and_precision_settings(tmp_path):
    config = load_config(write(tmp_path, {**MINIMAL, "student": {"path": "s", "lora": {"rank": 8}}}))
    assert config.student.lora.rank == 8 and "q_proj" in config.student.lora.target_modules
    with pytest.raises(ConfigError, match="student.lora.dropout: must be 0"):
        load_config(write(tmp_path, {**MINIMAL, "student": {"path": "s", "lora": {"dropout": 0.1}}}))
    with pytest.raises(ConfigError, match="train.mixed_precision: 'fp8' is not one of"):
        load_config(write(tmp_path, {**MINIMAL, "train": {"mixed_precision": "fp8"}}))


def test_bf16_autocast_on_cpu_is_refused(tmp_path):
    config = load_config(write(tmp_path, {**MINIMAL, "train": {"mixed_precision": "bf16"}}))
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: bf16 autocast is allowed")
    with pytest.raises(ValueError, match="on the CPU training stays float32"):
        train(config)


VLLM_TEACHER = {**MINIMAL, "teachers": [{"domain": "default", "path": "t", "backend": "vllm"}]}


def test_vllm_teacher_scoring_needs_temperature_one(tmp_path):
    """vLLM's prompt_logprobs are at temperature 1: another scoring temperature fails at load, never mismatches."""
    with pytest.raises(ConfigError, match=r"teachers.0.backend: vLLM scores prompts at temperature 1 only.*0.7"):
        load_config(write(tmp_path, {**VLLM_TEACHER, "rollout": {"temperature": 0.7}}))
    # Sampling at 0.7 is fine when the scores are taken at 1 (objective.score_temperature).
    config = load_config(write(tmp_path, {**VLLM_TEACHER, "rollout": {"temperature": 0.7, "backend": "vllm"},
                                          "objective": {"score_temperature": 1.0}}))
    assert config.teachers[0].backend == "vllm" and config.rollout.backend == "vllm"
    with pytest.raises(ConfigError, match=r"teachers.0.shard: a vLLM teacher"):
        load_config(write(tmp_path, {**VLLM_TEACHER, "teachers": [{**VLLM_TEACHER["teachers"][0], "shard": True}]}))


@pytest.mark.parametrize("objective, message", [
    ({"name": "entropy_opd"}, r"rollout.backend: vllm reports no sampler entropy, and objective.name 'entropy_opd'"),
    ({"name": "reopold", "reopold": {"entropy_selection": True}},
     r"rollout.backend: vllm reports no sampler entropy, and objective.name 'reopold'"),
    ({"name": "opd", "add": [{"name": "reopold"}], "reopold": {"stage_two_step": 5}},
     r"rollout.backend: vllm .* objective.add.0.name 'reopold'"),
])
def test_vllm_rollouts_refuse_objectives_that_rank_by_sampler_entropy(tmp_path, objective, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, {**MINIMAL, "rollout": {"backend": "vllm"}, "objective": objective}))
    # reopold without entropy selection declares no need for sampler entropy: vLLM rollouts are fine.
    load_config(write(tmp_path, {**MINIMAL, "rollout": {"backend": "vllm"}, "objective": {"name": "reopold"}}))


def test_vllm_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"rollout.vllm.kv_cache_gib: must be > 0"):
        load_config(write(tmp_path, {**MINIMAL, "rollout": {"backend": "vllm", "vllm": {"kv_cache_gib": 0}}}))
    with pytest.raises(ConfigError, match=r"rollout.vllm.max_model_len: must hold"):
        load_config(write(tmp_path, {**MINIMAL, "rollout": {"backend": "vllm", "vllm": {"max_model_len": 64}}}))
    with pytest.raises(ConfigError, match=r"rollout.backend: 'sglang' is not one of"):
        load_config(write(tmp_path, {**MINIMAL, "rollout": {"backend": "sglang"}}))


@pytest.mark.parametrize("old, new", sorted(ObjectiveConfig.MOVED.items()))
def test_moved_objective_keys_are_rejected_naming_the_new_key(tmp_path, old, new):
    with pytest.raises(ConfigError, match=rf"objective.{old}: moved to {re.escape(new)}"):
        load_config(write(tmp_path, {**MINIMAL, "objective": {old: 1}}))


def test_option_blocks_load_and_are_checked(tmp_path):
    path = write(tmp_path, {**MINIMAL, "objective": {"name": "tropd", "tropd": {"advantage": "gopd", "outlier": "clip"}}})
    config = load_config(path, ["objective.tropd.clip_floor=-2", "objective.reopold.entropy_fraction=0.5"])
    assert config.objective.tropd.outlier == "clip" and config.objective.tropd.clip_floor == -2.0
    assert config.objective.reopold.entropy_fraction == 0.5 and config.objective.jsd_topk.beta == 0.5
    assert load_config(base=to_dict(config)) == config
    for override, message in [("objective.jsd_topk.beta=2", r"objective.jsd_topk.beta: must be in \[0, 1\]"),
                              ("objective.gkd.beta=-1", r"objective.gkd.beta: must be in \[0, 1\]"),
                              ("objective.reopold.ratio=1", r"objective.reopold.ratio: must be in \(0, 1\)"),
                              ("objective.entropy_opd.fraction=0", r"objective.entropy_opd.fraction: must be in"),
                              ("objective.tropd.outlier=drop", r"objective.tropd.outlier: 'drop' is not one of"),
                              ("objective.tropd.beta=1", r"unknown key\(s\) \['objective.tropd.beta'\]")]:
        with pytest.raises(ConfigError, match=message):
            load_config(write(tmp_path, MINIMAL), [override])


def test_unknown_objective_names_are_refused_with_the_registered_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"objective.add.0.name: 'nope' is not one of \[.*'gopd'"):
        load_config(write(tmp_path, {**MINIMAL, "objective": {"add": [{"name": "nope"}]}}))


def test_lam_is_allowed_exactly_when_the_advantage_reads_it(tmp_path):
    lam = {**MINIMAL, "teachers": [{"domain": "default", "path": "t", "lam": 1.25}]}
    for objective in ({"name": "gopd"}, {"name": "tropd", "tropd": {"advantage": "gopd"}},
                      {"name": "fkl_topk", "add": [{"name": "gopd"}]}):
        load_config(write(tmp_path, {**lam, "objective": objective}))
    with pytest.raises(ConfigError, match=r"teachers.0.lam: objective \['tropd'\] ignores lam, but lam = 1.25; "
                                          r"objectives that read lam: gopd"):
        load_config(write(tmp_path, {**lam, "objective": {"name": "tropd"}}))


def test_outcome_rewards_need_a_grader_and_no_teacher(tmp_path):
    grpo = {"name": "opd", "add": [{"name": "grpo", "weight": 0.1}]}
    with pytest.raises(ConfigError, match=r"teachers.0.grader: objective.add.0.name 'grpo' needs an outcome reward"):
        load_config(write(tmp_path, {**MINIMAL, "objective": grpo}))
    no_teacher = {**MINIMAL, "teachers": [{"domain": "default", "path": None, "grader": "math"}]}
    assert load_config(write(tmp_path, {**no_teacher, "objective": {"name": "grpo"}})).teachers[0].path is None
    with pytest.raises(ConfigError, match=r"teachers.0.path: objective \['opd', 'grpo'\] needs a teacher"):
        load_config(write(tmp_path, {**no_teacher, "objective": grpo}))
    with pytest.raises(ConfigError, match=r"teachers.0.path: objective \['sft'\] needs a teacher"):
        load_config(write(tmp_path, {**no_teacher, "objective": {"name": "sft"}}))


def test_dataset_responses_only_for_objectives_that_take_them(tmp_path):
    config = load_config(write(tmp_path, {**MINIMAL, "objective": {"name": "gkd", "onpolicy_fraction": 0.5}}))
    assert config.objective.onpolicy_fraction == 0.5
    with pytest.raises(ConfigError, match=r"objective.onpolicy_fraction: .* objective.add.0.name 'opd' does not"):
        load_config(write(tmp_path, {**MINIMAL, "objective": {"name": "gkd", "onpolicy_fraction": 0.5,
                                                              "add": [{"name": "opd"}]}}))


def test_guidance_is_refused_with_teacher_written_responses(tmp_path):
    with pytest.raises(ConfigError, match=r"objective.guidance: objective.name 'sft' already trains on whole teacher"):
        load_config(write(tmp_path, {**MINIMAL, "objective": {"name": "sft", "guidance": {"enabled": True}}}))


@dataclass(frozen=True, kw_only=True, slots=True)
class Probe:
    """A throwaway objective: validation must ask its declarations, whatever its name."""

    needs: frozenset = frozenset()
    uses_lam: bool = False
    takes_dataset_responses: bool = False

    def __call__(self, student, batch, teacher):
        raise AssertionError("validation never runs an objective")


@pytest.fixture
def probe():
    declared = {}
    register_builder("probe", lambda config, context: Probe(**declared))
    try:
        yield declared
    finally:
        unregister("probe")


def test_validation_asks_the_objective_not_its_name(tmp_path, probe):
    data = {**MINIMAL, "teachers": [{"domain": "default", "path": None, "lam": 1.25}], "objective": {"name": "probe"}}
    with pytest.raises(ConfigError, match=r"teachers.0.lam: objective \['probe'\] ignores lam"):
        load_config(write(tmp_path, data))
    probe.update(uses_lam=True)
    assert load_config(write(tmp_path, data)).objective.name == "probe"  # no teacher signal: no path needed
    probe.update(needs=frozenset({Signal.TEACHER_TOPK}))
    with pytest.raises(ConfigError, match=r"teachers.0.path: objective \['probe'\] needs a teacher"):
        load_config(write(tmp_path, data))
    probe.update(needs=frozenset({Signal.SAMPLER_ENTROPY, Signal.REWARD}))
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, {**data, "rollout": {"backend": "vllm"}, "objective": {"name": "probe",
                                                                                           "onpolicy_fraction": 0.5}}))
    for message in ("teachers.0.grader: objective.name 'probe' needs an outcome reward",
                    "rollout.backend: vllm reports no sampler entropy, and objective.name 'probe'",
                    "objective.onpolicy_fraction: dataset responses (< 1) are only meaningful"):
        assert message in str(error.value)
    probe.update(takes_dataset_responses=True)
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, {**data, "objective": {"name": "probe", "onpolicy_fraction": 0.5}}))
    assert "onpolicy_fraction" not in str(error.value)
    probe.update(needs=frozenset({Signal.TEACHER_RESPONSES}))
    with_teacher = {**data, "teachers": [{"domain": "default", "path": "t", "lam": 1.25}]}
    with pytest.raises(ConfigError, match=r"objective.guidance: objective.name 'probe' already trains on whole"):
        load_config(write(tmp_path, {**with_teacher, "objective": {"name": "probe", "guidance": {"enabled": True}}}))
    assert load_config(write(tmp_path, with_teacher)).objective.name == "probe"


def test_non_finite_overrides_and_python_built_trees_are_refused(tmp_path):
    """`lr=inf` trained one step into non-finite weights; `inf` and `nan` parse as numbers, so the check is on
    the number, by key, whether it came from YAML, an override or Python."""
    import dataclasses

    path = write(tmp_path, MINIMAL)
    for override, message in [("optim.lr=inf", r"run.yaml: optim.lr: must be finite, got inf"),
                              ("rollout.temperature=.inf", r"rollout.temperature: must be finite, got inf"),
                              ("objective.tropd.clip_floor=nan",
                               r"objective.tropd.clip_floor: must be finite, got nan"),
                              ("teachers.0.lam=-inf", r"teachers.0.lam: must be finite, got -inf"),
                              ("optim.betas=[0.9, nan]", r"optim.betas.1: must be finite, got nan")]:
        with pytest.raises(ConfigError, match=message):
            load_config(path, [override])
    config = load_config(path)
    with pytest.raises(ConfigError, match=r"optim.lr: must be finite, got inf"):
        dataclasses.replace(config, optim=dataclasses.replace(config.optim, lr=float("inf")))
    with pytest.raises(ConfigError, match=r"objective.guidance.beta: must be finite, got nan"):
        guidance = dataclasses.replace(config.objective.guidance, beta=float("nan"))
        dataclasses.replace(config, objective=dataclasses.replace(config.objective, guidance=guidance))


def test_a_key_given_twice_is_refused_naming_it_and_both_lines(tmp_path):
    """PyYAML keeps the last of two equal keys: a second `train:` section silently replaced the first."""
    path = tmp_path / "run.yaml"
    path.write_text("student: {path: s}\nteachers: [{domain: default, path: t}]\ndata: {path: d.jsonl}\n"
                    "train: {steps: 5}\nobjective: {lam: 1.0}\ntrain: {seed: 3}\n")
    with pytest.raises(ConfigError, match=r"run.yaml: key 'train' appears twice in one mapping \(lines 4 and 6\)"):
        load_config(path)
    path.write_text("student: {path: s}\nteachers: [{domain: default, path: t}]\ndata: {path: d.jsonl}\n"
                    "optim:\n  lr: 1.0e-5\n  warmup_steps: 2\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"run.yaml: key 'lr' appears twice in one mapping \(lines 5 and 7\)"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"key 'domain' appears twice"):
        load_config(write(tmp_path, MINIMAL), ["teachers=[{domain: a, domain: b, path: t}]"])
    # YAML merge keys may still be overridden by the mapping that merges them, as YAML defines.
    from opd.config_tree import load_yaml

    assert load_yaml("a: &a {x: 1, y: 2}\nb: {<<: *a, x: 3}\n") == {"a": {"x": 1, "y": 2}, "b": {"x": 3, "y": 2}}


def test_seeds_past_numpys_range_are_refused_for_the_last_process(tmp_path):
    from opd.checks import StartupError, check_launch

    config = load_config(write(tmp_path, {**MINIMAL, "train": {"seed": 2**32 - 1}}))
    check_launch(config, world_size=1, cuda=False, resume=False, checkpoint=None)
    with pytest.raises(StartupError, match=r"train.seed=4294967295: process r seeds with train.seed \+ r, and "
                                           r"4294967296 is past numpy's largest seed"):
        check_launch(config, world_size=2, cuda=False, resume=False, checkpoint=None)


# --------------------------------------------------------------------------- rollout.async

SERVED = {"backend": "vllm-server", "server": {"urls": ["http://127.0.0.1:8000"], "sync": "folder"}}


def test_rollout_async_is_the_yaml_key_async_and_round_trips(tmp_path):
    config = load_config(write(tmp_path, {**MINIMAL, "rollout": {**SERVED, "async": True, "max_staleness": 2}}))
    assert config.rollout.async_ is True and config.rollout.max_staleness == 2
    recorded = to_dict(config)
    assert recorded["rollout"]["async"] is True and "async_" not in recorded["rollout"]
    assert load_config(base=recorded) == config
    assert load_config(write(tmp_path, MINIMAL)).rollout.async_ is False


@pytest.mark.parametrize("rollout, message", [
    ({"async": True}, "rollout.async: needs rollout.backend: vllm-server, but it is hf"),
    ({"async": True, "backend": "vllm"}, "rollout.async: needs rollout.backend: vllm-server, but it is vllm"),
    ({**SERVED, "async": True, "max_staleness": -1}, "rollout.max_staleness: must be >= 0, got -1"),
    ({**SERVED, "async_": True}, r"unknown key\(s\) \['rollout.async_'\]"),
    ({**SERVED, "async": "yes"}, "rollout.async"),
])
def test_rollout_async_refusals_name_the_key(tmp_path, rollout, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, {**MINIMAL, "rollout": rollout}))


# --------------------------------------------------------------------------- rollout.server.sync: nccl

NCCL = {"backend": "vllm-server", "server": {"urls": ["http://10.0.0.2:8000"], "sync": "nccl",
                                            "nccl_address": "10.0.0.1:29600"}}


def test_the_nccl_sync_loads_with_the_address_of_rank_zero(tmp_path):
    server = load_config(write(tmp_path, {**MINIMAL, "rollout": NCCL})).rollout.server
    assert (server.sync, server.nccl_address, server.sync_folder) == ("nccl", "10.0.0.1:29600", None)


@pytest.mark.parametrize("server, message", [
    ({"nccl_address": None}, r"rollout.server.nccl_address: sync nccl needs host:port of training rank 0.*None"),
    ({"nccl_address": "10.0.0.1"}, "rollout.server.nccl_address: sync nccl needs host:port"),
    ({"nccl_address": ":29600"}, "rollout.server.nccl_address: sync nccl needs host:port"),
    ({"nccl_address": "10.0.0.1:http"}, "rollout.server.nccl_address: sync nccl needs host:port"),
    ({"sync_folder": "/shared/w"}, "rollout.server.sync_folder: set, but sync is nccl"),
    ({"sync": "folder"}, "rollout.server.nccl_address: set, but sync is folder"),
    ({"sync": "gloo"}, "rollout.server.sync"),
])
def test_the_nccl_sync_refuses_what_it_would_ignore_or_cannot_use(tmp_path, server, message):
    rollout = {**NCCL, "server": {**NCCL["server"], **server}}
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, {**MINIMAL, "rollout": rollout}))
    with pytest.raises(ConfigError, match="rollout.server.sync: set, but rollout.backend is hf"):
        load_config(write(tmp_path, {**MINIMAL, "rollout": {"server": {"nccl_address": "10.0.0.1:29600"}}}))
