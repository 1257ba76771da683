"""Every place membench replaces, or reaches into, another package's internals.

membench runs the real model code and measures it, so it leans on details that
torch and transformers do not promise to keep. Each such detail is one entry
here, named for what it patches; its docstring says why membench needs it and
what it costs. Before use (each time a context manager is entered) an entry
checks that its target still exists with the signature membench expects, and
otherwise raises :class:`CompatError` naming the package, its installed
version and what membench needed: an upgrade that moves a target fails loudly
instead of silently measuring something else.

:func:`check_all` runs every check at once; ``python -m membench.compat``
prints the verdicts (a second's work before a GPU session; a test runs it).

One module per upstream package and concern; patches for other packages
(bitsandbytes, FSDP2) get their own module here and an entry in :data:`CHECKS`.

* ``torch_attention``: :func:`route_dropout_and_sdpa_like_cuda` swaps
  ``F.dropout`` and ``F.scaled_dot_product_attention``; :func:`safe_softmax`,
  :func:`cpu_flash_attention`, :func:`cpu_flash_attention_backward` and
  :func:`math_sdp_reduces_in_half_precision` are the private kernels the CUDA
  emulation (``membench.backends.cuda_semantics``) calls.
* ``torch_symbolic``: :func:`sympy_integer_divisions`, the classes torch writes
  symbolic integer divisions with (``membench.trace.periodic`` rewrites them), and
  :func:`memoized_symbolic_arithmetic`, which memoizes ``SymNode``'s size arithmetic while a
  trace records (one node per distinct operation instead of one per call), and
  :func:`dropout_keeps_its_input_like_cpp` (torch's Python decomposition of ``aten.dropout``
  clones its input for ``p == 0``; ATen returns it).
* ``torch_fake``: :func:`fast_fake_cache_keys` builds ``FakeTensorMode``'s dispatch-cache keys
  without its per-tensor metadata dataclass: the same key, value for value, in less time.
* ``torch_fake_views``: :func:`cheap_fake_views` makes the views of symbolic fake tensors that a
  recording makes most (cached view outputs, ``aten._unsafe_view``) with less size arithmetic:
  the same views and guards (a remembered reshape's sizes are its first call's ``SymInt`` objects).
* ``torch_norms``: :func:`route_layer_norm_and_softmax_like_cuda` swaps
  ``F.layer_norm`` and ``F.softmax``; :func:`layer_norm_forward` and
  :func:`layer_norm_backward` are the LayerNorm kernels the emulation calls.
* ``torch_memory``: :func:`storage_id` and :func:`when_storage_freed` (storage
  identity and lifetime), :func:`op_returns_alias` (an op's schema),
  :func:`global_module_forward_hooks`, :func:`checked_autograd_node_functions`
  (which autograd node backward is running), :func:`adamw_host_step_counters`,
  :func:`record_cuda_memory_history` (the allocator's private history API), and
  ``FakeTensorMode``, ``TorchDispatchMode``, ``OpOverload``: classes torch
  documents only under private module paths.
* ``bitsandbytes_params``: :func:`fake_quantized_parameter` (bitsandbytes'
  ``Params4bit`` / ``Int8Params`` as fake tensors, through ``FakeTensor``'s
  private constructor) and :func:`quantization_maps_off_meta` (its cached
  blockwise code table, kept off ``meta``).
* ``bitsandbytes_optim``: :func:`bitsandbytes_optimizer_as_on_cuda` builds an 8-bit optimizer on a
  tracked backend with its quantisation maps on the host and its paged state off the modelled device,
  as on CUDA; :func:`eight_bit_layout` reads the sizes that decide its state from bitsandbytes' source;
  :func:`paged_state_tensors` finds its managed-memory state.
* ``torch_distributed``: :func:`follow_storage_resizes` (wraps ``UntypedStorage.resize_``, which
  FSDP2 frees and re-allocates gathered parameters with), :func:`fake_process_group` (torch's fake
  process group, one rank of any world size in one process), :func:`fsdp2_api` (``fully_shard``
  and its policies, checked) and :func:`dtensor_metadata_unseen` (pauses the allocator model while
  DTensor derives output metadata on fake global-shape tensors).
* ``transformers_models``: :func:`no_packed_sequences` (the packed-sequence
  check) and :func:`enable_activation_checkpointing` (a renamed method).

bitsandbytes is imported only when an entry of its own is used or checked.

Hydra needs no entry: the sweeper uses only its public API.
"""

from __future__ import annotations

from typing import Any, Callable

from membench.compat._checks import CompatError, installed_version
from membench.compat.bitsandbytes_params import (
    check_fake_quantized_parameters,
    fake_quantized_parameter,
    quantization_maps_off_meta,
)
from membench.compat.bitsandbytes_optim import (
    EightBitLayout,
    bitsandbytes_optimizer_as_on_cuda,
    check_bitsandbytes_optimizers,
    eight_bit_layout,
    paged_state_tensors,
)
from membench.compat.torch_attention import (
    check_dropout_and_sdpa_routing,
    cpu_flash_attention,
    cpu_flash_attention_backward,
    math_sdp_reduces_in_half_precision,
    route_dropout_and_sdpa_like_cuda,
    safe_softmax,
)
from membench.compat.torch_memory import (
    FakeTensorMode,
    OpOverload,
    TorchDispatchMode,
    adamw_host_step_counters,
    check_adamw_step_counters,
    check_op_schema,
    check_storage_identity,
    checked_autograd_node_functions,
    checked_cuda_history_functions,
    checked_module_hook_registrars,
    global_module_forward_hooks,
    op_returns_alias,
    record_cuda_memory_history,
    storage_id,
    when_storage_freed,
)
from membench.compat.torch_distributed import (
    check_distributed,
    dtensor_metadata_unseen,
    fake_process_group,
    follow_storage_resizes,
    fsdp2_api,
)
from membench.compat.torch_fake import check_fake_cache_keys, fast_fake_cache_keys
from membench.compat.torch_fake_views import cheap_fake_views, check_fake_views
from membench.compat.torch_norms import (
    check_layer_norm_and_softmax_routing,
    layer_norm_backward,
    layer_norm_forward,
    route_layer_norm_and_softmax_like_cuda,
)
from membench.compat.torch_symbolic import (dropout_keeps_its_input_like_cpp, dropout_kernels, memoized_symbolic_arithmetic,
                                             symbolic_binary_operations, sympy_integer_divisions)
from membench.compat.transformers_models import (
    check_activation_checkpointing,
    checked_masking_utils,
    enable_activation_checkpointing,
    no_packed_sequences,
)

#: Entry -> the check that its target is as membench expects (raises CompatError if not).
CHECKS: dict[str, Callable[[], Any]] = {
    "route_dropout_and_sdpa_like_cuda": check_dropout_and_sdpa_routing,
    "route_layer_norm_and_softmax_like_cuda": check_layer_norm_and_softmax_routing,
    "no_packed_sequences": checked_masking_utils,
    "storage_id, when_storage_freed": check_storage_identity,
    "op_returns_alias": check_op_schema,
    "global_module_forward_hooks": checked_module_hook_registrars,
    "adamw_host_step_counters": check_adamw_step_counters,
    "enable_activation_checkpointing": check_activation_checkpointing,
    "record_cuda_memory_history": checked_cuda_history_functions,
    "checked_autograd_node_functions": checked_autograd_node_functions,
    "fake_quantized_parameter": check_fake_quantized_parameters,
    "quantization_maps_off_meta": quantization_maps_off_meta,
    "bitsandbytes_optimizer_as_on_cuda": check_bitsandbytes_optimizers,
    "follow_storage_resizes, fake_process_group, fsdp2_api, dtensor_metadata_unseen": check_distributed,
    "sympy_integer_divisions": sympy_integer_divisions,
    "memoized_symbolic_arithmetic": symbolic_binary_operations,
    "dropout_keeps_its_input_like_cpp": dropout_kernels,
    "fast_fake_cache_keys": check_fake_cache_keys,
    "cheap_fake_views": check_fake_views,
}


def check_all() -> list[str]:
    """Check every patch target; returns the entries checked, or raises one CompatError listing every failure."""
    failures = []
    for name, check in CHECKS.items():
        try:
            check()
        except CompatError as error:
            failures.append(f"{name}: {error}")
    if failures:
        raise CompatError(f"{len(failures)} of {len(CHECKS)} patch targets changed:\n" + "\n".join(failures))
    return list(CHECKS)


__all__ = [
    "CHECKS", "CompatError", "EightBitLayout", "FakeTensorMode", "bitsandbytes_optimizer_as_on_cuda", "cheap_fake_views",
    "eight_bit_layout", "fast_fake_cache_keys", "paged_state_tensors", "OpOverload", "TorchDispatchMode", "adamw_host_step_counters",
    "check_all", "checked_autograd_node_functions", "cpu_flash_attention", "cpu_flash_attention_backward", "enable_activation_checkpointing", "fake_quantized_parameter", "quantization_maps_off_meta",
    "dtensor_metadata_unseen", "fake_process_group", "follow_storage_resizes", "fsdp2_api",
    "global_module_forward_hooks", "installed_version", "layer_norm_backward", "layer_norm_forward",
    "math_sdp_reduces_in_half_precision", "memoized_symbolic_arithmetic", "dropout_keeps_its_input_like_cpp", "no_packed_sequences", "op_returns_alias", "record_cuda_memory_history",
    "route_dropout_and_sdpa_like_cuda", "route_layer_norm_and_softmax_like_cuda", "safe_softmax",
    "storage_id", "sympy_integer_divisions", "when_storage_freed",
]
