"""GPU profiles the simulate backend predicts for.

Each constant has a physical explanation and a source; nothing is fitted.

``runtime_overhead_bytes`` is device memory that the CUDA runtime takes through
PyTorch's caching allocator during a training step but that no model tensor
owns: cuBLAS keeps one workspace per (thread, stream) handle, and a training
step uses two threads (the Python thread runs forward and the optimizer, the
autograd engine's device thread runs backward). PyTorch's default workspace is
32 MiB on Hopper (sm90) and 4096 KiB x 2 + 16 KiB x 8 on older GPUs
(``CUBLAS_WORKSPACE_CONFIG``). The project's H100 reference measurements saw simulated bases
about 63 MB below the H100, which is the 2 x 32 MiB predicted here.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20
KiB = 1 << 10

# The CUDA context is neither in reserved memory nor free to tensors: on an idle card
# ``torch.cuda.mem_get_info()`` free is total_memory minus the context once torch has initialised
# CUDA. Public reports of H100/A100 processes with CUDA 12 lazy module loading (the default since
# CUDA 11.7) show about 500 MiB per process in nvidia-smi before any tensor is allocated (1 to 2 GiB
# with CUDA_MODULE_LOADING=EAGER). 512 MiB is the documented allowance: a round physical figure, not
# fitted; a GPU session can measure it as total_memory - mem_get_info()[0] right after CUDA init.
DEFAULT_CUDA_CONTEXT_BYTES = 512 * MiB


@dataclass(frozen=True)
class DeviceProfile:
    """A GPU to simulate.

    Attributes:
        key: Name used in ``backend.device``.
        name: What ``torch.cuda.get_device_name`` reports.
        total_memory_bytes: ``torch.cuda.get_device_properties().total_memory``;
            a predicted peak above it is recorded as status ``oom``.
        runtime_overhead_bytes: Allocator bytes held by cuBLAS workspaces.
        measured: True when the capacity was read off a real card; False when
            it is derived (the nominal size, or another tool's report of the card).
        cuda_context_bytes: Device memory the CUDA context (driver, module images,
            library handles) takes outside PyTorch's allocator; predicted OOM is
            ``peak reserved + cuda_context_bytes > total_memory_bytes``. Default:
            ``DEFAULT_CUDA_CONTEXT_BYTES`` (see there for the source).
    """

    key: str
    name: str
    total_memory_bytes: int
    runtime_overhead_bytes: int
    measured: bool
    cuda_context_bytes: int = DEFAULT_CUDA_CONTEXT_BYTES


HOPPER_CUBLAS_WORKSPACE = 32 * MiB
DEFAULT_CUBLAS_WORKSPACE = 4096 * KiB * 2 + 16 * KiB * 8
TRAINING_THREADS = 2  # forward/optimizer thread + autograd device thread

H100 = DeviceProfile(
    key="h100-80gb",
    name="NVIDIA H100 80GB HBM3",
    total_memory_bytes=85_520_809_984,  # 79.6 GiB, as torch reports it
    runtime_overhead_bytes=TRAINING_THREADS * HOPPER_CUBLAS_WORKSPACE,
    measured=True,
)


# Derived, not measured (no H200 has run membench yet; membench-gpucheck records the real figure
# in summary.json, ``device.total_memory_bytes``, so a later session can replace this one).
# The measured H100 capacity above is exactly nvidia-smi's total for that card, 81,559 MiB
# x 2**20 B: the driver and torch agree on the card's size there. Public nvidia-smi listings of
# the H200 (SXM, 141 GB HBM3e; driver 570) show 143,771 MiB total, and public NVML/inventory dumps
# give memoryTotal = 150,754,820,096 B, the same number in bytes. So: 143,771 MiB x 2**20 B.
# Caveat: some drivers/clouds leave driver-reserved memory out of what torch reports; a public
# torch print of an H200 reads total_memory=143156MB (615 MiB less), as public H100 prints read
# 81082-81090 MB against this project's 81,559 MiB. The H200 is sm90 (Hopper), so PyTorch gives it
# the same 32 MiB cuBLAS workspace per handle as the H100.
H200_NVIDIA_SMI_TOTAL_MIB = 143_771
H200 = DeviceProfile(
    key="h200-141gb",
    name="NVIDIA H200",
    total_memory_bytes=H200_NVIDIA_SMI_TOTAL_MIB * MiB,  # 150,754,820,096 B = 140.4 GiB
    runtime_overhead_bytes=TRAINING_THREADS * HOPPER_CUBLAS_WORKSPACE,
    measured=False,
)


def generic(gibibytes: int) -> DeviceProfile:
    """A nominal card of ``gibibytes`` GiB with pre-Hopper cuBLAS workspaces (budget planning)."""
    return DeviceProfile(
        key=f"gpu-{gibibytes}gb",
        name=f"generic {gibibytes} GiB GPU (Ampere-class)",
        total_memory_bytes=gibibytes * 1024 * MiB,
        runtime_overhead_bytes=TRAINING_THREADS * DEFAULT_CUBLAS_WORKSPACE,
        measured=False,
    )


DEVICES: dict[str, DeviceProfile] = {profile.key: profile for profile in (H100, H200, generic(80), generic(40), generic(24))}
