"""A range of GPU virtual addresses whose physical memory can be handed back and re-mapped.

A sleeping model must give its weights' and KV cache's memory back to the device, and a
waking one must get it back at the *same addresses*: its CUDA graphs baked those addresses
in, and re-capturing them costs most of a second on an 8B model. The CUDA driver's virtual
memory API does exactly this (reserve a range once; create, map and release physical memory
under it at will); it is called here through ctypes, so no compiled extension is needed.
Torch sees the range as an ordinary uint8 tensor (through `__cuda_array_interface__`).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from pagoda.logger import get_logger

logger = get_logger(__name__)

_ALLOCATION_PINNED = 1  # CU_MEM_ALLOCATION_TYPE_PINNED
_LOCATION_DEVICE = 1  # CU_MEM_LOCATION_TYPE_DEVICE
_GRANULARITY_RECOMMENDED = 1  # CU_MEM_ALLOC_GRANULARITY_RECOMMENDED
_ACCESS_READ_WRITE = 3  # CU_MEM_ACCESS_FLAGS_PROT_READWRITE


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [("compression_type", ctypes.c_ubyte), ("gpu_direct_rdma_capable", ctypes.c_ubyte),
                ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4)]


class _AllocationProp(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("requested_handle_types", ctypes.c_int),
                ("location", _Location), ("win32_handle_meta_data", ctypes.c_void_p),
                ("alloc_flags", _AllocFlags)]


class _AccessDesc(ctypes.Structure):
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


class DeviceArenaError(RuntimeError):
    """The driver refused a virtual-memory call."""


@functools.cache
def _driver() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


def _check(result: int, what: str) -> None:
    if result != 0:
        raise DeviceArenaError(f"{what} failed with CUDA driver error {result}")


def arenas_supported(device: torch.device) -> bool:
    """True on a CUDA device whose driver offers the virtual memory API."""
    return device.type == "cuda" and _driver() is not None \
        and hasattr(_driver(), "cuMemAddressReserve")


class _CudaArrayView:
    """Just enough of `__cuda_array_interface__` for torch.as_tensor to wrap raw memory."""

    def __init__(self, address: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1",
                                         "data": (address, False), "version": 3, "strides": None}


class DeviceArena:
    """`nbytes` of device memory at fixed addresses. `release()` returns the physical memory
    to the driver (contents are lost, the addresses stay reserved); `remap()` backs the same
    addresses with fresh memory. `tensor` is a uint8 view of the whole range, valid while
    mapped."""

    def __init__(self, nbytes: int, device: torch.device) -> None:
        torch.cuda.init()
        self.device_index = torch.cuda.current_device() if device.index is None else device.index
        self._cuda = _driver()
        self._prop = _AllocationProp(type=_ALLOCATION_PINNED,
                                     location=_Location(_LOCATION_DEVICE, self.device_index))
        granularity = ctypes.c_size_t()
        _check(self._cuda.cuMemGetAllocationGranularity(
            ctypes.byref(granularity), ctypes.byref(self._prop), _GRANULARITY_RECOMMENDED),
            "cuMemGetAllocationGranularity")
        self.nbytes = -(-max(nbytes, 1) // granularity.value) * granularity.value
        address = ctypes.c_uint64()
        _check(self._cuda.cuMemAddressReserve(ctypes.byref(address), ctypes.c_size_t(self.nbytes),
                                              ctypes.c_size_t(granularity.value),
                                              ctypes.c_uint64(0), ctypes.c_ulonglong(0)),
               "cuMemAddressReserve")
        self.address = address.value
        self._handle: ctypes.c_uint64 | None = None
        self.tensor: torch.Tensor | None = None
        try:
            self.remap()
        except BaseException:
            self.close()
            raise

    @property
    def mapped(self) -> bool:
        return self._handle is not None

    def remap(self) -> None:
        """Back the reserved addresses with physical memory (contents undefined)."""
        if self._handle is not None:
            return
        handle = ctypes.c_uint64()
        size = ctypes.c_size_t(self.nbytes)
        _check(self._cuda.cuMemCreate(ctypes.byref(handle), size, ctypes.byref(self._prop),
                                      ctypes.c_ulonglong(0)), "cuMemCreate")
        try:
            _check(self._cuda.cuMemMap(ctypes.c_uint64(self.address), size, ctypes.c_size_t(0),
                                       handle, ctypes.c_ulonglong(0)), "cuMemMap")
        except DeviceArenaError:
            self._cuda.cuMemRelease(handle)
            raise
        self._handle = handle
        access = _AccessDesc(_Location(_LOCATION_DEVICE, self.device_index), _ACCESS_READ_WRITE)
        _check(self._cuda.cuMemSetAccess(ctypes.c_uint64(self.address), size,
                                         ctypes.byref(access), ctypes.c_size_t(1)),
               "cuMemSetAccess")
        view = _CudaArrayView(self.address, self.nbytes)
        self.tensor = torch.as_tensor(view, device=torch.device("cuda", self.device_index))

    def release(self) -> None:
        """Give the physical memory back; the addresses stay reserved for remap()."""
        if self._handle is None:
            return
        torch.cuda.synchronize(self.device_index)  # no kernel may still use it
        self.tensor = None
        _check(self._cuda.cuMemUnmap(ctypes.c_uint64(self.address), ctypes.c_size_t(self.nbytes)),
               "cuMemUnmap")
        _check(self._cuda.cuMemRelease(self._handle), "cuMemRelease")
        self._handle = None

    def close(self) -> None:
        """Release the memory and the address range."""
        if self.address is None:
            return
        self.release()
        self._cuda.cuMemAddressFree(ctypes.c_uint64(self.address), ctypes.c_size_t(self.nbytes))
        self.address = None

    def view(self, offset: int, shape: torch.Size | tuple[int, ...],
             dtype: torch.dtype) -> torch.Tensor:
        """A tensor of `shape` and `dtype` at byte `offset` (which must suit the dtype)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        numel = 1
        for dim in shape:
            numel *= dim
        return self.tensor[offset:offset + numel * itemsize].view(dtype).view(shape)
