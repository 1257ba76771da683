"""The optimizer: the real optimizer code of torch, bitsandbytes or transformers, configured as users run it.

* ``adamw``: torch's AdamW, with the implementation stated rather than left to torch's defaults.
  torch picks foreach only for CUDA tensors, so leaving it implicit would give
  different temporaries on the simulate/cpu backends than on the GPU. foreach
  builds full-size temporaries across all trainable weights in the step, which
  is where full fine-tuning can peak; fused builds none.
* ``adamw_8bit`` / ``paged_adamw_8bit``: bitsandbytes' ``AdamW8bit`` / ``PagedAdamW8bit``, what
  transformers' Trainer builds for ``optim=adamw_bnb_8bit`` / ``paged_adamw_8bit``. On the tracked
  backends they are built through :func:`membench.compat.bitsandbytes_optimizer_as_on_cuda`, so their
  quantisation maps and paged state land where CUDA puts them.
* ``adafactor``: transformers' ``Adafactor`` with the settings Trainer passes for ``optim=adafactor``
  (``transformers/trainer_optimizer.py``, ``_get_adafactor``: ``scale_parameter=False,
  relative_step=False`` and the learning rate; ``beta1`` stays ``None``, so no first moment).
* ``sgd``: torch's SGD with ``train.momentum`` (one momentum buffer per trainable weight).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from membench.backends.base import Backend
from membench.config import MethodConfig, TrainConfig

IMPLEMENTATIONS = {"foreach": {"foreach": True}, "fused": {"fused": True}, "for_loop": {"foreach": False}}
#: train.optimizer -> the bitsandbytes.optim class.
BITSANDBYTES_CLASSES = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit"}


def build_optimizer(model: nn.Module, method: MethodConfig, train: TrainConfig,
                    backend: Optional[Backend] = None) -> torch.optim.Optimizer:
    """``train.optimizer`` over the trainable parameters; PEFT's LoRA-FA AdamW when asked for.

    Args:
        backend: Where the step runs; a tracked one (simulate, cpu) gets bitsandbytes' host and
            managed memory modelled. None: a real device.
    """
    if method.lorafa_optimizer:
        from peft.optimizers import create_lorafa_optimizer

        return create_lorafa_optimizer(model, r=method.rank, lora_alpha=method.alpha, lr=train.lr)
    params = [p for p in model.parameters() if p.requires_grad]
    if train.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=train.lr, **IMPLEMENTATIONS[train.optimizer_impl])
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, **IMPLEMENTATIONS[train.optimizer_impl])
    if train.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=train.lr, scale_parameter=False, relative_step=False)
    import bitsandbytes

    optimizer_class = getattr(bitsandbytes.optim, BITSANDBYTES_CLASSES[train.optimizer])
    off_device = backend.off_device() if backend is not None else None
    if off_device is None:
        return optimizer_class(params, lr=train.lr)
    from membench.compat import bitsandbytes_optimizer_as_on_cuda

    return bitsandbytes_optimizer_as_on_cuda(lambda: optimizer_class(params, lr=train.lr), backend.off_device)


#: Optimizers whose step replaces state an earlier step made (Adafactor: ``state["RMS"]``, a new 0-dim tensor
#: each step). One priming step (:meth:`membench.step.MeasuredLoop.prime_optimizer`) reaches the same allocated
#: bytes but not the same allocation order as real warm-up steps, which the reserved-memory replay
#: (:mod:`membench.reserved`) rebuilds from it; so these run their warm-up steps on every backend.
REPLACES_STATE_EACH_STEP = ("adafactor",)


def replaces_state_each_step(train: TrainConfig) -> bool:
    return train.optimizer in REPLACES_STATE_EACH_STEP


def paged_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state in CUDA managed memory (a paged bitsandbytes optimizer); 0 for other optimizers.

    The bytes bitsandbytes asks ``cudaMallocManaged`` for (``F.get_paged``: elements x element size), one
    allocation per buffer; the driver's page granularity is not modelled.
    """
    from membench.compat import paged_state_tensors

    tensors = paged_state_tensors(optimizer)
    if tensors is None:
        return 0
    return sum(tensor.untyped_storage().nbytes() for tensor in tensors)
