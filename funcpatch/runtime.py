"""Per-call dispatch of node hooks: what makes the patched forward pure and thread-safe.

Hooks on a shared model are seen by every thread. So the hooks funcpatch registers
carry no state: each looks up the *current call* in a ``ContextVar`` (one per thread)
and passes values through untouched when there is none. Hooks and the per-head hook
flags are switched on while at least one call is running on a model (reference
counted under a lock) and removed when the last call leaves, also after an error.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
from torch import nn

_CURRENT: ContextVar[Optional["Visitor"]] = ContextVar("funcpatch_current_call", default=None)
_LOCK = threading.Lock()


class Visitor:
    """Receives each node module's output during one call; returns the value to use."""

    roles: Dict[nn.Module, object]

    def visit(self, role, output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _node_hook(module: nn.Module, _args, output):
    visitor = _CURRENT.get()
    if visitor is None:
        return None
    role = visitor.roles.get(module)
    if role is None:
        return None
    return visitor.visit(role, output)


@dataclass
class _Active:
    count: int
    restore: Callable[[], None]
    handles: Dict[nn.Module, object] = field(default_factory=dict)


_ACTIVE: Dict[int, _Active] = {}


def _release(key: int) -> None:
    entry = _ACTIVE[key]
    entry.count -= 1
    if entry.count == 0:
        del _ACTIVE[key]
        for h in entry.handles.values():
            h.remove()
        entry.restore()


@contextmanager
def activated(pm):
    """Make ``pm``'s node hooks live on its model; yields {module name: module}."""
    key = id(pm.model)
    with _LOCK:
        entry = _ACTIVE.get(key)
        if entry is None:
            restore = pm.backend.enable(pm.model, pm.hook_flags)
            entry = _ACTIVE[key] = _Active(0, restore)
        entry.count += 1
        try:
            modules = pm.backend.modules(pm.model, pm.node_module_names)
            for m in modules.values():
                if m not in entry.handles:
                    entry.handles[m] = m.register_forward_hook(_node_hook)
        except BaseException:
            _release(key)
            raise
    try:
        yield modules
    finally:
        with _LOCK:
            _release(key)


_MODEL_LOCKS: Dict[int, threading.RLock] = {}


@contextmanager
def serialized(pm):
    """Run one forward at a time on models whose forward keeps per-call state on its
    modules (TransformerBridge's per-head attention path does)."""
    if pm.backend.reentrant_forward:
        yield
        return
    with _LOCK:
        lock = _MODEL_LOCKS.setdefault(id(pm.model), threading.RLock())
    with lock:
        yield


@contextmanager
def visiting(visitor: Visitor):
    token = _CURRENT.set(visitor)
    try:
        yield
    finally:
        _CURRENT.reset(token)
