"""GPU utilisation over a whole (unprofiled) run from the driver's own samples, via NVML through ctypes.

NVML's "GPU utilization" is the percent of each sample period (1/6 s to 1 s) during which at least one kernel
ran: a coarse but undisturbed version of the profiler's union of kernel intervals. No pynvml needed.
"""

from __future__ import annotations

import ctypes
import os
import struct
import time
from typing import Optional

_GPU_UTILIZATION_SAMPLES = 1


class _Sample(ctypes.Structure):
    _fields_ = [("timestamp_us", ctypes.c_ulonglong), ("value", ctypes.c_ulonglong)]  # value: a union of 8 bytes


class NvmlUtilization:
    """Ask the driver, after the run, for the utilisation samples it took during the run."""

    def __init__(self) -> None:
        self._lib = ctypes.CDLL("libnvidia-ml.so.1")
        self._check(self._lib.nvmlInit_v2())
        self._handle = ctypes.c_void_p()
        bus_id = _torch_pci_bus_id()
        if bus_id is None or self._lib.nvmlDeviceGetHandleByPciBusId_v2(bus_id.encode(), ctypes.byref(self._handle)):
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
            index = int(visible) if visible.isdigit() else 0
            self._check(self._lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(self._handle)))
        self._start_us = 0

    @staticmethod
    def _check(rc: int) -> None:
        if rc != 0:
            raise RuntimeError(f"NVML call failed with status {rc}")

    def start(self) -> None:
        self._start_us = int(time.time() * 1e6)

    def stop(self, not_before_epoch_s: float = 0.0) -> Optional[float]:
        """Mean utilisation (%) of the samples taken since ``start`` (and ``not_before_epoch_s``), None if there are none."""
        first_us = max(self._start_us, int(not_before_epoch_s * 1e6))
        kind = ctypes.c_int()
        count = ctypes.c_uint(0)
        last = ctypes.c_ulonglong(self._start_us)
        rc = self._lib.nvmlDeviceGetSamples(self._handle, _GPU_UTILIZATION_SAMPLES, last, ctypes.byref(kind), ctypes.byref(count), None)
        if rc != 0 or count.value == 0:
            return None
        samples = (_Sample * count.value)()
        rc = self._lib.nvmlDeviceGetSamples(self._handle, _GPU_UTILIZATION_SAMPLES, last, ctypes.byref(kind), ctypes.byref(count), samples)
        if rc != 0:
            return None
        values = [_decode(kind.value, s.value) for s in samples[: count.value] if s.timestamp_us > first_us]
        return sum(values) / len(values) if values else None

    def close(self) -> None:
        self._lib.nvmlShutdown()


def _decode(kind: int, raw: int) -> float:
    """An nvmlValue_t union read as 8 raw bytes: 0 double, 1 uint, 5 int, 6 ushort, else the whole 64 bits."""
    if kind == 0:
        return struct.unpack("<d", struct.pack("<Q", raw))[0]
    if kind in (1, 5):
        return float(raw & 0xFFFFFFFF)
    if kind == 6:
        return float(raw & 0xFFFF)
    return float(raw)


def _torch_pci_bus_id() -> Optional[str]:
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    bus = getattr(props, "pci_bus_id", None)
    if bus is None:
        return None
    return f"{getattr(props, 'pci_domain_id', 0):08x}:{bus:02x}:{getattr(props, 'pci_device_id', 0):02x}.0"


def open_sampler(device: str) -> Optional[NvmlUtilization]:
    """An NVML sampler for the current CUDA device, or None (CPU run, no driver library, any NVML error)."""
    if not device.startswith("cuda"):
        return None
    try:
        return NvmlUtilization()
    except Exception:
        return None
