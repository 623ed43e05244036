"""Offline benchmark evaluation (`opd eval`); the package is callable: `opd.evaluate(model_dir, ...)`
(evaluate/api.py)."""

from __future__ import annotations

import sys
import types


class _CallableModule(types.ModuleType):
    """`opd.evaluate(...)`: the package `opd.evaluate` is the name, so the package itself evaluates (a
    function of that name would be shadowed by the package once a submodule is imported)."""

    def __call__(self, *arguments, **options) -> dict:
        from opd.evaluate.api import evaluate_model  # on call: `import opd.evaluate.problem` stays light

        return evaluate_model(*arguments, **options)


sys.modules[__name__].__class__ = _CallableModule
