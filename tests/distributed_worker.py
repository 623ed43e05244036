"""Run by test_distributed.py under torchrun (or alone): two optimizer steps on fixed global batches.

Each process takes its contiguous share of every batch's rows, exactly as training does, with FSDP2
sharding active when there is more than one process. Rank 0 writes the final full state dict.
"""

import sys

import torch

from opd.runtime import distributed
from opd.assemble import assemble, seed_everything
from opd.config import load_config
from opd.assemble import StepSettings
from opd.train import TrainState, build_optimizer, train_step
from opd.types import select_rows


def main(config_path: str, batches_path: str, output_path: str) -> None:
    torch.set_num_threads(1)
    distributed.init_from_environment()
    seed_everything(0)
    config = load_config(config_path)
    run = assemble(config)
    distributed.shard_student(run.student)
    from torch.distributed.tensor import DTensor

    sharded = sum(isinstance(p, DTensor) for p in run.student.parameters())
    assert (sharded > 0) == (distributed.world_size() > 1), sharded
    state = TrainState(student=run.student, optimizer=build_optimizer(run.student, config.optim))
    settings = StepSettings(aggregation=config.objective.aggregation, micro_batch_size=config.optim.micro_batch_size,
                            temperature=1.0, chunk_size=5, max_grad_norm=config.optim.max_grad_norm)
    for batch, scores in torch.load(batches_path, weights_only=False):
        share = batch.num_rows // distributed.world_size()
        rows = slice(distributed.rank() * share, (distributed.rank() + 1) * share)
        metrics = train_step(state, select_rows(batch, rows), select_rows(scores, rows), run.objective, settings)
        assert metrics["optim/skipped_steps"].value == 0
    full = distributed.full_state_dict(run.student)
    if distributed.world_size() == 1:
        full = {k: v.detach().clone() for k, v in run.student.state_dict().items()}
    if distributed.is_main():
        torch.save({"state": full, "grad_norm": metrics["optim/grad_norm"].value}, output_path)
    distributed.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:4])
