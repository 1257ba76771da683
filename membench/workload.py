"""Synthetic batches: random token ids shaped like the task's inputs."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from membench.config import ModelConfig, WorkloadConfig

FIRST_ORDINARY_TOKEN = 3  # ids 0-2 are pad/bos/eos in all families here; no padding means no masks


def make_batch(model: ModelConfig, config: PretrainedConfig, workload: WorkloadConfig) -> dict[str, torch.Tensor]:
    """Inputs and labels for one step, as CPU tensors (the backend moves them).

    No attention mask is passed: every token is real, so models take their
    unmasked (fastest, smallest) attention path, as packed fine-tuning data does.
    """
    generator = torch.Generator().manual_seed(workload.seed)

    def tokens(length: int) -> torch.Tensor:
        return torch.randint(FIRST_ORDINARY_TOKEN, config.vocab_size, (workload.batch_size, length), generator=generator)

    input_ids = tokens(workload.seq_len)
    if model.task == "sequence_classification":
        labels = torch.randint(0, config.num_labels, (workload.batch_size,), generator=generator)
    elif model.task == "seq2seq_lm":
        labels = tokens(workload.target_len or workload.seq_len)
    else:
        labels = input_ids
    return {"input_ids": input_ids, "labels": labels}
