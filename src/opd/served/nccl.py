"""The student's new weights to its vLLM servers over NCCL (`rollout.server.sync: nccl`), on GPUs.

vLLM's weight-transfer API does the transfer: a server started with `--weight-transfer-config
'{"backend": "nccl"}'` (`opd serve --weight-transfer nccl`) and `VLLM_SERVER_DEV_MODE=1` joins an NCCL group
with training rank 0 through `POST /init_weight_transfer_engine`; after every optimizer step rank 0 opens an
update (`/start_weight_update`), broadcasts every tensor while the server receives them (`/update_weights`),
and closes it (`/finish_weight_update`). No file is written and no copy of the state dict is held: the
tensors go one at a time, an FSDP2 shard gathered whole (`full_tensor`, a collective every rank joins in
the same order) only when its turn comes, a LoRA delta merged aside (rollout/vllm.py `policy_weights`).

Each server has a group of its own: rank 0 listens at `rollout.server.nccl_address` (host:port, reachable
from the servers) with the port raised by the server's index. The other training ranks are not in the groups;
they take part in the gathers only.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from opd.rollout.vllm import policy_weight_metadata, policy_weights
from opd.runtime import distributed
from opd.served.client import ServerClient


def weight_source(model: nn.Module, device: torch.device):
    """The training model as a vLLM `WeightSource`: its metadata without gathering, its tensors one by one.
    (The class is made here because vLLM is optional: imported only once sync nccl was chosen and checked,
    checks.check_nccl_sync.)"""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class PolicySource(WeightSource):
        def metadata(self) -> list[ParamMeta]:
            return [ParamMeta(name=name, dtype=dtype, shape=shape) for name, dtype, shape in policy_weight_metadata(model)]

        def __iter__(self) -> Iterator[tuple[str, Tensor]]:
            for name, tensor in policy_weights(model):
                yield name, tensor.to(device)

    return PolicySource()


def _address(nccl_address: str) -> tuple[str, int]:
    host, _, port = nccl_address.rpartition(":")
    return host, int(port)


class NcclTransfers:
    """One NCCL weight transfer per server, opened at the first sync; `send` after every optimizer step."""

    def __init__(self, clients: list[ServerClient], nccl_address: str, timeout_seconds: float):
        self.clients = clients
        self.host, self.port = _address(nccl_address)
        self.timeout_seconds = timeout_seconds
        self.engines: list | None = None

    def _open(self, model: nn.Module) -> list:
        from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine

        device = next(model.parameters()).device
        engines = []
        for index, client in enumerate(self.clients):
            # Only rank 0 is in the group; it needs the server's worker count (tensor x pipeline x data parallel).
            workers = client.request("GET", "/get_world_size")["world_size"] if distributed.is_main() else 0
            info = NCCLTrainerInitInfo(master_address=self.host, master_port=self.port + index, world_size=1 + workers,
                                       rank=distributed.rank())
            engines.append(NCCLTrainerWeightTransferEngine.trainer_init(
                info, client=HTTPVLLMWeightSyncClient(client.url, timeout=self.timeout_seconds),
                source=weight_source(model, device)))
        return engines

    def send(self, model: nn.Module) -> None:
        """Every server takes the model's current weights; every rank must call this, in step."""
        if self.engines is None:
            self.engines = self._open(model)
        for engine in self.engines:
            engine.send_weights()

    def close(self) -> None:
        for engine in self.engines or []:
            engine.shutdown()
        self.engines = None
