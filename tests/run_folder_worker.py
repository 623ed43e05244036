"""Run by test_run_folder.py: `opd train CONFIG [--resume]` in this process, killed with SIGKILL at one moment.

    python run_folder_worker.py CONFIG [--resume] [--kill-at POINT]

POINT is where the kill lands, each in the middle of a write:
  model-write:FOLDER  right after a model's weights are written into a folder whose name contains FOLDER
                      (its tokenizer not yet): `final` tears the final save, `step_000004` a checkpoint's
  prune               while a pruned checkpoint is being deleted (one of its files already gone)
  metrics-rewrite     after half of the rewritten metrics.jsonl was written
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import torch


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str) -> None:
    if point.startswith("model-write:"):
        import transformers.modeling_utils

        folder_part = point.split(":", 1)[1]
        original_save = transformers.modeling_utils.safe_save_file

        def save_file(tensors, filename, *args, **kwargs):
            original_save(tensors, filename, *args, **kwargs)
            if folder_part in Path(filename).parent.name or folder_part in Path(filename).parent.parent.name:
                kill()

        transformers.modeling_utils.safe_save_file = save_file
    elif point == "prune":
        original_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):
            path = Path(path)
            # A checkpoint folder (under any name but a partial one) on its way out: tear it, then die.
            if "step_" in path.name and not path.name.startswith(".partial-") and path.is_dir():
                (path / "optimizer.pt").unlink()
                kill()
            return original_rmtree(path, *args, **kwargs)

        shutil.rmtree = rmtree
    elif point == "metrics-rewrite":
        original_write_text = Path.write_text

        def write_text(self, text, *args, **kwargs):
            if self.name.startswith("metrics.jsonl"):
                with open(self, "w", encoding="utf-8") as handle:
                    handle.write(text[: len(text) // 2])
                    handle.flush()
                    os.fsync(handle.fileno())
                kill()
            return original_write_text(self, text, *args, **kwargs)

        Path.write_text = write_text
    else:
        raise SystemExit(f"unknown kill point {point!r}")


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)  # as in the tests' own process (conftest.py): bit-identical runs
    arguments = ["train", argv[0]]
    rest = argv[1:]
    if "--resume" in rest:
        arguments.append("--resume")
    if "--kill-at" in rest:
        install(rest[rest.index("--kill-at") + 1])
    from opd.cli import main as opd_main

    opd_main(arguments)


if __name__ == "__main__":
    main(sys.argv[1:])
