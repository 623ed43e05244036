"""LoRA students through `peft`, and the unwrapping the rest of opd needs to treat them like any model.

With adapters, the reference 'student_init' needs no second copy of the weights: it is the same model
with its adapters disabled (`AdaptersDisabled`), which is exactly the initial student because LoRA's B
matrices start at zero. Checkpoints hold the adapter; the final folder holds the merged model (an ordinary
HF folder) and, beside it, the adapter.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

from torch import nn


def attach_adapters(model: nn.Module, settings, adapter_path: str | None = None) -> nn.Module:
    """Wrap `model` in a trainable peft LoRA model (new adapters, or the ones saved at adapter_path)."""
    from peft import LoraConfig, PeftModel, get_peft_model  # the optional lora extra: imported when used

    if adapter_path is not None:
        return PeftModel.from_pretrained(model, adapter_path, is_trainable=True)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def is_adapted(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def causal_lm(model):
    """The underlying *ForCausalLM of a peft model (its LoRA layers stay in place), or the model itself."""
    if isinstance(model, AdaptersDisabled):
        model = model.model
    return model.get_base_model() if is_adapted(model) else model


class AdaptersDisabled:
    """The same LoRA model seen with its adapters off: the student's initial weights, for free."""

    def __init__(self, model):
        self.model = model

    @property
    def device(self):
        return causal_lm(self.model).device

    def scoring_context(self):
        return self.model.disable_adapter()


def scoring_context(model):
    return model.scoring_context() if isinstance(model, AdaptersDisabled) else contextlib.nullcontext()


def save_adapter(model, folder: Path) -> None:
    model.save_pretrained(str(folder))


def save_merged(model, folder: Path, state_dict: dict | None = None) -> None:
    """An ordinary HF folder with the adapters merged into the weights (the adapted model is unchanged)."""
    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(str(folder))
