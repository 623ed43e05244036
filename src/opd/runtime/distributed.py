"""Data parallelism and FSDP2 sharding: the only module that imports torch.distributed.

Launch with `torchrun --nproc-per-node N -m opd train CONFIG` (or `opd train CONFIG --nproc N`); multi-node
runs use torchrun's standard rendezvous flags. Each rank takes an equal, contiguous share of the step's
prompts (a prompt's samples stay on one rank, so GRPO groups are whole), generates and scores its rows,
and the token-mean denominator is all-reduced once per optimizer batch.

Sharding (`shard_student`): every decoder layer is an FSDP2 unit (`fully_shard`), so the bulk of the
weights, gradients and optimizer state is split across ranks. The embeddings and the output head stay
replicated: opd's chunked scorer multiplies hidden states by the head weight itself (it never calls the
head module), so the head must be a whole tensor on every rank; its gradient is all-reduced explicitly.
Gradients are summed, not averaged, across ranks: every rank's loss is already divided by the global
denominator, so the sum is the gradient of the whole batch's loss (the reduction FSDP does by default,
a mean, would divide it by the world size).

Teachers and references are replicated (each rank scores its own rows, no collectives).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

# The torch.distributed.fsdp / .tensor / .checkpoint imports stay inside the multi-process functions:
# torch builds without distributed support cannot import them, and one process never needs them.


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_environment() -> None:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR...); a no-op without it."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))


class LaunchFailed(Exception):
    """A process launched by `launch_local` failed; the message is torchrun's summary of which and how."""


def launch_local(nproc: int, module_args: list[str]) -> None:
    """`torchrun --standalone --nproc-per-node N -m MODULE ARGS...`, run from this process rather than as a
    `torchrun` command, so that a failed worker is an exception to handle (torchrun's command prints a
    traceback of its own) and torchrun's error log lines are held back: they are replayed only with the
    failure, and the caller decides whether the user sees them (not when a worker already said why)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    torch_logger = logging.getLogger("torch.distributed")  # torchrun's loggers are its children
    replaced = list(torch_logger.handlers)  # torch's own stderr handler: held's records print as it would
    held = _HoldErrors(replaced[0].formatter if replaced else None)
    for handler in replaced:
        torch_logger.removeHandler(handler)
    torch_logger.addHandler(held)
    try:
        run(parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", *module_args]))
    except ChildFailedError as error:
        raise LaunchFailed("\n".join([*held.lines, error.format_msg()])) from None
    finally:
        torch_logger.removeHandler(held)
        for handler in replaced:
            torch_logger.addHandler(handler)


class _HoldErrors(logging.Handler):
    """Prints torchrun's log records as torchrun would, except its reports on the worker processes (which
    one failed with what exit code, which ones it then stopped): those are held until the launcher knows
    whether a worker reported the reason itself."""

    def __init__(self, formatter: logging.Formatter | None):
        super().__init__()
        self.setFormatter(formatter)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.name.startswith("torch.distributed.elastic.multiprocessing"):
            self.lines.append(self.format(record))
        else:
            print(self.format(record), file=sys.stderr)


def finish(succeeded: bool) -> None:
    """Leave the process group cleanly. Without this, gloo's worker threads are still alive when the
    interpreter tears down, and a rank can die with `terminate called without an active exception` (SIGABRT)
    after its work is done, failing the whole torchrun. A rank that failed skips the barrier: the others
    may never reach it, and torchrun stops them anyway."""
    if is_distributed():
        if succeeded:
            dist.barrier()
        dist.destroy_process_group()


def shard_student(model: nn.Module) -> nn.Module:
    """FSDP2 on every decoder layer, with gradients summed across ranks (see the module docstring)."""
    if world_size() == 1:
        return model
    from torch.distributed.fsdp import fully_shard

    layers = getattr(model.base_model, "layers", None)
    if layers is None:
        raise NotImplementedError(f"{type(model).__name__}: no `layers` list to shard with FSDP2")
    for layer in layers:
        fully_shard(layer)
        layer.set_gradient_divide_factor(1.0)
        layer.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum
    return model


def shard_frozen(model: nn.Module) -> nn.Module:
    """FSDP2 over the decoder layers of a frozen model (teacher or reference). Every rank must then run
    the same number of forwards through it: see teachers.score_batch."""
    if world_size() == 1:
        return model
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.layers:
        fully_shard(layer)
    model.opd_sharded = True
    return model


def is_sharded_model(model) -> bool:
    return getattr(model, "opd_sharded", False)


def all_reduce_max(value: int) -> int:
    if world_size() == 1:
        return value
    tensor = torch.tensor([int(value)], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def all_reduce_sum(value: float) -> float:
    if world_size() == 1:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor.item())


def gather_objects(value) -> list:
    if world_size() == 1:
        return [value]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def _is_sharded(parameter) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(parameter, DTensor)


def synchronize_replicated_gradients(model: nn.Module) -> None:
    """All-reduce (sum) the gradients of the parameters FSDP does not own (embeddings, output head)."""
    if world_size() == 1:
        return
    for parameter in model.parameters():
        if parameter.grad is not None and not _is_sharded(parameter):
            dist.all_reduce(parameter.grad)


def clip_gradients(parameters: list, max_norm: float) -> torch.Tensor:
    """Global gradient norm over sharded and replicated parameters; scales gradients down to max_norm."""
    if world_size() == 1:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for parameter in parameters:
        if parameter.grad is None:
            continue
        if _is_sharded(parameter.grad):
            sharded += parameter.grad.to_local().double().pow(2).sum()
        else:
            replicated += parameter.grad.double().pow(2).sum()
    dist.all_reduce(sharded)  # each rank holds a different shard; replicated grads are equal everywhere
    total = torch.sqrt(sharded + replicated)
    if math.isfinite(total.item()) and max_norm < math.inf:
        scale = min(1.0, max_norm / (total.item() + 1e-6))
        if scale < 1.0:
            for parameter in parameters:
                if parameter.grad is not None:
                    parameter.grad.mul_(scale)
    return total.float()


def full_state_dict(model: nn.Module) -> dict | None:
    """The whole model's state dict on rank 0 (CPU), None elsewhere; every rank must call it."""
    if world_size() == 1:
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if is_main() else None


def full_optimizer_state(model: nn.Module, optimizer) -> dict | None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if is_main() else None


def load_full_optimizer_state(model: nn.Module, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
