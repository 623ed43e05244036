"""Model paths: a local folder, or a Hugging Face hub id (`Qwen/Qwen3-4B`) read from the local cache.

Every model path opd takes (the student, teachers, references, `opd eval`'s model, `opd merge`'s models)
goes through `local_model_folder`, once, before anything reads it. A path that is a folder is used as it is
(a folder named like a hub id wins over the cache). Anything else that looks like `org/name` is looked up
in the Hugging Face hub cache, offline (`local_files_only`: opd never reaches a hub), at the snapshot its
`refs/main` names; the cache folder is read from HF_HUB_CACHE, else HF_HOME/hub, else
XDG_CACHE_HOME/huggingface/hub, at each call (huggingface_hub reads it only once, at import). A hub id that
is not in that cache is an error naming the id and the cache folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

# `org/name` as the hub spells repository ids: one slash, each part starting with a letter or digit. A
# path starting with '.', '/' or '~', or with more parts, is a path, never an id.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def hub_cache_folder() -> Path:
    """The Hugging Face hub cache folder this process would use, from the environment as it is now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "huggingface" / "hub"


def is_hub_id(path: str) -> bool:
    return _HUB_ID.fullmatch(path) is not None


def local_model_folder(path: str, key: str) -> str:
    """The local folder of a model path (`key`: the config key or flag, for messages): the path itself when
    it is a folder, else the cached snapshot of the hub id it names. Never downloads."""
    if Path(path).is_dir() or not is_hub_id(path):
        return path  # a folder, or neither folder nor id: the folder checks name what is wrong with it
    cache = hub_cache_folder()
    try:
        return snapshot_download(path, cache_dir=str(cache), local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError) as error:
        raise FileNotFoundError(
            f"{key}: '{path}' is not a local folder, and as a Hugging Face hub id it is not in the local cache "
            f"{cache} ({type(error).__name__}). opd never downloads: run `hf download {path}` first, or point "
            "HF_HUB_CACHE (or HF_HOME) at the cache that holds it") from None
