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
            it is the nominal size (the marketing GiB).
    """

    key: str
    name: str
    total_memory_bytes: int
    runtime_overhead_bytes: int
    measured: bool


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


def generic(gibibytes: int) -> DeviceProfile:
    """A nominal card of ``gibibytes`` GiB with pre-Hopper cuBLAS workspaces (budget planning)."""
    return DeviceProfile(
        key=f"gpu-{gibibytes}gb",
        name=f"generic {gibibytes} GiB GPU (Ampere-class)",
        total_memory_bytes=gibibytes * 1024 * MiB,
        runtime_overhead_bytes=TRAINING_THREADS * DEFAULT_CUBLAS_WORKSPACE,
        measured=False,
    )


DEVICES: dict[str, DeviceProfile] = {profile.key: profile for profile in (H100, generic(80), generic(40), generic(24))}
