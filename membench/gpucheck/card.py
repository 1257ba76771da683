"""The idle card, read in a fresh process: ``python -m membench.gpucheck.card`` prints one JSON line.

* ``total_memory_bytes``: ``torch.cuda.get_device_properties().total_memory``, what membench's device
  profiles record as a card's capacity (``membench.devices``).
* ``mem_get_info_free_bytes`` / ``mem_get_info_total_bytes``: ``torch.cuda.mem_get_info()`` right after this
  process's CUDA context exists and before any tensor: the capacity a run can really use.
* ``cublas_workspace_bytes``: allocator bytes the first matmul of a thread adds beyond its output (the
  cuBLAS workspace PyTorch allocates through its caching allocator per handle, i.e. per thread);
  measured on this thread and on a second one, as a training step uses two (forward/optimizer and the
  autograd engine's). ``cublaslt_extra_bytes``: what a bf16 linear with bias adds after that (a
  separate cuBLASLt workspace, on torch versions that keep one).
"""

from __future__ import annotations

import json
import os
import threading

import torch

BLOCK = 512  # the caching allocator rounds every block up to 512 B


def rounded(tensor: torch.Tensor) -> int:
    return -(-tensor.untyped_storage().nbytes() // BLOCK) * BLOCK


def first_matmul_bytes(dtype: torch.dtype = torch.float32, bias: bool = False) -> int:
    """Allocator bytes a matmul on this thread adds beyond its inputs and output."""
    a = torch.randn(256, 256, device="cuda", dtype=dtype)
    b = torch.randn(256, 256, device="cuda", dtype=dtype)
    c = torch.randn(256, device="cuda", dtype=dtype) if bias else None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = torch.nn.functional.linear(a, b, c) if bias else a @ b
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() - before - rounded(out)


def main() -> None:
    properties = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info()
    main_thread = first_matmul_bytes()
    lt_extra = first_matmul_bytes(torch.bfloat16, bias=True)
    second: list[int] = []
    worker = threading.Thread(target=lambda: second.append(first_matmul_bytes()))
    worker.start()
    worker.join()
    print(json.dumps({
        "name": properties.name, "compute_capability": f"{properties.major}.{properties.minor}",
        "total_memory_bytes": properties.total_memory, "mem_get_info_free_bytes": free,
        "mem_get_info_total_bytes": total,
        "cublas_workspace_bytes": {"main_thread": main_thread, "second_thread": second[0] if second else None},
        "cublaslt_extra_bytes": lt_extra,
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "device_count": torch.cuda.device_count(),
    }))


if __name__ == "__main__":
    main()
