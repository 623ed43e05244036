"""Where metrics go: `metrics.jsonl` (always), TensorBoard (optional) and a rich progress bar.

On resume the JSONL file is cut back to the checkpoint's step, so a run that crashed after logging steps
it never checkpointed does not end up with two records for one step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

# The figures the progress bar shows, in order, with short labels; absent ones are skipped.
_PROGRESS_FIGURES = (
    ("teacher/kl_k1", "kl1"),
    ("teacher/kl_k3", "kl3"),
    ("student/entropy", "H"),
    ("student/entropy_given_tokens", "H given"),
    ("rollout/response_length", "len"),
    ("optim/grad_norm", "|g|"),
    ("optim/skipped_steps", "skipped"),
    ("perf/tokens_per_second", "tok/s"),
)


def progress_figures(values: dict[str, float]) -> str:
    """The bar's text: fixed figures, then the IS weights and each domain's implicit reward (mean/p99/max)."""
    parts = [f"{label} {values[key]:.4g}" for key, label in _PROGRESS_FIGURES if key in values]
    for key in sorted(values):
        if key.endswith("/is_weight_mean"):
            area = key.split("/")[0]
            parts.append(f"w {values[key]:.3g} (cut {values.get(f'{area}/is_truncated_fraction', 0.0):.2g})")
            break
    for key in sorted(values):
        if key.startswith("reward/") and key.endswith("/implicit_mean"):
            prefix = key.rsplit("/", 1)[0]
            domain = prefix.split("/", 1)[1]
            parts.append(f"r[{domain}] {values[key]:.3g}/{values.get(prefix + '/implicit_p99', 0.0):.3g}/"
                         f"{values.get(prefix + '/implicit_max', 0.0):.3g}")
    return "  ".join(parts)


class MetricsLogger:
    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int, tensorboard: bool, progress: bool):
        self.path = run_dir / "metrics.jsonl"
        _truncate_after(self.path, start_step)
        self._file = self.path.open("a", encoding="utf-8")
        self._tensorboard = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package: only when asked

            self._tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        self._progress = None
        if progress:
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
            self._progress.update(self._task, completed=step, figures=progress_figures(values))

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
