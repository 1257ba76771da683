"""What the analytic model returns: the named contributions and the predicted figures of one configuration."""

from __future__ import annotations

from dataclasses import dataclass

TERMS = (
    "embeddings", "norms", "attention", "position", "mlp", "dropout_masks", "linear_inputs",
    "adapter_inputs", "adapter_fp32_copies", "adapter_rank_intermediates", "autocast_weight_copies",
    "fp16_clamps", "checkpoint_inputs", "head", "loss",
)


@dataclass
class ActivationEstimate:
    """Predicted activation figures of one configuration.

    Attributes:
        saved_bytes: predicted ``metrics["saved_tensor_bytes"]``: unique storages
            autograd saves in the forward pass, parameters excluded, exact sizes.
        activation_bytes: predicted ``metrics["activation_bytes"]``: allocated after
            forward minus before. Every saved storage created during the forward,
            rounded up to the allocator's 512 B, plus the loss and whatever a
            checkpoint keeps alive for recomputation; minus saved tensors that
            existed before (the batch, buffers).
        terms: bytes per named contribution (see :data:`TERMS`); they sum to ``saved_bytes``.
        lora_fa_minimum_bytes: the physical minimum LoRA-FA must keep for this
            configuration (see :func:`lora_fa_minimum`), whatever the method run.
    """

    saved_bytes: int
    activation_bytes: int
    terms: dict[str, int]
    lora_fa_minimum_bytes: int
