"""The optimizer: AdamW, with the implementation stated rather than left to torch's defaults.

torch picks foreach only for CUDA tensors, so leaving it implicit would give
different temporaries on the simulate/cpu backends than on the GPU. foreach
builds full-size temporaries across all trainable weights in the step, which
is where full fine-tuning can peak; fused builds none.
"""

from __future__ import annotations

import torch
from torch import nn

from membench.config import MethodConfig, TrainConfig


def build_optimizer(model: nn.Module, method: MethodConfig, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; PEFT's LoRA-FA AdamW when asked for."""
    if method.lorafa_optimizer:
        from peft.optimizers import create_lorafa_optimizer

        return create_lorafa_optimizer(model, r=method.rank, lora_alpha=method.alpha, lr=train.lr)
    params = [p for p in model.parameters() if p.requires_grad]
    implementation = {
        "foreach": {"foreach": True},
        "fused": {"fused": True},
        "for_loop": {"foreach": False},
    }[train.optimizer_impl]
    return torch.optim.AdamW(params, lr=train.lr, **implementation)
