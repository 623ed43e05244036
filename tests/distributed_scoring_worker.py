"""Run by test_distributed.py under torchrun: score a fixed batch with FSDP2-sharded teachers, each rank
its own contiguous rows (unequal domain mixes, so ranks need idle forwards), and gather the scores."""

import sys

import torch

from opd.runtime import distributed
from opd.assemble import assemble
from opd.config import load_config
from opd.teachers import score_batch
from opd.types import select_rows


def main(config_path: str, batch_path: str, output_path: str) -> None:
    torch.set_num_threads(1)
    distributed.init_from_environment()
    run = assemble(load_config(config_path))
    assert all(s.teacher.sharded and distributed.is_sharded_model(s.teacher.model) for s in run.scorers.values())
    batch = torch.load(batch_path, weights_only=False)
    share = batch.num_rows // distributed.world_size()
    local = select_rows(batch, slice(distributed.rank() * share, (distributed.rank() + 1) * share))
    scores = score_batch(local, run.scorers, run.scoring)
    gathered = distributed.gather_objects((scores.logprobs, scores.ref_logprobs, scores.topk_ids))
    if distributed.is_main():
        torch.save([torch.cat(parts) for parts in zip(*gathered)], output_path)
    distributed.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:4])
