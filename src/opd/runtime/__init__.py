"""Infrastructure under the training step: model loading, LoRA, processes, checkpoints, logging, tiny models."""
