"""Where metrics go: `metrics.jsonl` (always), TensorBoard (optional) and a rich progress bar; and where the
logged samples go: `samples.jsonl` and TensorBoard text.

On resume each JSONL file is cut back to the checkpoint's step, so a run that crashed after logging steps
it never checkpointed does not end up with two records for one step. The cut is an atomic rewrite
(`metrics.jsonl.tmp`, renamed over the file), and a torn last line (a kill in the middle of writing it) is
dropped with a note; an unreadable line anywhere else is an error naming the file and the line.

Every record holds the same keys: a value absent on a step (an eval metric between evaluations, a domain
with no rows in the step) is written as null. The logger keeps the running union of the keys seen, writes
null for each known key a step lacks, and, when a key first appeared after the file's first record, rewrites
the file once at close (atomically) so the earlier records carry it as null too.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from opd.runtime.run_folder import write_text_atomically, writing
from opd.runtime.wandb_sink import WandbSink

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
    """`progress`: on a terminal a rich bar; elsewhere (a log file, CI, nohup) one plain line every
    `log_every` steps and at the last, since a bar that redraws in place is unreadable in a file."""

    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int, tensorboard: bool, progress: bool,
                 log_every: int = 10, terminal: bool | None = None, wandb: WandbSink | None = None):
        self.path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        _truncate_after(self.path, start_step)
        # The running union of metric names, in first-seen order (a resumed segment starts from the file's).
        self._keys: dict[str, None] = {}
        if self.path.exists():
            for record in read_metrics(self.path):
                self._keys.update(dict.fromkeys(key for key in record if key != "step"))
        self._keys_grew = False
        self._last_step = start_step
        _truncate_after(self.samples_path, start_step)
        self._file = self.path.open("a", encoding="utf-8")
        self._samples_file = None  # opened by the first sample step
        self._wandb = wandb  # one more sink, built by the caller from train.wandb
        self._tensorboard = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package: only when asked

            self._tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        self._progress = None
        self._total_steps, self._log_every = total_steps, log_every
        terminal = sys.stdout.isatty() if terminal is None else terminal
        self._lines = progress and not terminal
        if progress and terminal:
            self._progress = Progress(
                TextColumn("[bold]opd train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                # Not markup: the figures hold labels such as r[math], which rich would read as a style tag.
                TextColumn("{task.fields[figures]}", markup=False),
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, figures="")
            self._progress.start()

    def log(self, step: int, values: dict[str, float]) -> None:
        new_keys = [key for key in values if key not in self._keys]
        self._keys_grew = self._keys_grew or (bool(new_keys) and bool(self._keys))
        self._keys.update(dict.fromkeys(new_keys))
        self._last_step = step
        record = {"step": step, **{key: _json_value(values.get(key)) for key in self._keys}}
        with writing(self.path, step):  # a full disk: the error names the file and the step
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._wandb is not None:
            self._wandb.log(step, values)
        if self._tensorboard is not None:
            for name, value in values.items():
                self._tensorboard.add_scalar(name, value, step)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, figures=progress_figures(values))
        if self._lines and (step % self._log_every == 0 or step == self._total_steps):
            print(f"opd train: step {step}/{self._total_steps}  {progress_figures(values)}", flush=True)

    def log_samples(self, step: int, records: list[dict]) -> None:
        """One line per sample (opd.samples.sample_record) to samples.jsonl, per domain one TensorBoard text
        entry, and a W&B table when W&B is on."""
        if self._samples_file is None:
            self._samples_file = self.samples_path.open("a", encoding="utf-8")
        with writing(self.samples_path, step):
            self._samples_file.write("".join(json.dumps(record) + "\n" for record in records))
            self._samples_file.flush()
        if self._tensorboard is not None:
            for domain in sorted({record["domain"] for record in records}):
                text = "\n\n".join(samples_markdown(r) for r in records if r["domain"] == domain)
                self._tensorboard.add_text(f"samples/{domain}", text, step)
        if self._wandb is not None:  # a table cell holds a scalar: the per-token list goes as JSON text
            self._wandb.log_samples(step, [{key: json.dumps(value) if isinstance(value, (list, dict)) else value
                                            for key, value in record.items()} for record in records])

    def close(self) -> None:
        self._file.close()
        if self._samples_file is not None:
            self._samples_file.close()
        if self._wandb is not None:
            self._wandb.close()
        if self._keys_grew:
            _fill_absent_keys(self.path, list(self._keys), self._last_step)
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._progress is not None:
            self._progress.stop()


def samples_markdown(record: dict) -> str:
    """A sample as TensorBoard's markdown: prompt, response, and a table of its tokens' values."""
    def cell(value) -> str:
        return "" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)

    names = ("lS", "lOld", "lT", "lR", "advantage", "trust_probability", "outlier", "from_teacher")
    rows = [f"| {json.dumps(token['text'])} | " + " | ".join(cell(token[name]) for name in names) + " |"
            for token in record["tokens"]]
    return "\n".join([
        f"**prompt** {json.dumps(record['prompt'])}", "", f"**response** {json.dumps(record['response'])}", "",
        "| token | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1), *rows,
    ])


class MetricsError(ValueError):
    pass


def _json_value(value: float | None) -> float | str | None:
    """None stays null (absent this step); nan and inf are written as strings, which JSON cannot hold."""
    if value is None:
        return None
    return value if math.isfinite(value) else str(value)


def _fill_absent_keys(path: Path, keys: list[str], step: int) -> None:
    """Rewrite the file so every record holds every key (null where absent), in one key order."""
    records = read_metrics(path)
    text = "".join(json.dumps({"step": record["step"], **{key: record.get(key) for key in keys}}) + "\n"
                   for record in records)
    with writing(path, step):
        write_text_atomically(path, text)


def _truncate_after(path: Path, step: int) -> None:
    """Keep the records up to `step` (the checkpoint's); rewritten atomically, and only if anything goes."""
    if not path.exists():
        return
    lines, torn, terminated = _parse_lines(path)
    if torn:
        print(f"opd: note: {path}: dropped a torn last line ({torn} bytes; a kill while it was being written)",
              file=sys.stderr)
    kept = [text for text, record in lines if record["step"] <= step]
    if torn or not terminated or len(kept) < len(lines):
        with writing(path, step):
            write_text_atomically(path, "".join(text + "\n" for text in kept))


def read_metrics(path: Path) -> list[dict]:
    """Every record of a metrics.jsonl (a torn last line, from a run killed while writing it, is left out)."""
    return [record for _, record in _parse_lines(Path(path))[0]]


def _parse_lines(path: Path) -> tuple[list[tuple[str, dict]], int, bool]:
    """(line text, record) for each record, the length of a torn last line (0 if none), and whether the
    file ends with a whole line (an append may follow).

    Only the last line can be torn, and only if unterminated: a kill stops the writer mid-line, and nothing
    is ever written after a torn line (the next segment rewrites the file first).
    """
    data = path.read_bytes()
    pieces = data.split(b"\n")
    whole, last = pieces[:-1], pieces[-1]  # `last` is b"" when the file ends with a newline
    parsed = []
    for number, piece in enumerate(whole, start=1):
        if not piece.strip():
            continue
        record = _parse(piece)
        if record is None:
            raise MetricsError(f"{path}: line {number} is not a metrics record ({piece[:60].decode('utf-8', 'replace')!r}); opd writes "
                               "whole lines only, so the file was changed by something else. Repair or remove "
                               "that line")
        parsed.append((piece.decode("utf-8"), record))
    if not last:
        return parsed, 0, True
    record = _parse(last)
    if record is None:
        return parsed, len(last), False
    parsed.append((last.decode("utf-8"), record))  # complete but unterminated: kept (and terminated)
    return parsed, 0, False


def _parse(piece: bytes) -> dict | None:
    try:
        record = json.loads(piece.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None
