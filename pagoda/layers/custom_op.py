"""Layers with a fused CUDA kernel and a pure-torch path (the CPU path and the reference):
the implementation is picked once, from the device of the first input it sees."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class DeviceDispatch(nn.Module):
    """Subclasses define forward_native and forward_cuda with the same signature, and may
    define forward_cpu (CPU tensors; default forward_native)."""

    def __init__(self) -> None:
        super().__init__()
        self._impl: Callable[..., Any] | None = None

    def forward(self, *args: Any) -> Any:
        if self._impl is None:
            tensor = next(a for a in args if isinstance(a, torch.Tensor))
            self._impl = self.forward_cuda if tensor.is_cuda else self.forward_cpu
        return self._impl(*args)

    def forward_native(self, *args: Any) -> Any:
        raise NotImplementedError

    def forward_cuda(self, *args: Any) -> Any:
        return self.forward_native(*args)

    def forward_cpu(self, *args: Any) -> Any:
        return self.forward_native(*args)
