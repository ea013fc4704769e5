"""What accelerators this host has, found before jax is imported.

jax with libtpu installed (a test dependency, and what TPU VMs use) tries to start a TPU
backend on any machine and prints a block of libtpu errors where there is none. On a host
with no TPU, GPU or other accelerator device, ``JAX_PLATFORMS`` defaults to ``cpu`` so
every command starts quietly; a value the user set always wins. Only device files and
sysfs are read: no network, no jax.
"""

from __future__ import annotations

import glob
import os
from typing import MutableMapping

GOOGLE_PCI_VENDOR = "0x1ae0"  # Cloud TPU chips on the PCI bus
DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")  # NVIDIA, WSL2, AMD ROCm
TPU_ENV = ("TPU_ACCELERATOR_TYPE", "TPU_NAME", "TPU_WORKER_HOSTNAMES", "COLAB_TPU_ADDR")  # set by the TPU VM image


def has_accelerator(environ: MutableMapping[str, str] = os.environ) -> bool:
    if any(k in environ for k in TPU_ENV) or any(os.path.exists(p) for p in DEVICE_FILES) or glob.glob("/dev/accel*"):
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def default_to_cpu(environ: MutableMapping[str, str] = os.environ) -> None:
    """``JAX_PLATFORMS=cpu`` unless set, or an accelerator is present."""
    if "JAX_PLATFORMS" not in environ and not has_accelerator(environ):
        environ["JAX_PLATFORMS"] = "cpu"
