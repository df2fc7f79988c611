"""Node patches: immutable descriptions of what to do to one activation.

A patch is a frozen, keyword-only dataclass. It never holds results: what
:class:`ProbePatch` and :class:`RecordPatch` observe comes back from
:func:`funcpatch.intervene` in its ``records`` dict. The tensor patches are pure
functions of the activation (``patch.op(x) -> new x``) that build their result out of
place, so they compose with ``torch.func.grad`` and ``torch.func.vmap`` (including
``vmap`` over ``value``).

``TensorSlice`` follows graphpatch: an ``int``, a ``slice``, an integer or bool
``Tensor``, or a list/tuple of these with one element per dimension (a list at the top
level is a per-dimension sequence exactly like a tuple; a list *inside* it selects
several rows of that dimension). ``None`` means the whole tensor. Example: for an
activation of shape ``[batch, pos, d_model]``, ``slice=(slice(None), [1, 3], 0)``
selects ``x[:, [1, 3], 0]`` (shape ``[batch, 2]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = [
    "TensorSlice",
    "TensorSliceElement",
    "Patch",
    "ZeroPatch",
    "AddPatch",
    "ReplacePatch",
    "CustomPatch",
    "ProbePatch",
    "RecordPatch",
    "PatchError",
]

TensorSliceElement = Union[int, slice, Tensor]
TensorSlice = Union[TensorSliceElement, Sequence["TensorSlice"]]
PatchValue = Union[Tensor, float, int, bool]


class PatchError(ValueError):
    """A patch that cannot apply: bad slice, value of the wrong shape, wrong target type."""


# ---------------------------------------------------------------------------- slices


def normalize_slice(s: Optional[TensorSlice]) -> Optional[tuple]:
    """Turn a ``TensorSlice`` into a tuple usable as ``x[t]``; ``None`` stays ``None``.

    Raises ``PatchError`` for anything that is not a valid ``TensorSlice`` (floats,
    bools, ``None``/``Ellipsis`` elements, non-positive slice steps, float tensors).
    """
    if s is None:
        return None
    elems = tuple(s) if isinstance(s, (list, tuple)) else (s,)
    out = []
    for i, e in enumerate(elems):
        where = f"slice element {i} ({e!r})"
        if isinstance(e, bool):
            raise PatchError(f"{where}: bools are not valid indices; use an int, slice, list or tensor")
        if isinstance(e, int):
            out.append(e)
        elif isinstance(e, slice):
            for part in (e.start, e.stop, e.step):
                if part is not None and (isinstance(part, bool) or not isinstance(part, int)):
                    raise PatchError(f"{where}: slice bounds must be ints or None")
            if e.step is not None and e.step <= 0:
                raise PatchError(f"{where}: slice step must be positive (torch has no negative steps)")
            out.append(e)
        elif isinstance(e, Tensor):
            if e.dtype != torch.bool and (e.dtype.is_floating_point or e.dtype.is_complex):
                raise PatchError(f"{where}: index tensors must be integer or bool, got {e.dtype}")
            out.append(e)
        elif isinstance(e, (list, tuple)):
            try:
                t = torch.tensor(e, dtype=torch.long) if len(e) else torch.zeros(0, dtype=torch.long)
            except (TypeError, ValueError) as err:
                raise PatchError(f"{where}: a sub-sequence must hold ints ({err})") from None
            if any(isinstance(v, bool) for v in _flatten_list(e)):
                raise PatchError(f"{where}: bools are not valid indices")
            out.append(t)
        else:
            raise PatchError(
                f"{where}: expected int, slice, Tensor or list/tuple of ints, got {type(e).__name__}"
            )
    return tuple(out)


def _flatten_list(e):
    for v in e:
        if isinstance(v, (list, tuple)):
            yield from _flatten_list(v)
        else:
            yield v


def _selection(x: Tensor, sl: tuple, where: str) -> Tensor:
    """Flat indices of ``x[sl]``, shaped like ``x[sl]`` (any indexing semantics torch has)."""
    dims = sum(e.ndim if isinstance(e, Tensor) and e.dtype == torch.bool else 1 for e in sl)
    if dims > x.ndim:
        raise PatchError(
            f"slice {_fmt(sl)} at {where} has {dims} elements but the target has "
            f"{x.ndim} dims (shape {list(x.shape)})"
        )
    d = 0
    for e in sl:
        size = x.shape[d]
        problem = None
        if isinstance(e, slice) and size > 0 and len(range(*e.indices(size))) == 0:
            problem = f"{e} selects nothing"
        elif isinstance(e, int) and not -size <= e < size:
            problem = f"index {e} is out of range"
        elif isinstance(e, Tensor) and e.dtype != torch.bool and e.numel():
            lo, hi = int(e.min()), int(e.max())
            if lo < -size or hi >= size:
                problem = f"indices {e.tolist()} are out of range"
        if problem:
            raise PatchError(
                f"slice {_fmt(sl)} at {where}: {problem} on dim {d} of size {size} "
                f"(shape {list(x.shape)})"
            )
        d += e.ndim if isinstance(e, Tensor) and e.dtype == torch.bool else 1
    flat = torch.arange(math.prod(x.shape), device=x.device).reshape(x.shape)
    sl = tuple(e.to(x.device) if isinstance(e, Tensor) else e for e in sl)
    try:
        return flat[sl]
    except IndexError as err:
        raise PatchError(
            f"slice {_fmt(sl)} does not fit the target at {where} (shape {list(x.shape)}): {err}"
        ) from None


def _fmt(sl: tuple) -> str:
    parts = [f"tensor({e.tolist()})" if isinstance(e, Tensor) else repr(e) for e in sl]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def _as_value(value: PatchValue, x: Tensor, shape: torch.Size, where: str, kind: str) -> Tensor:
    """``value`` as a tensor of ``x``'s dtype/device that broadcasts to ``shape``."""
    if isinstance(value, Tensor):
        v = value.to(device=x.device, dtype=x.dtype)
    else:
        v = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    try:
        ok = torch.broadcast_shapes(v.shape, shape) == shape
    except RuntimeError:
        ok = False
    if not ok:
        raise PatchError(
            f"{kind} value of shape {list(v.shape)} does not broadcast to the patched "
            f"region of shape {list(shape)} at {where}"
        )
    return v


def _update(x: Tensor, sl: Optional[tuple], fn: Callable[[Tensor], Tensor], where: str) -> Tensor:
    """Out of place: a copy of ``x`` whose region ``x[sl]`` is replaced by ``fn(x[sl])``."""
    if sl is None:
        return fn(x)
    idx = _selection(x, sl, where)
    flat = x.reshape(-1)
    new = fn(flat[idx]).expand(idx.shape).reshape(-1)
    return flat.index_put((idx.reshape(-1),), new).reshape(x.shape)


def _need_tensor(x: Any, where: str, kind: str) -> None:
    if not isinstance(x, Tensor):
        raise PatchError(
            f"{kind} at {where} needs a tensor, but the value there is a "
            f"{type(x).__name__}; add a path into it (e.g. '.0' or '.<key>') or use CustomPatch"
        )


# --------------------------------------------------------------------------- patches


@dataclass(frozen=True, kw_only=True, eq=False)
class Patch:
    """Base class. ``op(value, where)`` returns the new value (never mutates ``value``).

    Subclass it (as a frozen keyword-only dataclass) for new kinds of patch;
    ``where`` names the target in error messages.
    """

    def op(self, value: Any, where: str = "target") -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


def _check_value(value: Any, kind: str) -> None:
    if not isinstance(value, (Tensor, float, int, bool)):
        raise PatchError(f"{kind}.value must be a Tensor, float, int or bool, got {type(value).__name__}")


@dataclass(frozen=True, kw_only=True, eq=False)
class ZeroPatch(Patch):
    """Zero ``x[slice]`` (the whole tensor if ``slice`` is None)."""

    slice: Optional[TensorSlice] = None

    def __post_init__(self):
        normalize_slice(self.slice)

    def op(self, value: Any, where: str = "target") -> Tensor:
        _need_tensor(value, where, "ZeroPatch")
        return _update(value, normalize_slice(self.slice), torch.zeros_like, where)


@dataclass(frozen=True, kw_only=True, eq=False)
class AddPatch(Patch):
    """Add ``value`` to ``x[slice]``; ``value`` must broadcast to ``x[slice].shape``.

    Differentiable in ``value`` (steering vectors via ``torch.func.grad``), and ``value``
    may be batched under ``torch.func.vmap``.
    """

    value: PatchValue
    slice: Optional[TensorSlice] = None

    def __post_init__(self):
        _check_value(self.value, "AddPatch")
        normalize_slice(self.slice)

    def op(self, value: Any, where: str = "target") -> Tensor:
        _need_tensor(value, where, "AddPatch")
        return _update(
            value,
            normalize_slice(self.slice),
            lambda r: r + _as_value(self.value, r, r.shape, where, "AddPatch"),
            where,
        )


@dataclass(frozen=True, kw_only=True, eq=False)
class ReplacePatch(Patch):
    """Set ``x[slice] = value`` (out of place); ``value`` must broadcast to ``x[slice].shape``."""

    value: PatchValue
    slice: Optional[TensorSlice] = None

    def __post_init__(self):
        _check_value(self.value, "ReplacePatch")
        normalize_slice(self.slice)

    def op(self, value: Any, where: str = "target") -> Tensor:
        _need_tensor(value, where, "ReplacePatch")
        return _update(
            value,
            normalize_slice(self.slice),
            lambda r: _as_value(self.value, r, r.shape, where, "ReplacePatch").expand(r.shape).clone(),
            where,
        )


@dataclass(frozen=True, kw_only=True, eq=False)
class CustomPatch(Patch):
    """Replace the value ``x`` by ``custom_op(x)``.

    ``custom_op`` must not modify its argument in place. A tensor must map to a tensor of
    the same shape; any other value (e.g. a tuple) is passed as is.
    """

    custom_op: Callable[[Any], Any]

    def __post_init__(self):
        if not callable(self.custom_op):
            raise PatchError(f"CustomPatch.custom_op must be callable, got {type(self.custom_op).__name__}")

    def op(self, value: Any, where: str = "target") -> Any:
        out = self.custom_op(value)
        if isinstance(value, Tensor):
            if not isinstance(out, Tensor):
                raise PatchError(
                    f"CustomPatch at {where}: custom_op returned a {type(out).__name__} "
                    f"for a tensor of shape {list(value.shape)}; it must return a tensor"
                )
            if out.shape != value.shape:
                raise PatchError(
                    f"CustomPatch at {where}: custom_op returned shape {list(out.shape)}, "
                    f"expected {list(value.shape)}"
                )
        return out


@dataclass(frozen=True, kw_only=True, eq=False)
class ProbePatch(Patch):
    """Observe the target: ``records[target]`` is its last value (None if never reached)."""

    def op(self, value: Any, where: str = "target") -> Any:
        return value


@dataclass(frozen=True, kw_only=True, eq=False)
class RecordPatch(Patch):
    """Observe the target: ``records[target]`` lists every value it took, in call order."""

    def op(self, value: Any, where: str = "target") -> Any:
        return value
