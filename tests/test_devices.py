"""GPU profiles: the committed keys keep their numbers, workspaces follow compute capability, custom cards."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import run_config
from membench.backends import create_backend
from membench.devices import (
    DEFAULT_CUBLAS_WORKSPACE,
    DEVICES,
    HOPPER_CUBLAS_WORKSPACE,
    MiB,
    cublas_workspace_bytes,
)
from membench.errors import ConfigError

# Committed results depend on these: (total_memory_bytes, runtime_overhead_bytes, measured).
FROZEN = {
    "h100-80gb": (85_520_809_984, 64 * MiB, True),
    "h200-141gb": (150_754_820_096, 64 * MiB, False),
    "gpu-80gb": (80 << 30, 2 * 8_519_680, False),
    "gpu-40gb": (40 << 30, 2 * 8_519_680, False),
    "gpu-24gb": (24 << 30, 2 * 8_519_680, False),
}
NEW = ("a100-40gb", "a100-80gb", "h100-pcie-80gb", "b200-180gb", "l40s-48gb", "l4-24gb", "a10g-24gb",
       "rtx4090-24gb", "rtx3090-24gb", "t4-16gb", "v100-16gb", "v100-32gb")


@pytest.mark.parametrize("key", sorted(FROZEN))
def test_existing_profiles_unchanged(key):
    profile = DEVICES[key]
    assert (profile.total_memory_bytes, profile.runtime_overhead_bytes, profile.measured) == FROZEN[key]


def test_new_profiles_are_derived_and_follow_compute_capability():
    assert set(NEW) <= set(DEVICES)
    for key in NEW:
        assert not DEVICES[key].measured
    assert DEVICES["a100-80gb"].runtime_overhead_bytes == 2 * 8_519_680
    assert DEVICES["h100-pcie-80gb"].runtime_overhead_bytes == 2 * 32 * MiB
    assert DEFAULT_CUBLAS_WORKSPACE == 8_519_680 and HOPPER_CUBLAS_WORKSPACE == 32 * MiB
    assert cublas_workspace_bytes("9.0", (2, 5)) == cublas_workspace_bytes("10.0", (2, 13)) == 32 * MiB
    assert cublas_workspace_bytes("10.0", (2, 6)) == cublas_workspace_bytes("8.9", (2, 13)) == 8_519_680


def test_custom_device():
    run = run_config("backend.name=simulate", "backend.device=custom", "backend.device_memory_gib=48",
                     "backend.compute_capability=9.0")
    backend = create_backend(run.backend)
    assert backend.profile.total_memory_bytes == 48 << 30
    assert backend.profile.runtime_overhead_bytes == 64 * MiB
    with pytest.raises(ConfigError, match="backend.device=custom needs the card's capacity.*device_memory_gib=None"):
        run_config("backend.name=simulate", "backend.device=custom")
    with pytest.raises(ConfigError, match="describe a custom card"):
        run_config("backend.device=h100-80gb", "backend.device_memory_gib=48")


def test_membench_devices_lists_every_profile():
    out = subprocess.run([sys.executable, "-c", "from membench.devices import main; main()"],
                         capture_output=True, text=True, check=True).stdout
    for key in DEVICES:
        assert f"`{key}`" in out
    assert "`custom`" in out
