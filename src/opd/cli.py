"""The `opd` command line: `opd train CONFIG [key=value ...] [--resume]`, `opd merge --expo ...`, `opd demo`."""

from __future__ import annotations

import argparse
import os
import sys

from opd.config import load_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="opd", description="On-policy distillation of language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    train_parser = commands.add_parser("train", help="train a student against its teachers")
    train_parser.add_argument("config", help="YAML config file (see configs/)")
    train_parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. objective.lam=1.25")
    train_parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")

    demo_parser = commands.add_parser("demo", help="build two tiny models and distill one into the other (CPU)")
    demo_parser.add_argument("--output-dir", default="runs/demo")
    demo_parser.add_argument("--steps", type=int, default=30)

    merge_parser = commands.add_parser("merge", help="merge model weights without training (ExPO)")
    merge_parser.add_argument("--expo", action="store_true", required=True,
                              help="theta = mean(teachers) + alpha * (mean(teachers) - student)")
    merge_parser.add_argument("--alpha", type=float, required=True, help="extrapolation strength (G-OPD: 0.25, 0.5)")
    merge_parser.add_argument("--teachers", nargs="+", required=True, help="teacher model folders")
    merge_parser.add_argument("--student", required=True, help="the student model folder")
    merge_parser.add_argument("--out", required=True, help="output folder")

    args = parser.parse_args(argv)
    try:
        run_command(args)
    except (ValueError, OSError) as error:
        # Configuration, data and start-up problems are ValueErrors with a message naming the key, file or
        # row; print that, not a traceback. OPD_TRACEBACK=1 shows the traceback too.
        if os.environ.get("OPD_TRACEBACK"):
            raise
        sys.exit(f"opd: {error}")


def run_command(args) -> None:
    if args.command == "train":
        from opd.train import train

        config = load_config(args.config, args.overrides)
        final = train(config, resume=args.resume)
        print(f"opd: trained student written to {final}")
    elif args.command == "merge":
        from opd.merge import expo_merge

        out = expo_merge(args.teachers, args.student, args.alpha, args.out)
        print(f"opd: ExPO merge (alpha={args.alpha}) of {len(args.teachers)} teacher(s) written to {out}")
    elif args.command == "demo":
        from opd.demo import run_demo

        final = run_demo(args.output_dir, steps=args.steps)
        print(f"opd: demo finished; student at {final}, metrics in {final.parent / 'metrics.jsonl'}")


if __name__ == "__main__":
    main()
