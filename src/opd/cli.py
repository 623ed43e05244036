"""The `opd` command line: `opd train CONFIG [key=value ...] [--resume]`, `opd merge --expo ...`, `opd report RUN_DIR`,
`opd lab`, `opd demo`."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

from opd.config import load_config

# The folder where `opd train --nproc N`'s workers leave their `opd:` message for the launcher.
ERROR_DIR_VARIABLE = "OPD_ERROR_DIR"


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    try:
        run_command(args)
    except (ValueError, OSError) as error:
        # Configuration, data and start-up problems are ValueErrors with a message naming the key, file or
        # row; print that, not a traceback. OPD_TRACEBACK=1 shows the traceback too.
        if os.environ.get("OPD_TRACEBACK"):
            raise
        report_user_error(error)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line; `opd train`'s dotted overrides may stand anywhere, before or after flags."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "train":
        # argparse ends a `nargs="*"` positional at the first flag, so `cfg.yaml --nproc 2 train.steps=3`
        # leaves the override unparsed: every leftover that reads key=value is an override, in order.
        overrides = [item for item in unknown if "=" in item and not item.startswith("-")]
        args.overrides = [*args.overrides, *overrides]
        unknown = [item for item in unknown if item not in overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opd", description="On-policy distillation of language models.")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_train, _add_lab, _add_demo, _add_merge, _add_eval, _add_serve, _add_report, _add_bench):
        add(commands)
    return parser


def _add_train(commands) -> None:
    train_parser = commands.add_parser("train", help="train a student against its teachers")
    train_parser.add_argument("config", help="YAML config file (see configs/)")
    train_parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. objective.lam=1.25")
    train_parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    train_parser.add_argument("--allow-config-change", action="store_true",
                              help="with --resume: accept keys that alter what is trained (objective, lam, lr, data, "
                                   "models, seeds...) differing from the run's recorded config; the new config is "
                                   "recorded as config.resume-<step>.yaml")
    train_parser.add_argument("--nproc", type=int, default=1,
                              help="processes on this machine (re-launches under torchrun; FSDP2 data parallel)")


def _add_lab(commands) -> None:
    lab_parser = commands.add_parser("lab", help="reproduce the papers' findings with tiny models on the CPU")
    lab_parser.add_argument("--quick", action="store_true",
                            help="the whole pipeline shrunk to about a minute on 2 idle cores (CI: checks the "
                                 "plumbing, not the findings)")
    lab_parser.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default 6; quick 2)")
    lab_parser.add_argument("--only", action="append", default=None, metavar="EXPERIMENT",
                            help="run only this experiment (repeatable): lam_sweep, distillation, strong_to_weak, "
                                 "mismatch, temperature")
    lab_parser.add_argument("--output", default=None, help="lab folder (default runs/lab or runs/lab-quick)")
    lab_parser.add_argument("--workers", type=int, default=None, help="worker processes (default: 2)")


def _add_demo(commands) -> None:
    demo_parser = commands.add_parser("demo", help="build two tiny models and distill one into the other (CPU)")
    demo_parser.add_argument("--output-dir", default="runs/demo")
    demo_parser.add_argument("--steps", type=int, default=None, help="OPD steps (default 40)")


def _add_merge(commands) -> None:
    merge_parser = commands.add_parser("merge", help="merge model weights without training (ExPO)")
    merge_parser.add_argument("--expo", action="store_true", required=True,
                              help="theta = mean(teachers) + alpha * (mean(teachers) - student)")
    merge_parser.add_argument("--alpha", type=float, required=True, help="extrapolation strength (G-OPD: 0.25, 0.5)")
    merge_parser.add_argument("--teachers", nargs="+", required=True, help="teacher model folders")
    merge_parser.add_argument("--student", required=True, help="the student model folder")
    merge_parser.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
    merge_parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")


def _add_eval(commands) -> None:
    eval_parser = commands.add_parser("eval", help="sample, grade and report benchmarks offline")
    eval_parser.add_argument("model", nargs="?", help="a local HF model folder (omit with --responses)")
    eval_parser.add_argument("--benchmarks",
                             default="gsm8k,math500,aime24,aime25,humaneval,mbpp,ifeval,mmlu_stem,arc_challenge",
                             help="comma-separated benchmarks to sample and grade (default: all of gsm8k, math500, "
                                  "aime24, aime25, humaneval, mbpp, ifeval, mmlu_stem, arc_challenge); each is read "
                                  "offline from its installed carrier package. A .jsonl or .parquet prompt file "
                                  "(training's data format) is a benchmark of your own, graded by --grader")
    eval_parser.add_argument("--benchmark", help="with --responses: the benchmark the responses answer (a name "
                                                 "or a prompt file)")
    eval_parser.add_argument("--grader", default=None, metavar="SPEC",
                             help="grade the benchmark files with your own grader: module:function or a name "
                                  "registered with opd.grading.custom.register_grader ((row, completion) -> "
                                  "reward in [0, 1]; correct when 1)")
    eval_parser.add_argument("--responses", help="grade these JSONL responses instead of sampling a model")
    eval_parser.add_argument("--samples", type=int, default=1, help="K samples per problem (avg@K, pass@K)")
    eval_parser.add_argument("--temperature", type=float, default=1.0,
                             help="sampling temperature; 0: greedy decoding (one sample per problem)")
    eval_parser.add_argument("--top-p", type=float, default=1.0)
    eval_parser.add_argument("--max-new-tokens", type=int, default=1024)
    eval_parser.add_argument("--chat-template-kwargs", default="{}", metavar="JSON",
                             help='variables for the model\'s chat template, e.g. \'{"enable_thinking": false}\'')
    eval_parser.add_argument("--limit", type=int, help="only the first M problems of each benchmark (M >= 1)")
    eval_parser.add_argument("--partial", action="store_true",
                             help="with --responses: grade a file that answers only some problems; the others "
                                  "count as wrong and the coverage is reported (without it, such a file is refused)")
    eval_parser.add_argument("--output-dir", default="runs/eval")
    eval_parser.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                             help="the sampler: the HF model itself, or a vLLM engine in this process (opd[vllm])")
    eval_parser.add_argument("--server", default=None, metavar="URL",
                             help="sample from a vLLM server serving MODEL (`opd serve MODEL`), e.g. http://127.0.0.1:8000")
    eval_parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="--backend vllm: the engine's KV cache")
    eval_parser.add_argument("--max-model-len", type=int, default=None,
                             help="--backend vllm: tokens per sequence (default: the model's max_position_embeddings)")


def _add_serve(commands) -> None:
    serve_parser = commands.add_parser("serve", help="start a vLLM server with what opd needs (README \"Layouts\")")
    serve_parser.add_argument("model", help="a local HF model folder")
    serve_parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: other hosts)")
    serve_parser.add_argument("--port", type=int, default=8000)
    serve_parser.add_argument("--max-model-len", type=int, default=4096,
                              help="tokens per sequence: at least a prompt, its response and one more")
    serve_parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV-cache memory (explicit, never a "
                                                                             "share of free memory)")
    serve_parser.add_argument("--max-logprobs", type=int, default=64, help="deepest top-k a teacher is asked for")
    serve_parser.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    serve_parser.add_argument("--chat-template", default=None, help="a chat template file (a teacher with its own)")
    serve_parser.add_argument("--cuda-graphs", action="store_true", help="capture CUDA graphs (GPU; slower start)")
    serve_parser.add_argument("--weight-transfer", choices=("nccl",), default=None,
                              help="take the student's weights over NCCL (rollout.server.sync: nccl; GPUs only)")


def _add_report(commands) -> None:
    report_parser = commands.add_parser(
        "report", help="write RUN_DIR/report.html: every metric's curve and the logged samples token by token",
        description="Write one self-contained HTML page (no network: inline plots, styles and script) from a run "
                    "folder's metrics.jsonl and samples.jsonl. The page is derived from those files: an existing "
                    "report.html is rewritten. It can be written while the run is still training.")
    report_parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (the config's train.output_dir)")
    report_parser.add_argument("--output", default=None, metavar="PATH",
                               help="where to write the page (default RUN_DIR/report.html; replaced if present)")


def _add_bench(commands) -> None:
    bench_parser = commands.add_parser("bench", help="speed and memory benchmarks, as ratios measured in one run")
    bench_parser.add_argument("name", choices=["memory", "overhead", "step", "rollout"])
    bench_parser.add_argument("--quick", action="store_true", help="reduced sizes (what CI runs)")
    bench_parser.add_argument("--output", help="also write the raw results as JSON to this file")
    bench_parser.add_argument("--tokens", type=int, nargs="+", help="memory: only these response-token counts")
    bench_parser.add_argument("--variants", help="step: only these comma-separated variants (default: all of trl, "
                                                 "opd, opd-vllm, opd-served, opd-async, opd-2proc, opd-colocated, "
                                                 "opd-padded, opd-packed, opd-consecutive, opd-grouped)")


def run_command(args) -> None:
    # Each command imports its own modules here: `opd --help` and a bad config answer without importing
    # torch or transformers, which take seconds.
    if args.command == "train":
        config = load_config(args.config, args.overrides)  # fail on a bad config before launching anything
        if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
            from opd.checks import check_process_count

            check_process_count(config, args.nproc)  # before any process starts: one line, not one per rank
            launch_torchrun(args)
            return
        from opd.runtime import distributed
        from opd.train import train

        distributed.init_from_environment()
        main_process, succeeded = distributed.is_main(), False
        try:
            final = train(config, resume=args.resume, allow_config_change=args.allow_config_change)
            succeeded = True
        finally:
            distributed.finish(succeeded)
        if main_process:
            print(f"opd: trained student written to {final}")
    elif args.command == "merge":
        from opd.merge import expo_merge

        out = expo_merge(args.teachers, args.student, args.alpha, args.out, overwrite=args.overwrite)
        print(f"opd: ExPO merge (alpha={args.alpha}) of {len(args.teachers)} teacher(s) written to {out}")
    elif args.command == "eval":
        run_eval(args)
    elif args.command == "serve":
        from opd.served.launch import ServeSettings, serve

        sys.exit(serve(ServeSettings(model=args.model, host=args.host, port=args.port,
                                     max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_gib,
                                     max_logprobs=args.max_logprobs, dtype=args.dtype,
                                     enforce_eager=not args.cuda_graphs, chat_template=args.chat_template,
                                     weight_transfer=args.weight_transfer)))
    elif args.command == "report":
        from opd.report import write_report

        print(f"opd: report written to {write_report(args.run_dir, args.output)}")
    elif args.command == "bench":
        run_bench(args.name, args.quick, args.output, args.tokens, args.variants)
    elif args.command == "lab":
        from opd.lab.plan import EXPERIMENTS
        from opd.lab.pipeline import run_lab

        output = args.output or ("runs/lab-quick" if args.quick else "runs/lab")
        report = run_lab(output, quick=args.quick, seeds=args.seeds, only=tuple(args.only or EXPERIMENTS),
                         workers=args.workers)
        print(f"opd: lab finished; report at {report} (results.json and plots beside it)")
    elif args.command == "demo":
        import dataclasses

        from opd.lab.demo import DemoScale, run_demo

        scale = DemoScale() if args.steps is None else dataclasses.replace(DemoScale(), distill_steps=args.steps)
        run_demo(args.output_dir, scale=scale)
        print(f"opd: demo finished; runs (metrics.jsonl, final/ student folders) under {args.output_dir}")


def run_bench(name: str, quick: bool, output: str | None, tokens: list[int] | None = None,
              variants: str | None = None) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", str(min(os.cpu_count() or 1, 16)))))
    if name == "memory":
        from opd.bench import memory

        sizes = memory.QUICK if quick else memory.FULL
        if tokens:
            sizes = tuple(size for size in sizes if size.tokens in tokens)
            if not sizes:
                raise ValueError(f"--tokens {tokens}: no such size; sizes: {[s.tokens for s in memory.FULL]}")
        raw = memory.benchmark(sizes)
        table = memory.format_table(raw)
    elif name == "overhead":
        from opd.bench import overhead

        raw = overhead.run(quick=quick)
        table = overhead.format_table(raw)
    elif name == "rollout":
        from opd.bench import rollout

        raw = rollout.run(quick=quick)
        table = rollout.format_table(raw)
    else:
        from opd.bench import step

        chosen = tuple(v.strip() for v in variants.split(",") if v.strip()) if variants else None
        raw = step.run(quick=quick, **({"variants": chosen} if chosen else {}))
        table = step.format_table(raw)
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}"
    print(f"opd bench {name}{' --quick' if quick else ''} ({machine})\n\n{table}")
    if output:
        with open(output, "w") as handle:
            json.dump({"benchmark": name, "quick": quick, "machine": machine, "results": raw}, handle, indent=2)


def launch_torchrun(args) -> None:
    """`opd train ... --nproc N` is `torchrun --nproc-per-node N -m opd train ...` on this machine.

    A user error inside a worker (a bad data row, a refused model...) reaches the user as one `opd:` line:
    each worker writes its message to a file in a folder named by OPD_ERROR_DIR and exits quietly, and the
    launcher prints the lowest rank's message once, instead of every rank's traceback and torchrun's."""
    from opd.runtime.distributed import LaunchFailed, launch_local

    module_args = (["opd", "train", args.config, *args.overrides] + (["--resume"] if args.resume else [])
                   + (["--allow-config-change"] if args.allow_config_change else []))
    with tempfile.TemporaryDirectory(prefix="opd-errors-") as folder:
        os.environ[ERROR_DIR_VARIABLE] = folder  # the workers inherit the launcher's environment
        try:
            launch_local(args.nproc, module_args)
        except LaunchFailed as failure:
            reports = sorted(Path(folder).glob("rank-*.txt"), key=lambda path: int(path.stem.split("-")[1]))
            if reports:
                sys.exit(reports[0].read_text(encoding="utf-8"))
            sys.exit(f"{failure}\nopd: a training process failed (its error is printed above)")
        finally:
            del os.environ[ERROR_DIR_VARIABLE]


def report_user_error(error: Exception) -> None:
    """Exit with the one `opd:` line; in a worker of `opd train --nproc N`, hand the line to the launcher."""
    text = str(error)
    # Messages that name their command ("opd eval --server URL: ...") would read "opd: opd eval ...".
    message = f"opd: {text[len('opd '):] if text.startswith('opd ') else text}"
    folder = os.environ.get(ERROR_DIR_VARIABLE)
    if folder and "LOCAL_RANK" in os.environ:
        rank = os.environ.get("RANK", os.environ["LOCAL_RANK"])
        Path(folder, f"rank-{rank}.txt").write_text(message, encoding="utf-8")
        sys.exit(1)
    sys.exit(message)


def run_eval(args) -> None:
    from opd.evaluate.run import EvalSettings, evaluate, format_table

    if (args.model is None) == (args.responses is None):
        raise ValueError("eval: give a MODEL folder or --responses FILE --benchmark NAME (one of the two)")
    if args.responses is not None and not args.benchmark:
        raise ValueError("opd eval --responses needs --benchmark NAME")
    if args.samples < 1 or not args.temperature >= 0:
        raise ValueError("eval: --samples must be >= 1 and --temperature >= 0 (0: greedy decoding)")
    if args.temperature == 0 and args.samples > 1:
        raise ValueError(f"eval: --temperature 0 decodes greedily, one completion per problem; --samples "
                         f"{args.samples} would be copies of it (pass@{args.samples} = pass@1): drop --samples, "
                         "or sample at a temperature > 0")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"eval: --limit must be a positive number of problems, got {args.limit}")
    if args.partial and args.responses is None:
        raise ValueError("eval: --partial applies only to --responses (a sampled evaluation answers every problem)")
    try:
        template_kwargs = json.loads(args.chat_template_kwargs)
    except json.JSONDecodeError as error:
        raise ValueError(f"eval: --chat-template-kwargs is not JSON ({error})") from None
    if not isinstance(template_kwargs, dict):
        raise ValueError(f"eval: --chat-template-kwargs must be a JSON object, got {args.chat_template_kwargs}")
    benchmarks = [args.benchmark] if args.responses else [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    settings = EvalSettings(samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens, limit=args.limit, chat_template_kwargs=template_kwargs)
    backend = None
    if args.responses is None:
        from opd.evaluate.sampling import EvalBackend

        if args.server is not None and args.backend != "hf":
            raise ValueError("eval: --server URL and --backend vllm exclude each other (the server samples)")
        backend = EvalBackend(name="server" if args.server else args.backend, server=args.server,
                              kv_cache_gib=args.kv_cache_gib, max_model_len=args.max_model_len)
    results = evaluate(benchmarks, settings, args.output_dir, model_dir=args.model, responses_path=args.responses,
                       partial=args.partial, backend=backend, grader=args.grader)
    print(format_table(results))
    print(f"opd: every sample with its grade and reason in {args.output_dir}/results.json")


if __name__ == "__main__":
    main()
