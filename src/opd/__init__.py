"""opd: on-policy distillation of language models (G-OPD / ExOPD, TrOPD and their baselines).

The Python API (README "Python API"): `opd.load_config`, `opd.train`, `opd.evaluate` and `opd.functional`. They are looked
up lazily, so `import opd` stays light (no torch) until one is used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> (module, attribute; None = the module itself)
_API = {
    "load_config": ("opd.config", "load_config"),
    "train": ("opd.train", None),  # the module is callable: opd.train(config) (see train.py's end)
    "functional": ("opd.functional", None),
    "evaluate": ("opd.evaluate", None),  # the package is callable: opd.evaluate(model_dir, ...) (evaluate/api.py)
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'opd' has no attribute {name!r}")
    module_name, attribute = _API[name]
    module = importlib.import_module(module_name)
    return module if attribute is None else getattr(module, attribute)
