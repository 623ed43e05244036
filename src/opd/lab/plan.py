"""What the lab runs: its scale (full or quick), the models it builds, and every experiment's runs.

A `Job` is one unit of work for a worker process: pretrain a model, train a teacher or a student with
`opd.train`, merge (ExPO), or only measure. Jobs are grouped in stages that run in order; the jobs of a
stage are independent and run in parallel. Each job writes `result.json` last, so a finished job is
skipped when the lab runs again (stages are cached).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from opd.lab.pretrain import ModelShape, PretrainSettings
from opd.lab.tasks import Demonstrations

EXPERIMENTS = ("lam_sweep", "distillation", "strong_to_weak", "mismatch", "temperature")
LAMS = (0.0, 0.5, 1.0, 1.25, 1.5)
# λ = 0 is not trained: its reward vanishes and the student starts at its reference, so every G-OPD
# advantage -(lS - lR) is exactly 0 and the student never moves (the five λ = 0 runs of the 2026-12-06 lab
# ended with the base's weights bit for bit). The sweep's λ = 0 point is the base, measured per seed.
TRAINED_LAMS = tuple(lam for lam in LAMS if lam != 0.0)
EXOPD_LAM = 1.25
# ExOPD's target with a uniform reference is pi_T^lam, renormalised: the teacher sampled at T = 1 / lam. The
# sharpening control samples the teacher there as well as at lower temperatures.
SHARPENING_TEMPERATURE = 1 / EXOPD_LAM
# OPD against TrOPD's forward-KL outlier treatment, with and without the guidance its ablation (d) tests.
# Mask and clip (and guidance on them) fed a table and no verdict; their runs went to the held-out samples the
# verdicts need (docs/lab.md: the 2026-12-06 run's table of all five).
MISMATCH_VARIANTS = ("opd", "tropd-fkl", "tropd-fkl+guidance")
# The single models every comparison is measured against, measured at each seed's evaluation seed so that a
# student and its teacher are compared seed by seed (stats.paired_difference): name -> (folder, domains).
SINGLE_MODELS = {
    "base-sums": ("models/base/final", ("sums",)), "base-programs": ("models/base/final", ("programs",)),
    "large-base-sums": ("models/large_base/final", ("sums",)),
    "mismatched-base-sums": ("models/mismatched_base/final", ("sums",)),
    "sums-teacher": ("teachers/sums/final", ("sums",)), "programs-teacher": ("teachers/programs/final", ("programs",)),
    "large-sums-teacher": ("teachers/large_sums/final", ("sums",)),
}
# The control's findings need the sums teacher at every temperature and seed; the report's sharpening check
# reads the bases at the lower temperatures from evaluation seed 0. The other single models are measured at
# T = 1 only (their lower temperatures filled table cells no verdict or check read).
CONTROL_EVERY_SEED = ("sums-teacher",)
CONTROL_SEED_ZERO = ("base-sums", "base-programs", "large-base-sums")
# Runs that fill a table cell and decide no finding (single-teacher SFT and ExPO, G-OPD Table 2's baselines)
# run at seed 0 only: the seeds go where verdicts need them (issue #16).
TABLE_ONLY_SEEDS = (0,)
# λ = 0.5 feeds one finding (0 < λ < 1 interpolates), whose interval's lower end was 5 to 9 points above 0 in
# the runs committed before 2026-12-07 (third): three seeds decided it, and the fourth's minute went to the
# comparisons still open.
INTERPOLATION_SEEDS = 3
# Six seeds decide every finding (docs/lab.md, "What six seeds would decide"; a full run of the fifteenth
# session: 0 inconclusive, every headline interval within ±3), and they do not fit the half hour (31.9
# minutes with the multi-teacher runs at six as well). Every run gets BASE_SEEDS; the runs whose comparisons
# four seeds left undecided (the run committed on 2026-12-07, third) get all of `Scale.seeds`, except the
# multi-teacher students: issue #16 allows two findings undecided, and of the open ones theirs (ExOPD against
# multi-teacher OPD and SFT, both headline-free) cost the most seeds (docs/lab.md, "Six seeds where four left
# a verdict open").
BASE_SEEDS = 4
EXTRA_SEED_RUNS = (
    "distillation/exopd-programs", "temperature/programs-teacher",  # ExOPD against its programs teacher
    "strong_to_weak/opd", "strong_to_weak/exopd", "strong_to_weak/exopd-reward-correction",  # both findings
    "mismatch/tropd-fkl", "mismatch/tropd-fkl+guidance",  # guidance
)


# The single models no verdict pairs with, which fill table cells and the teachers' gap over their bases
# (a mean): measured at evaluation seed 0 alone, so that six seeds of everything a verdict reads fit the
# half hour (issue #16).
TABLE_ONLY_MODELS = ("base-programs", "large-base-sums", "large-sums-teacher", "mismatched-base-sums")


def seeds_of(group: str, scale: Scale) -> range:
    """The seeds a run (a job's name without its seed) is trained or measured at: BASE_SEEDS, all of
    `scale.seeds` for EXTRA_SEED_RUNS, one for TABLE_ONLY_MODELS; the table-only students and merges are
    chosen in `experiment_jobs` (TABLE_ONLY_SEEDS)."""
    if group == "lam_sweep/lam0.5":
        return range(min(INTERPOLATION_SEEDS, scale.seeds))
    if group.removeprefix("temperature/") in TABLE_ONLY_MODELS:
        return range(min(1, scale.seeds))
    if group in EXTRA_SEED_RUNS:
        return range(scale.seeds)
    return range(min(BASE_SEEDS, scale.seeds))


EXPO_SETTINGS = {"single-sums": (["teachers/sums/final"], ("sums",)),
                 "single-programs": (["teachers/programs/final"], ("programs",)),
                 "multi": (["teachers/sums/final", "teachers/programs/final"], ("sums", "programs"))}


@dataclass(frozen=True, kw_only=True, slots=True)
class Scale:
    """Everything the full lab and `--quick` differ in."""

    small: ModelShape
    large: ModelShape
    pretrain_steps: int
    large_pretrain_steps: int
    mismatch_pretrain_steps: int
    pretrain_batch: int
    teacher_steps: int
    teacher_prompts: int  # prompts per grpo step (8 samples each)
    distill_steps: int
    mismatch_steps: int
    prompts_per_step: int
    samples_per_prompt: int
    lr: float  # the grpo teachers' (constant)
    student_lr: float  # the distilled students' peak: cosine-decayed to 0 over the run (`_student_optim`)
    train_problems: int  # training prompts per domain
    test_problems: int  # held-out problems per domain
    test_samples: int  # samples per held-out problem (avg@k)
    seeds: int
    expo_alpha: float = 0.25  # ExPO's extrapolation, matching lam 1.25 in spirit
    control_temperatures: tuple[float, ...] = (1.0, SHARPENING_TEMPERATURE, 0.7, 0.5)


FULL = Scale(small=ModelShape(hidden_size=128, num_layers=4), large=ModelShape(hidden_size=192, num_layers=6),
             pretrain_steps=300, large_pretrain_steps=300, mismatch_pretrain_steps=300, pretrain_batch=128,
             teacher_steps=20, teacher_prompts=16, distill_steps=60, mismatch_steps=40, prompts_per_step=32,
             samples_per_prompt=2, lr=1e-4, student_lr=2e-4, train_problems=1500, test_problems=200, test_samples=8,
             seeds=6)
QUICK = Scale(small=ModelShape(hidden_size=32, num_layers=1, num_heads=2),
              large=ModelShape(hidden_size=48, num_layers=1, num_heads=2),
              pretrain_steps=12, large_pretrain_steps=12, mismatch_pretrain_steps=8, pretrain_batch=16,
              teacher_steps=2, teacher_prompts=4, distill_steps=2, mismatch_steps=2, prompts_per_step=4,
              samples_per_prompt=2, lr=1e-4, student_lr=2e-4, train_problems=64, test_problems=8, test_samples=1,
              seeds=2)


@dataclass(frozen=True, kw_only=True, slots=True)
class Job:
    name: str  # unique; also the folder under the lab's output directory
    kind: str  # pretrain | train | merge | measure
    experiment: str  # which experiment's table it feeds ("models" for shared models)
    seed: int = 0
    pretrain: dict = field(default_factory=dict)  # kind pretrain: shape, settings, style
    config: dict = field(default_factory=dict)  # kind train: the opd config (paths relative to the lab root)
    merge: dict = field(default_factory=dict)  # kind merge: teachers, student, alpha
    model: str = ""  # kind measure: a model folder (relative); train/merge measure their own output
    measure_domains: tuple[str, ...] = ()
    temperatures: tuple[float, ...] = (1.0,)
    labels: dict = field(default_factory=dict)  # what the report groups by (method, lam, domain, ...)


def _pretrain_job(name: str, shape: ModelShape, steps: int, scale: Scale, style: Demonstrations,
                  domains: tuple[str, ...], seed: int) -> Job:
    return Job(name=name, kind="pretrain", experiment="models", seed=seed,
               pretrain={"shape": shape, "settings": PretrainSettings(steps=steps, batch_size=scale.pretrain_batch,
                                                                      domains=domains), "style": style})


def model_jobs(scale: Scale) -> list[Job]:
    return [
        _pretrain_job("models/base", scale.small, scale.pretrain_steps, scale, Demonstrations(), ("sums", "programs"), 1),
        _pretrain_job("models/large_base", scale.large, scale.large_pretrain_steps, scale, Demonstrations(),
                      ("sums", "programs"), 2),
        # A student that writes half its answers in another surface style (every symbol spaced): many of its
        # tokens are outliers under the teacher. (All answers spaced was tried: every objective, TrOPD's
        # included, collapsed to repeating one digit within 40 steps; docs/lab.md.)
        _pretrain_job("models/mismatched_base", scale.small, scale.mismatch_pretrain_steps, scale,
                      Demonstrations(spaced=0.5), ("sums",), 3),
    ]


def _student_optim(scale: Scale) -> dict:
    """Every distilled student's optimizer: a cosine decay from twice the teachers' rate to 0. With the
    teachers' constant rate OPD ended 1-2 points under its teacher and its seeds spread 1.7 points; decayed
    to 0 the last steps stop moving the weights, and OPD reached its teacher (docs/lab.md, "Students that
    settle": the pilot that chose it)."""
    return {"lr": scale.student_lr, "schedule": "warmup-cosine", "warmup_steps": 0, "min_lr_ratio": 0.0}


def _config(scale: Scale, *, student: str, teachers: list[dict], data: str, objective: dict, steps: int,
            seed: int, prompts_per_step: int | None = None, samples: int | None = None,
            optim: dict | None = None) -> dict:
    return {
        "student": {"path": student},
        "teachers": teachers,
        "data": {"path": data},
        "rollout": {"prompts_per_step": prompts_per_step or scale.prompts_per_step,
                    "samples_per_prompt": samples or scale.samples_per_prompt, "max_new_tokens": 48,
                    "batch_size": 256},
        "objective": objective,
        "optim": {**(optim or {"lr": scale.lr}), "micro_batch_size": 256},
        "train": {"steps": steps, "seed": seed, "save_every": 0, "progress": False},
    }


GRADER = {"sums": "math", "programs": "code"}


def teacher_jobs(scale: Scale) -> list[Job]:
    """Domain teachers: grpo from a base on one domain (binary reward from the domain's grader)."""
    jobs = []
    for name, base, domain in (("teachers/sums", "models/base/final", "sums"), ("teachers/programs", "models/base/final", "programs"),
                               ("teachers/large_sums", "models/large_base/final", "sums")):
        config = _config(scale, student=base, data=f"data/{domain}.jsonl", objective={"name": "grpo"},
                         teachers=[{"domain": domain, "path": None, "reference": None, "grader": GRADER[domain]}],
                         steps=scale.teacher_steps, seed=0, prompts_per_step=scale.teacher_prompts, samples=8)
        # Measured by the single-model jobs, at every seed's evaluation seed.
        jobs.append(Job(name=name, kind="train", experiment="models", config=config,
                        labels={"role": "teacher", "domain": domain}))
    return jobs


def merge_jobs(scale: Scale, only: tuple[str, ...] = EXPERIMENTS) -> list[Job]:
    """ExPO weight merges of the teachers (no training randomness), measured per seed like the teachers."""
    if "distillation" not in only:
        return []
    return [Job(name=f"models/expo-{setting}", kind="merge", experiment="models",
                merge={"teachers": teachers, "student": "models/base/final", "alpha": scale.expo_alpha})
            for setting, (teachers, _) in EXPO_SETTINGS.items()]


def _reference(lam: float | None) -> str | None:
    """G-OPD's reference for a student distilled at `lam` (None: SFT): the student's initial weights, except
    at lam = 1 (OPD), whose advantage lam * (lT - lR) - (lS - lR) = lT - lS has no lR: no reference forward."""
    return None if lam in (None, 1.0) else "student_init"


def _teacher(domain: str, path: str, *, reference: str | None) -> dict:
    return {"domain": domain, "path": path, "reference": reference}


def experiment_jobs(scale: Scale, only: tuple[str, ...] = EXPERIMENTS) -> list[Job]:
    """Every experiment's jobs at `scale.seeds` seeds (`opd lab --seeds` replaces the scale's count), and the
    single models every table and verdict is measured against, whatever `only` names."""
    jobs: list[Job] = []
    for experiment, make in (("lam_sweep", _lam_sweep_jobs), ("distillation", _distillation_jobs),
                             ("strong_to_weak", _strong_to_weak_jobs), ("mismatch", _mismatch_jobs)):
        if experiment in only:
            jobs += make(scale)
    return jobs + _single_model_jobs(scale)


def _distill(scale: Scale, name: str, experiment: str, seed: int, *, student: str = "models/base/final",
             teachers: list[dict], data: str, objective: dict, labels: dict, domains: tuple[str, ...],
             steps: int | None = None, temperatures: tuple[float, ...] = (1.0,)) -> list[Job]:
    """One distilled student's job at `seed`, or none where `seeds_of` leaves its run out at that seed."""
    if seed not in seeds_of(f"{experiment}/{name}", scale):
        return []
    config = _config(scale, student=student, teachers=teachers, data=data, objective=objective,
                     steps=steps or scale.distill_steps, seed=seed, optim=_student_optim(scale))
    return [Job(name=f"{experiment}/{name}/seed{seed}", kind="train", experiment=experiment, seed=seed,
                config=config, measure_domains=domains, temperatures=temperatures, labels={**labels, "seed": seed})]


def _lam_sweep_jobs(scale: Scale) -> list[Job]:
    """gopd from the base with the sums teacher; reference = the base, except at λ = 1."""
    jobs = []
    for lam in TRAINED_LAMS:
        for seed in range(scale.seeds):
            jobs += _distill(scale, f"lam{lam}", "lam_sweep", seed,
                             teachers=[_teacher("sums", "teachers/sums/final", reference=_reference(lam))],
                             data="data/sums.jsonl", objective={"name": "gopd", "lam": lam}, domains=("sums",),
                             labels={"lam": lam, "method": "OPD" if lam == 1 else f"G-OPD lam={lam}", "domain": "sums"},
                             # The OPD student at lower temperatures too, for the control's table (no verdict uses
                             # it, so one evaluation seed, like the table's other models).
                             temperatures=scale.control_temperatures if lam == 1 and seed == 0 else (1.0,))
    return jobs


def _distillation_jobs(scale: Scale) -> list[Job]:
    """G-OPD Table 2: single- and multi-teacher SFT, OPD and ExOPD, and the ExPO merges measured per seed."""
    jobs = []
    table_seeds = [seed for seed in range(scale.seeds) if seed in TABLE_ONLY_SEEDS]
    for seed in range(scale.seeds):
        if seed in table_seeds:
            jobs += _distill(scale, "sft-sums", "distillation", seed,
                             teachers=[_teacher("sums", "teachers/sums/final", reference=None)], data="data/sums.jsonl",
                             objective={"name": "sft"}, domains=("sums",),
                             labels={"method": "SFT", "setting": "single", "domain": "sums"})
        for method, lam in (("SFT", None), ("OPD", 1.0), ("ExOPD", EXOPD_LAM)):
            objective = {"name": "sft"} if lam is None else {"name": "gopd", "lam": lam}
            reference = _reference(lam)
            if method != "SFT" or seed in table_seeds:
                jobs += _distill(scale, f"{method.lower()}-programs", "distillation", seed,
                                 teachers=[_teacher("programs", "teachers/programs/final", reference=reference)],
                                 data="data/programs.jsonl", objective=objective, domains=("programs",),
                                 labels={"method": method, "setting": "single", "domain": "programs"})
            jobs += _distill(scale, f"{method.lower()}-multi", "distillation", seed,
                             teachers=[_teacher(d, f"teachers/{d}/final", reference=reference)
                                       for d in ("sums", "programs")],
                             data="data/mixed.jsonl", objective=objective, domains=("sums", "programs"),
                             labels={"method": method, "setting": "multi", "domain": "both"})
    for setting, (_, domains) in EXPO_SETTINGS.items():
        # One merged model, sampled with every seed's evaluation seed (the multi-teacher merge: a finding).
        for seed in seeds_of("distillation/expo-multi", scale) if setting == "multi" else table_seeds:
            jobs.append(Job(name=f"distillation/expo-{setting}/seed{seed}", kind="measure", experiment="distillation",
                            seed=seed, model=f"models/expo-{setting}/final", measure_domains=domains,
                            labels={"method": "ExPO", "setting": setting.split("-")[0], "seed": seed,
                                    "domain": domains[0] if len(domains) == 1 else "both"}))
    return jobs


def _strong_to_weak_jobs(scale: Scale) -> list[Job]:
    """The large teacher (its own base + grpo) into the small base: OPD, ExOPD, ExOPD with reward correction."""
    jobs = []
    for seed in range(scale.seeds):
        for method, lam, reference in (("OPD", 1.0, _reference(1.0)), ("ExOPD", EXOPD_LAM, _reference(EXOPD_LAM)),
                                       ("ExOPD + reward correction", EXOPD_LAM, "models/large_base/final")):
            slug = method.lower().replace(" + ", "-").replace(" ", "-")
            jobs += _distill(scale, slug, "strong_to_weak", seed,
                             teachers=[_teacher("sums", "teachers/large_sums/final", reference=reference)],
                             data="data/sums.jsonl", objective={"name": "gopd", "lam": lam}, domains=("sums",),
                             labels={"method": method, "domain": "sums"})
    return jobs


def _mismatch_jobs(scale: Scale) -> list[Job]:
    """A partly spaced-style student distilled from the sums teacher by each of MISMATCH_VARIANTS."""
    jobs = []
    for variant in MISMATCH_VARIANTS:
        name, _, guidance = variant.partition("+")
        objective = ({"name": "gopd", "lam": 1.0} if name == "opd"
                     else {"name": "tropd", "tropd": {"outlier": name.split("-")[1]}})
        if guidance:
            objective["guidance"] = {"enabled": True}
        for seed in range(scale.seeds):
            jobs += _distill(scale, variant, "mismatch", seed, student="models/mismatched_base/final",
                             teachers=[_teacher("sums", "teachers/sums/final", reference=None)],  # OPD and TrOPD: no lR
                             data="data/sums.jsonl", objective=objective, domains=("sums",), steps=scale.mismatch_steps,
                             labels={"method": variant, "domain": "sums"})
    return jobs


def _single_model_jobs(scale: Scale) -> list[Job]:
    """The single models, measured at each seed's evaluation seed; with the lower temperatures they are also
    the control no paper ran (sharpening by temperature alone), which compares the teacher at lower
    temperatures with the ExOPD students: at their seeds."""
    jobs = []
    control_seeds = seeds_of("lam_sweep/lam1.25", scale)
    for name, (model, domains) in SINGLE_MODELS.items():
        for seed in seeds_of(f"temperature/{name}", scale):
            lower = (name in CONTROL_EVERY_SEED and seed in control_seeds) or (name in CONTROL_SEED_ZERO and seed == 0)
            jobs.append(Job(name=f"temperature/{name}/seed{seed}", kind="measure", experiment="temperature",
                            seed=seed, model=model, measure_domains=domains,
                            temperatures=scale.control_temperatures if lower else (1.0,),
                            labels={"model": name, "seed": seed}))
    return jobs


def _reads(job: Job) -> list[str]:
    """The lab-relative model folders a job loads."""
    if job.kind == "train":
        paths = [job.config["student"]["path"]]
        for teacher in job.config["teachers"]:
            paths += [teacher.get(key) for key in ("path", "reference")]
        return [path for path in paths if path not in (None, "student_init")]
    if job.kind == "merge":
        return [job.merge["student"], *job.merge["teachers"]]
    return [job.model] if job.model else []


def dependencies(jobs: list[Job]) -> dict[str, tuple[str, ...]]:
    """For each job, the jobs that make the models it reads (a job's model is `<its name>/final`): a job may
    start once these have finished. Read from the configs, so a new experiment cannot forget one."""
    makers = {f"{job.name}/final": job.name for job in jobs}
    needs = {}
    for job in jobs:
        unknown = [path for path in _reads(job) if path not in makers]
        if unknown:
            raise ValueError(f"lab job {job.name} reads {unknown}, which no job of the lab makes")
        needs[job.name] = tuple(dict.fromkeys(makers[path] for path in _reads(job)))
    return needs
