"""Loading models and tokenizers from local Hugging Face folders, and rendering prompts to token ids.

Everything loads with `local_files_only=True`: opd never reaches a model hub at run time. A model path is a
local folder or a hub id already in the local Hugging Face cache (runtime/hub.py resolves it); anything else
is an error that says so (rather than a slow network timeout). A folder opd
cannot use (unreadable weights, weights that are not finite, no tokenizer) is a `ModelFolderError` naming
the config key and the folder, never a traceback from deep inside transformers.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as transformers_logging

from opd.runtime.hub import local_model_folder
from opd.runtime.lora import causal_lm

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Messages = list[dict[str, str]]

# A folder holds a tokenizer when it has one of these (save_pretrained writes tokenizer_config.json always).
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
# What transformers, safetensors and torch raise on a folder whose files cannot be read as a model.
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, EOFError, SafetensorError, pickle.UnpicklingError)


class ModelFolderError(ValueError):
    """A model folder that cannot be used, reported with the config key and the folder (or file)."""


def quiet_transformers() -> None:
    """Silence transformers' per-load progress bars and advice: opd draws its own progress."""
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


def check_model_folder(path: str, key: str) -> Path:
    """The model's local folder (a hub id resolved from the local cache), checked to hold a config.json."""
    folder = Path(local_model_folder(path, key))
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{key}: '{path}' is not a local folder. opd loads Hugging Face checkpoints from local folders, or "
            "hub ids ORG/NAME already in the local Hugging Face cache (download one first: `hf download ORG/NAME`)."
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{key}: '{path}' has no config.json; is it a save_pretrained folder?")
    return folder


def load_model(path: str, dtype: str = "float32", *, key: str = "model", trainable: bool = False) -> nn.Module:
    """A causal LM from a local folder, its weights checked finite; frozen and in eval mode unless trainable."""
    folder = check_model_folder(path, key)
    check_safetensors_files(folder, key)
    quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=DTYPES[dtype], local_files_only=True)
    except _LOAD_ERRORS as error:
        raise ModelFolderError(f"{key}: could not load the model in '{path}' ({type(error).__name__}: "
                               f"{_first_line(error)})") from error
    check_finite_weights(model, key, path)
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    # Dropout would make the training forward differ from the policy that sampled: OPD assumes they match.
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def check_safetensors_files(folder: Path, key: str) -> None:
    """Every .safetensors file opens (its header and size agree): a truncated download names its file."""
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise ModelFolderError(f"{key}: '{file}' is not a readable safetensors file ({_first_line(error)}); "
                                   "is it truncated or corrupt?") from None


def check_finite_weights(model: nn.Module, key: str, path: str) -> None:
    """One pass over the parameters: a nan or inf weight would train or score nothing but nan."""
    bad = [name for name, parameter in model.named_parameters()
           if parameter.device.type != "meta" and not bool(torch.isfinite(parameter).all())]
    _refuse_nonfinite(bad, key, path)


def check_finite_weight_files(path: str, key: str) -> None:
    """`check_finite_weights` for a folder another engine loads (vLLM), one tensor at a time from its files:
    the .safetensors files, or, in a folder without any, the `pytorch_model*.bin` files (which vLLM then
    loads instead, so a nan in a .bin-only checkpoint is refused too)."""
    folder = check_model_folder(path, key)
    check_safetensors_files(folder, key)
    bad = []
    safetensors = sorted(folder.glob("*.safetensors"))
    for file in safetensors:
        with safe_open(str(file), framework="pt") as weights:
            bad += [name for name in weights.keys() if not bool(torch.isfinite(weights.get_tensor(name)).all())]
    for file in [] if safetensors else sorted(folder.glob("pytorch_model*.bin")):
        bad += [name for name, tensor in _bin_state_dict(file, key).items() if not _finite(tensor)]
    _refuse_nonfinite(bad, key, path)


def _bin_state_dict(file: Path, key: str) -> dict:
    """A .bin checkpoint's tensors, memory-mapped; weights_only, so loading runs no pickled code."""
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
    except _LOAD_ERRORS as error:
        raise ModelFolderError(f"{key}: '{file}' is not a readable PyTorch weights file ({_first_line(error)}); "
                               "is it truncated or corrupt?") from None
    if not isinstance(state, dict):
        raise ModelFolderError(f"{key}: '{file}' holds a {type(state).__name__}, not a state dict of tensors")
    return state


def _finite(tensor) -> bool:
    # Integer buffers cannot hold nan; a non-tensor entry (none in a save_pretrained file) is not a weight.
    return not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())


def _refuse_nonfinite(bad: list[str], key: str, path: str) -> None:
    if bad:
        raise ModelFolderError(f"{key}: the model in '{path}' has non-finite (nan or inf) weights in {len(bad)} "
                               f"tensor(s), e.g. {bad[:3]}; opd neither trains from nor scores with such weights")


def load_tokenizer(path: str, *, key: str = "model", chat_template: str | None = None):
    """The folder's tokenizer; `chat_template` (Jinja text) replaces its template."""
    folder = check_model_folder(path, key)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelFolderError(f"{key}: '{path}' has no tokenizer (none of {list(TOKENIZER_FILES)}); save the "
                               "model's tokenizer into the folder (tokenizer.save_pretrained)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except _LOAD_ERRORS as error:
        raise ModelFolderError(f"{key}: could not load the tokenizer in '{path}' ({type(error).__name__}: "
                               f"{_first_line(error)})") from error
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{key}: tokenizer at '{path}' has neither a pad nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def read_chat_template(value: str, key: str) -> str:
    """A chat template setting as Jinja text: the text itself, or the contents of the file it names.

    A value without Jinja markup is a file name: one that does not exist is an error, never a template that
    renders the path string itself.
    """
    if "{{" in value or "{%" in value:
        return value
    path = Path(value)
    if not path.is_file():
        raise FileNotFoundError(f"{key}: no such file '{value}' (a value without '{{{{' or '{{%' is the path of a "
                                "Jinja template file)")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ModelFolderError(f"{key}: '{value}' is not UTF-8 text ({error.reason} at byte {error.start})") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def render_prompt(tokenizer, prompt: str | Messages, prompt_format: str, template_kwargs: dict | None = None) -> list[int]:
    """Token ids of a prompt, ready for the response to follow.

    chat: text becomes one user message; messages are rendered with the tokenizer's chat template and the
    generation prompt, `template_kwargs` given to the template as variables (Qwen3's enable_thinking). raw: text is tokenized as is (with the tokenizer's own special tokens, e.g. BOS).
    """
    if prompt_format == "raw":
        if not isinstance(prompt, str):
            raise ValueError("data.prompt_format=raw needs text prompts, got chat messages")
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat template; set data.prompt_format=raw to tokenize prompts as plain text"
        )
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **(template_kwargs or {}))
    # The template already wrote every special token it wants (BOS included): add none twice.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def end_of_sequence_ids(model: nn.Module, tokenizer) -> tuple[int, ...]:
    """Every id that ends a response: the tokenizer's EOS and the model's generation_config list."""
    ids = _end_ids(tokenizer, getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    if not ids:
        raise ValueError("the student has no end-of-sequence token (tokenizer.eos_token_id and generation_config)")
    return tuple(sorted(ids))


def folder_end_of_sequence_ids(path: str, tokenizer) -> tuple[int, ...]:
    """What end_of_sequence_ids will return for the model in `path`, read before its weights load: the
    tokenizer's EOS and the folder's generation_config.json list."""
    file = Path(path) / "generation_config.json"
    configured = json.loads(file.read_text()).get("eos_token_id") if file.is_file() else None
    return tuple(sorted(_end_ids(tokenizer, configured)))


def _end_ids(tokenizer, configured) -> set[int]:
    """The tokenizer's EOS id and a generation config's `eos_token_id` (an int or a list)."""
    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, Sequence):
        ids.update(int(i) for i in configured)
    return ids


def output_width(model: nn.Module) -> int:
    return int(causal_lm(model).get_output_embeddings().weight.shape[0])
