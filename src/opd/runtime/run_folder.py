"""The run folder's rules: which names opd writes there, and how each write survives a kill or a full disk.

Nothing in a run folder ever carries a final name while incomplete. A file is written beside its place
(`<name>.tmp`), fsynced and renamed over it; a folder is written as `.partial-<name>` and renamed into
place; a folder is deleted by renaming it to `.deleting-<name>` first. A kill -9 at any moment therefore
leaves either the old or the new version under the final name, plus leftovers with the two prefixes, which
`clean_leftovers` removes when the next segment starts. A full disk (ENOSPC, EDQUOT) while writing becomes
a `RunFolderError` naming the folder and the step, after the partial files are removed.

A folder holding files opd does not write is refused as an output_dir (`foreign_entries`), so opd never
writes over, or prunes beside, somebody else's files.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

PARTIAL = ".partial-"  # a folder being written; renamed to its name when complete
DELETING = ".deleting-"  # a folder being deleted; renamed away from its name first
TMP_SUFFIX = ".tmp"  # a file being written beside its place

# Every name opd writes directly in a run folder (train.py, checkpoint.py, monitor.py, evaluate_during_training,
# and `opd report`'s report.html).
# A LoRA student's model folders have their adapter beside them (`final_adapter`, `eval_model_adapter`).
RUN_FOLDER_NAMES = frozenset({
    "config.yaml", "metrics.jsonl", "samples.jsonl", "report.html", "tensorboard", "checkpoints", "final",
    "final_adapter", "eval", "eval_model", "eval_model_adapter",
    "wandb",  # W&B's own files (train.wandb, dir = the run folder)
    "served_weights",  # the student's weights for vLLM servers to reload (rollout.server.sync: folder)
})

# The config of every segment of a run: the first's `config.yaml`, each resumed one's beside it, named by
# the step it resumed from (a later resume never overwrites what an earlier segment trained with).
FIRST_CONFIG = "config.yaml"
_SEGMENT_CONFIG = re.compile(r"config\.resume-(\d+)\.yaml")

_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How libraries that do not raise OSError report it: safetensors / tokenizers (Rust), torch's writer.
_DISK_FULL_WORDS = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")


class RunFolderError(OSError):
    """A run folder that cannot be written (full disk) or must not be (foreign files); the message says which."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.errno = code  # ENOSPC / EDQUOT for a full disk

    def __str__(self) -> str:
        return self.args[0]


def segment_config_name(start_step: int) -> str:
    """The config file of the segment that resumed from `start_step` (0: the first segment's)."""
    return FIRST_CONFIG if start_step == 0 else f"config.resume-{start_step:06d}.yaml"


def segment_configs(run_dir: Path) -> list[Path]:
    """Every segment's config file in run_dir, oldest first."""
    resumed = sorted((int(m.group(1)), p) for p in run_dir.glob("config.resume-*.yaml")
                     if (m := _SEGMENT_CONFIG.fullmatch(p.name)))
    first = [run_dir / FIRST_CONFIG] if (run_dir / FIRST_CONFIG).is_file() else []
    return first + [path for _, path in resumed]


def _is_run_file(name: str) -> bool:
    return name in RUN_FOLDER_NAMES or _SEGMENT_CONFIG.fullmatch(name) is not None


def is_opd_name(name: str) -> bool:
    if _is_run_file(name):
        return True
    if name.startswith((PARTIAL, DELETING)):
        return name.removeprefix(PARTIAL).removeprefix(DELETING) in RUN_FOLDER_NAMES
    return name.endswith(TMP_SUFFIX) and _is_run_file(name.removesuffix(TMP_SUFFIX))


def foreign_entries(run_dir: Path) -> list[str]:
    """The names in run_dir that opd did not write there (sorted; none for a missing or empty folder)."""
    if not run_dir.is_dir():
        return []
    return sorted(entry.name for entry in run_dir.iterdir() if not is_opd_name(entry.name))


def check_output_folder(run_dir: Path, key: str = "train.output_dir") -> None:
    """Refuse an output folder that is a file, or that holds files opd did not write (naming a few)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"{key}: '{run_dir}' is a file, not a folder")
    foreign = foreign_entries(run_dir)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise RunFolderError(
            f"{key}: '{run_dir}' holds files opd did not write ({shown}); opd writes only into an empty or new "
            "folder or one of its own runs. Choose another output_dir (nothing was changed)"
        )


def clean_leftovers(run_dir: Path) -> None:
    """Remove what a killed segment left half-written or half-deleted in run_dir and run_dir/checkpoints."""
    for folder in (run_dir, run_dir / "checkpoints"):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.name.startswith((PARTIAL, DELETING)):
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            elif entry.name.endswith(TMP_SUFFIX) and _is_run_file(entry.name.removesuffix(TMP_SUFFIX)):
                entry.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    """Write `<path>.tmp`, fsync it, rename it over `path`: a kill leaves the old file or the new one."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        tmp.write_text(text, encoding="utf-8")
        fsync_file(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    fsync_folder(path.parent)


def replace_folder(new: Path, target: Path) -> None:
    """Rename the complete folder `new` to `target`; an existing `target` is renamed aside, then deleted."""
    aside = target.with_name(DELETING + target.name)
    if target.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(target, aside)
    os.replace(new, target)
    fsync_folder(target.parent)
    shutil.rmtree(aside, ignore_errors=True)


def remove_folder(folder: Path) -> None:
    """Delete `folder` so that no folder under its name is ever half-deleted: rename, then delete."""
    doomed = folder.with_name(DELETING + folder.name)
    os.replace(folder, doomed)
    fsync_folder(folder.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_folder(folder: Path) -> None:
    """Make renames inside `folder` durable (a rename is a change to the folder's own entries)."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fsync_file(path)


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC / EDQUOT anywhere in the exception's chain, or named in a library's message that hides it."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS:
            return True
        if any(word in str(current) for word in _DISK_FULL_WORDS):
            return True
        current = current.__cause__ or current.__context__
    return False


@contextlib.contextmanager
def writing(target: Path, step: int, *, partial: tuple[Path, ...] = ()) -> Iterator[None]:
    """Around the writes of `target` at `step`: any failure removes the `partial` paths; a full disk is
    re-raised as a RunFolderError naming the target and the step."""
    try:
        yield
    except BaseException as error:
        present = [path for path in partial if path.exists()]
        for path in present:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if isinstance(error, Exception) and is_disk_full(error):
            removed = f"; the partial {' and '.join(p.name for p in present)} was removed" if present else ""
            raise RunFolderError(f"{target}: no space left on the device while writing it at step {step}"
                                 f"{removed}. Free space (or point train.output_dir elsewhere) and rerun with "
                                 "--resume", errno.ENOSPC) from error
        raise
