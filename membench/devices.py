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
from importlib.metadata import PackageNotFoundError, version
from typing import Optional

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

    @property
    def usable_bytes(self) -> int:
        """What PyTorch's allocator may hold: the capacity less the CUDA context."""
        return self.total_memory_bytes - self.cuda_context_bytes


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




def torch_version() -> tuple[int, int]:
    """(major, minor) of the installed torch, read without importing it (config code stays torch-free)."""
    try:
        major, minor = version("torch").split(".")[:2]
        return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)
    except (PackageNotFoundError, ValueError):
        return (0, 0)


def cublas_workspace_bytes(compute_capability: str, torch: Optional[tuple[int, int]] = None) -> int:
    """PyTorch's default cuBLAS workspace per handle (``CublasHandlePool.cpp``, ``getDefaultWorkspaceSize``).

    32 MiB on Hopper (9.x); on 10.x and newer (Blackwell) also 32 MiB from torch 2.7, when the
    rule became ``major >= 9`` (before that only sm90 got it); 8,519,680 B (4096 KiB x 2 +
    16 KiB x 8) on everything older. See ../shared/ALLOCATOR.md.
    """
    major = int(str(compute_capability).split(".")[0])
    torch = torch_version() if torch is None else torch
    if major == 9 or (major >= 10 and torch >= (2, 7)):
        return HOPPER_CUBLAS_WORKSPACE
    return DEFAULT_CUBLAS_WORKSPACE


# Named cards. Capacity is what membench compares against: ``torch.cuda.get_device_properties().
# total_memory`` (the CUDA context, ``cuda_context_bytes``, comes off it; idle ``mem_get_info`` free
# is about total - context). Only the H100 was measured. For the others the figure is the total that
# public nvidia-smi listings of the card show, in MiB x 2**20 (measured=False): on the measured H100
# torch's total_memory equals nvidia-smi's total exactly, but on some cards and drivers (ECC on
# A100/V100, some clouds) torch reports a few hundred MiB less, so a derived profile can be up to
# about 1% optimistic. membench-gpucheck records the real figure (summary.json) to replace one.
#: (key, torch device name, nvidia-smi total MiB, compute capability)
CARDS = (
    ("a100-40gb", "NVIDIA A100-SXM4-40GB", 40_960, "8.0"),
    ("a100-80gb", "NVIDIA A100-SXM4-80GB", 81_920, "8.0"),
    ("h100-pcie-80gb", "NVIDIA H100 PCIe", 81_559, "9.0"),
    ("b200-180gb", "NVIDIA B200", 183_359, "10.0"),
    ("l40s-48gb", "NVIDIA L40S", 46_068, "8.9"),
    ("l4-24gb", "NVIDIA L4", 23_034, "8.9"),
    ("a10g-24gb", "NVIDIA A10G", 23_028, "8.6"),
    ("rtx4090-24gb", "NVIDIA GeForce RTX 4090", 24_564, "8.9"),
    ("rtx3090-24gb", "NVIDIA GeForce RTX 3090", 24_576, "8.6"),
    ("t4-16gb", "Tesla T4", 15_360, "7.5"),
    ("v100-16gb", "Tesla V100-SXM2-16GB", 16_160, "7.0"),
    ("v100-32gb", "Tesla V100-SXM2-32GB", 32_510, "7.0"),
)
#: Compute capability of every profile (the H100/H200 keys and the generic sizes included).
COMPUTE_CAPABILITY: dict[str, str] = {"h100-80gb": "9.0", "h200-141gb": "9.0", "gpu-80gb": "8.0",
                                      "gpu-40gb": "8.0", "gpu-24gb": "8.0"}


def card(key: str, name: str, total_mib: int, compute_capability: str) -> DeviceProfile:
    COMPUTE_CAPABILITY[key] = compute_capability
    return DeviceProfile(key=key, name=name, total_memory_bytes=total_mib * MiB,
                         runtime_overhead_bytes=TRAINING_THREADS * cublas_workspace_bytes(compute_capability),
                         measured=False)


DEVICES: dict[str, DeviceProfile] = {profile.key: profile for profile in (
    H100, H200, generic(80), generic(40), generic(24), *(card(*row) for row in CARDS))}

#: ``backend.device=custom``: capacity (``backend.device_memory_gib``) and compute capability from the command line.
CUSTOM = "custom"
CUSTOM_DEFAULT_COMPUTE_CAPABILITY = "8.0"  # as the generic sizes: pre-Hopper cuBLAS workspaces


def custom_device(memory_gib: Optional[float], compute_capability: Optional[str] = None) -> DeviceProfile:
    """A card given by its capacity in GiB (what torch's total_memory would say) and compute capability.

    Raises:
        ConfigError: no or a non-positive capacity, or a malformed compute capability.
    """
    from membench.errors import ConfigError

    if memory_gib is None or isinstance(memory_gib, bool) or not isinstance(memory_gib, (int, float)) or memory_gib <= 0:
        raise ConfigError(
            f"backend.device=custom needs the card's capacity: backend.device_memory_gib={memory_gib!r} must be a "
            "positive number of GiB (e.g. backend.device_memory_gib=79.6, what torch.cuda.get_device_properties()"
            ".total_memory / 2**30 reports); or pick a named card (membench-devices lists them)"
        )
    capability = str(compute_capability or CUSTOM_DEFAULT_COMPUTE_CAPABILITY)
    parts = capability.split(".")
    if len(parts) != 2 or not all(part.isdigit() for part in parts):
        raise ConfigError(f"backend.compute_capability={compute_capability!r} must be major.minor, e.g. 8.0, 8.9, 9.0")
    return DeviceProfile(key=CUSTOM, name=f"custom {memory_gib:g} GiB GPU (sm {capability})",
                         total_memory_bytes=int(memory_gib * (1 << 30)),
                         runtime_overhead_bytes=TRAINING_THREADS * cublas_workspace_bytes(capability), measured=False)


def device_profile(backend) -> DeviceProfile:
    """The profile ``backend`` (a BackendConfig) names: a key of DEVICES, or the custom card it describes."""
    if backend.device == CUSTOM:
        return custom_device(getattr(backend, "device_memory_gib", None), getattr(backend, "compute_capability", None))
    return DEVICES[backend.device]


def table() -> str:
    """The profiles as a Markdown table (``membench-devices``)."""
    rows = ["| backend.device | name | capacity (GiB) | capacity (bytes) | compute capability | cuBLAS workspaces | "
            "CUDA context | measured |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for profile in DEVICES.values():
        rows.append(f"| `{profile.key}` | {profile.name} | {profile.total_memory_bytes / (1 << 30):.1f} | "
                    f"{profile.total_memory_bytes:,} | {COMPUTE_CAPABILITY.get(profile.key, '?')} | "
                    f"{profile.runtime_overhead_bytes / MiB:.2f} MiB | {profile.cuda_context_bytes // MiB} MiB | "
                    f"{'yes' if profile.measured else 'no (derived)'} |")
    rows.append(f"| `custom` | `backend.device_memory_gib=<GiB> backend.compute_capability=<x.y>` | given | given | "
                f"given (default {CUSTOM_DEFAULT_COMPUTE_CAPABILITY}) | by capability | "
                f"{DEFAULT_CUDA_CONTEXT_BYTES // MiB} MiB | no |")
    return "\n".join(rows)


def main(argv: Optional[list[str]] = None) -> int:
    """``membench-devices``: list the GPU profiles ``backend.device`` accepts."""
    print(table())
    print(f"\ncuBLAS workspaces follow compute capability and torch {'.'.join(map(str, torch_version()))}; "
          "capacity is torch's total_memory (derived ones: public nvidia-smi totals).")
    return 0
