"""Per-thread scratch tensors for forwards that nothing records.

With glibc's default malloc, a large tensor freed at the end of a call goes back to the
operating system and the next call pays page faults to get it again; for the patched
forward's largest intermediates that cost more than their arithmetic (measured: 75 vs
50 ms per call on the benchmark workload). A forward that no autograd graph or
``torch.func`` transform records (its intermediates cannot outlive the call) writes them
into tensors kept per thread instead, reused by the next call that needs the same shape.
"""

from __future__ import annotations

import math
import threading

import torch

_LOCAL = threading.local()


def recording() -> bool:
    """Whether autograd or a torch.func transform may keep this forward's intermediates."""
    return torch.is_grad_enabled() or torch._C._are_functorch_transforms_active()


def scratch(slot: str, shape, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous ``shape`` tensor like ``like``, this thread's for
    ``slot`` on ``like``'s device: only one live use per slot and device at a time (the
    next request may return the same memory). A smaller request takes the front of the
    slot's memory (the last block of a narrowed forward, a smaller graph), so alternating
    sizes do not allocate again."""
    slots = getattr(_LOCAL, "slots", None)
    if slots is None:
        slots = _LOCAL.slots = {}
    key = (slot, like.device)  # a model over several devices uses a slot on each
    buf = slots.get(key)
    numel = math.prod(shape)
    if buf is None or buf.numel() < numel or buf.dtype != like.dtype:
        buf = slots[key] = like.new_empty(numel)
    return buf[:numel].view(shape)


def release() -> None:
    """Drop this thread's scratch tensors (the next no-grad forward allocates them again)."""
    _LOCAL.slots = {}
