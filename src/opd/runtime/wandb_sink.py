"""Weights & Biases as one more sink of the metrics logger: the config once, every step's metrics, samples.

Only rank 0 builds a logger, so only rank 0 talks to W&B. `wandb` is an optional extra, imported here only
when a run asks for it (checks.check_launch refuses a configured but missing package before any compute).
Absent values (null in metrics.jsonl) are left out of a step's W&B record rather than logged as a number.
"""

from __future__ import annotations

from typing import Any


class WandbSink:
    def __init__(self, *, project: str, name: str | None, mode: str, run_dir: str, config: dict[str, Any]):
        import wandb  # the optional extra: only when train.wandb is set

        self._wandb = wandb
        self._run = wandb.init(project=project, name=name, mode=mode, dir=run_dir, config=config,
                               settings=wandb.Settings(silent=True))

    def log(self, step: int, values: dict[str, float | None]) -> None:
        self._run.log({key: value for key, value in values.items() if value is not None}, step=step)

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Rows of one table (each a dict with the same keys), logged as `samples` at `step`."""
        columns = list(rows[0]) if rows else []
        table = self._wandb.Table(columns=columns, data=[[row[column] for column in columns] for row in rows])
        self._run.log({"samples": table}, step=step)

    def close(self) -> None:
        self._run.finish()
