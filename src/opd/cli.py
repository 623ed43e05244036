"""The `opd` command line: `opd train CONFIG [key=value ...] [--resume]`, `opd demo`."""

from __future__ import annotations

import argparse
import sys

from opd.config import ConfigError, load_config


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

    args = parser.parse_args(argv)
    if args.command == "train":
        from opd.train import train

        try:
            config = load_config(args.config, args.overrides)
        except ConfigError as error:
            sys.exit(f"opd: {error}")
        final = train(config, resume=args.resume)
        print(f"opd: trained student written to {final}")
    elif args.command == "demo":
        from opd.demo import run_demo

        final = run_demo(args.output_dir, steps=args.steps)
        print(f"opd: demo finished; student at {final}, metrics in {final.parent / 'metrics.jsonl'}")


if __name__ == "__main__":
    main()
