"""How much memory each device has, asked without creating a CUDA context in the server
process (NVML through ctypes; `nvidia-smi` where the library cannot be opened)."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from dataclasses import dataclass

from pagoda.runner.memory import available_host_memory


@dataclass(frozen=True, slots=True)
class DeviceMemory:
    name: str  # "cpu" or "cuda:N"
    total_bytes: int
    free_bytes: int


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong),
                ("used", ctypes.c_ulonglong)]


def _nvml_gpus() -> list[DeviceMemory] | None:
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    if nvml.nvmlInit_v2() != 0:
        return None
    try:
        count = ctypes.c_uint()
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return None
        gpus = []
        for i in range(count.value):
            handle, memory = ctypes.c_void_p(), _NvmlMemory()
            if nvml.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(handle)) != 0 or \
                    nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) != 0:
                return None
            gpus.append(DeviceMemory(f"cuda:{i}", memory.total, memory.free))
        return gpus
    finally:
        nvml.nvmlShutdown()


def _smi_gpus() -> list[DeviceMemory]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total,memory.free",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for i, line in enumerate(out.strip().splitlines()):
        total, free = (int(x.strip()) << 20 for x in line.split(","))
        gpus.append(DeviceMemory(f"cuda:{i}", total, free))
    return gpus


def gpus() -> list[DeviceMemory]:
    """Every CUDA device's total and free memory, now."""
    found = _nvml_gpus()
    return found if found is not None else _smi_gpus()


def device_memory(name: str) -> DeviceMemory:
    """Memory of "cpu", "cuda" (the first GPU) or "cuda:N"."""
    if name == "cpu":
        available = available_host_memory()
        return DeviceMemory("cpu", available, available)
    index = int(name.partition(":")[2] or 0)
    found = gpus()
    if index >= len(found):
        from pagoda.errors import ConfigError
        raise ConfigError(f"device {name} not found ({len(found)} GPUs visible)")
    return found[index]


def default_device() -> str:
    """What `--device auto` resolves to, without importing torch."""
    return "cuda:0" if gpus() else "cpu"
