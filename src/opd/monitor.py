"""Where metrics go: `metrics.jsonl` (always), TensorBoard (optional) and a rich progress bar.

On resume the JSONL file is cut back to the checkpoint's step, so a run that crashed after logging steps
it never checkpointed does not end up with two records for one step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# The figures the progress bar shows, in order, with short labels; absent ones are skipped.
_PROGRESS_FIGURES = (
    ("teacher/kl_k1", "kl"),
    ("loss", "loss"),
    ("rollout/response_length", "len"),
    ("optim/grad_norm", "|g|"),
    ("perf/tokens_per_second", "tok/s"),
)


class MetricsLogger:
    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int, tensorboard: bool, progress: bool):
        self.path = run_dir / "metrics.jsonl"
        _truncate_after(self.path, start_step)
        self._file = self.path.open("a", encoding="utf-8")
        self._tensorboard = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        self._progress = None
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]opd train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[figures]}"),
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, figures="")
            self._progress.start()

    def log(self, step: int, values: dict[str, float]) -> None:
        record = {"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            for name, value in values.items():
                self._tensorboard.add_scalar(name, value, step)
        if self._progress is not None:
            figures = "  ".join(f"{label} {values[key]:.4g}" for key, label in _PROGRESS_FIGURES if key in values)
            self._progress.update(self._task, completed=step, figures=figures)

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._progress is not None:
            self._progress.stop()


def _truncate_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
