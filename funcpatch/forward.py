"""The pure patched forward pass.

During one call each source's output is recorded, and each destination's input
becomes ``input + sum_src mask[..., src] * (patch_src_outs[src] - src_out[src])`` over
its incoming sources, where ``src_out`` is the source's output *in this same forward*.
The mask-weighted sum is one matrix product over the differences, shared by the
destinations that read the same sources (a layer's Q, K and V inputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import nn
from torch.func import functional_call

from funcpatch.graph import DestModule, SrcModule
from funcpatch.runtime import Visitor, activated, serialized, visiting
from funcpatch.scratch import recording, scratch
from funcpatch.state import PatchState, effective_mask


def _src_out(src: SrcModule, output: torch.Tensor) -> torch.Tensor:
    """Source module output -> ``[n_srcs_here, batch, seq, ...]``."""
    return output.unsqueeze(0) if src.head_dim is None else output.movedim(src.head_dim, 0)


def _recorded(pm, store: Dict[str, torch.Tensor], lo: int, hi: int, needed_by: str):
    """What ``store`` holds for the source modules with src_idx in [lo, hi), in order."""
    parts = []
    for s in pm.graph.src_modules:
        if lo <= s.srcs[0] and s.srcs[1] <= hi:
            if s.module_name not in store:
                raise RuntimeError(f"source module {s.module_name} had not run before {needed_by}: the graph's "
                                   "layer order does not match the model's execution order")
            parts.append(store[s.module_name])
    return parts


@dataclass
class _Role:
    name: str
    dest: Optional[DestModule] = None
    src: Optional[SrcModule] = None


class Recorder(Visitor):
    """Records every source's output (a plain forward)."""

    def __init__(self, pm, modules: Mapping[str, nn.Module]):
        self.pm = pm
        self.roles: Dict[nn.Module, _Role] = {m: _Role(n) for n, m in modules.items()}
        for s in pm.graph.src_modules:
            self.roles[modules[s.module_name]].src = s
        for d in pm.graph.dest_modules:
            self.roles[modules[d.module_name]].dest = d
        self.outs: Dict[str, torch.Tensor] = {}

    def visit(self, role, output):
        src = role.src
        if src is not None:
            self.outs[src.module_name] = _src_out(src, output)
        return output

    def stacked(self, lo: int = 0, hi: Optional[int] = None) -> torch.Tensor:
        """Recorded outputs of sources with src_idx in [lo, hi): ``[n, batch, seq, d]``."""
        hi = len(self.pm.graph.srcs) if hi is None else hi
        parts = _recorded(self.pm, self.outs, lo, hi, "the end of the forward")
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class Patcher(Recorder):
    """Records sources and patches destinations according to a :class:`PatchState`.

    Layout: activations are ``[batch, pos, heads?, d]``. When a source fires, its
    difference ``patch - out`` is kept as a chunk ``[batch, pos, k, d]``. When the
    first of the destinations that share a set of incoming sources fires (a layer's
    Q, K and V), one matrix product over the joined chunks gives all their deltas at
    once, ``[batch, pos, heads_total, d]``, already in activation layout (measured:
    ~1.8x faster than an einsum per destination over ``[src, batch, pos, d]``).
    """

    def __init__(self, pm, modules, state: PatchState):
        super().__init__(pm, modules)
        self.state = state
        self.patch = state.patch_src_outs.movedim(0, 2)  # [batch, pos, n_srcs, d]
        self.diffs: Dict[str, torch.Tensor] = {}
        self.deltas: Dict[str, torch.Tensor] = {}
        self.carried: Dict[str, torch.Tensor] = {}

    def visit(self, role, output):
        carried = self.carried.pop(role.name, None)
        if carried is not None:
            output = output + carried
        dest = role.dest
        if dest is not None and dest.in_srcs[1] > dest.in_srcs[0]:
            if dest.module_name not in self.deltas:
                self.compute_deltas(dest)
            delta = self.deltas.pop(dest.module_name).to(output.dtype)
            output = output + delta
            # Where the hook only observes the residual (a bridge's resid_mid is the
            # second norm's input), the change must also reach the residual downstream.
            to = self.pm.backend.carry_to(role.name)
            if to is not None:
                self.carried[to] = delta
        src = role.src
        if src is not None:
            chunk = output if src.head_dim is not None else output.unsqueeze(2)
            patch = self.patch[:, :, src.srcs[0]:src.srcs[1]]
            check_patch_shape(patch.movedim(2, 0), chunk.movedim(2, 0), src.module_name)
            # rsub keeps the (contiguous) activation layout, so joining chunks is a cheap copy
            self.diffs[src.module_name] = torch.rsub(chunk, patch)
        return output

    def compute_deltas(self, dest: DestModule) -> None:
        group = [d for d in self.pm.graph.dest_modules if d.in_srcs == dest.in_srcs and d.module_name not in self.deltas]
        mask = group_mask(self.pm, self.state, group)  # [batch | 1, pos | 1, heads_total, n_in]
        chunks = _recorded(self.pm, self.diffs, *dest.in_srcs, dest.module_name)
        diff = torch.cat(chunks, dim=2) if len(chunks) > 1 else chunks[0]  # [batch, pos, n_in, d]
        total = torch.matmul(mask, diff)  # [batch, pos, heads_total, d]
        start = 0
        for d in group:
            n = d.n_heads or 1
            piece = total[:, :, start:start + n]
            self.deltas[d.module_name] = piece if d.n_heads is not None else piece.squeeze(2)
            start += n


def group_mask(pm, state: PatchState, group) -> torch.Tensor:
    """The masks of destination modules that read the same sources, joined along the
    head dim: ``[batch | 1, pos | 1, heads_total, n_in]`` (a module without heads is one)."""
    seq_len = pm.graph.seq_len
    masks = []
    for d in group:
        m = effective_mask(state, d.module_name)
        batched = m.dim() == len(d.mask_shape(seq_len)) + 1
        if d.n_heads is None:
            m = m.unsqueeze(-2)  # one "head"
        if seq_len is None:
            m = m.unsqueeze(-3)  # broadcast over positions
        if not batched:
            m = m.unsqueeze(0)  # broadcast over the batch
        masks.append(m)
    if len(masks) == 1:
        return masks[0]
    lead = torch.broadcast_shapes(*(m.shape[:-2] for m in masks))
    return torch.cat([m.expand(*lead, *m.shape[-2:]) for m in masks], dim=-2)


def check_patch_shape(patch: torch.Tensor, out: torch.Tensor, module_name: str) -> None:
    """``patch`` and ``out``: ``[n, batch, seq, ...]`` for one source module."""
    if patch.shape[2:] != out.shape[2:] or patch.shape[1] not in (1, out.shape[1]):
        raise ValueError(f"patch_src_outs has per-source shape {tuple(patch.shape[1:])} but source {module_name} "
                         f"outputs {tuple(out.shape[1:])} (batch, seq, ...); compute the patch values on inputs "
                         "of the same shape")


class SrcMajorRecorder:
    """Records sources for a forward that hands over activations by name, in source-major
    layout (:mod:`funcpatch.lean`): ``src(name, out [k, batch, pos, d])`` and
    ``dest(names, x [batch, pos, d]) -> [heads_total, batch, pos, d] | None``."""

    def __init__(self, pm):
        self.pm = pm
        self.src_modules = {s.module_name: s for s in pm.graph.src_modules}
        self.outs: Dict[str, torch.Tensor] = {}

    def src(self, name: str, out: torch.Tensor) -> None:
        if name in self.src_modules:
            self.outs[name] = out

    def dest(self, names, x: torch.Tensor) -> Optional[torch.Tensor]:
        return None  # nothing is patched: the forward takes its plain path

    def narrow(self, k: int) -> bool:
        return False  # records every position

    def dest_slots(self, names, x: torch.Tensor, sparse: bool = True):
        return None

    def stacked(self) -> torch.Tensor:
        parts = _recorded(self.pm, self.outs, 0, len(self.pm.graph.srcs), "the end of the forward")
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class SrcMajorPatcher(SrcMajorRecorder):
    """Patches destinations for a source-major forward (see :class:`SrcMajorRecorder`).

    Differences ``patch - out`` are kept as ``[n_srcs, batch, pos, d]``, so a destination
    group's incoming differences are one slice; with masks shared by the whole batch its
    patched inputs are then one matrix product that also adds the residual,
    ``x + masks @ diffs`` over ``[n_in, batch * pos * d]``. The differences are written
    into one buffer when nothing records the forward (no autograd, no torch.func
    transform: in-place writes would break both); otherwise each source's chunk is kept
    and joined per destination group.
    """

    def __init__(self, pm, state: PatchState, before: Optional[torch.Tensor] = None, repeats: int = 1):
        super().__init__(pm)
        self.state = state
        self.patch = state.patch_src_outs
        self.repeats = repeats  # the batch is the patch values' batch, repeated this many times
        self.dest_modules = {d.module_name: d for d in pm.graph.dest_modules}
        self.diffs: Dict[str, torch.Tensor] = {}
        self.buffer: Optional[torch.Tensor] = None
        self.in_place = not recording()
        self.tail: Optional[int] = None  # after narrow(k): only the last k positions
        if before is not None:  # a resumed forward: the first sources ran in an earlier one (once per repeat)
            for s in pm.graph.src_modules:
                if s.srcs[1] <= before.shape[0]:
                    self._write(s, before[s.srcs[0]:s.srcs[1]].unsqueeze(1).expand(-1, repeats, -1, -1, -1))

    def narrow(self, k: int) -> bool:
        self.tail = k
        return True

    def _positions(self, t: torch.Tensor, dim: int = 2) -> torch.Tensor:
        return t if self.tail is None else t.narrow(dim, t.shape[dim] - self.tail, self.tail)

    def src(self, name, out):
        src = self.src_modules.get(name)
        if src is not None:
            if out.shape[1] % self.repeats:
                raise ValueError(f"batch of {out.shape[1]} rows is not {self.repeats} repeats of the patch values' batch")
            self._write(src, out.unflatten(1, (self.repeats, -1)))

    def _write(self, src, out: torch.Tensor) -> None:
        """``patch - out`` for one source module; ``out [k, repeats, batch, pos, d]``."""
        lo, hi = src.srcs
        patch = self._positions(self.patch[lo:hi])
        check_patch_shape(patch, out[:, 0], src.module_name)
        patch = patch.unsqueeze(1)
        if self.in_place:
            if self.buffer is None:  # + one slot for the residual (see _inputs)
                rows = out.shape[1] * out.shape[2]
                self.buffer = scratch("diffs", (self.patch.shape[0] + 1, rows) + out.shape[3:], out)
            into = self._positions(self.buffer[lo:hi]).unflatten(1, out.shape[1:3])
            self.diffs[src.module_name] = torch.sub(patch, out, out=into)
        else:
            self.diffs[src.module_name] = (patch - out).flatten(1, 2)

    def dest(self, names, x):
        got = self.dest_slots(names, x, sparse=False)
        return None if got is None else got[1]

    def dest_slots(self, names, x, sparse: bool = True):
        """Like ``dest``, returning ``(slots, inputs)``. ``slots`` None: ``inputs`` holds every
        head slot. Otherwise (``sparse``, when nothing records the forward and some slots'
        masks are 0 in every row) ``inputs [len(slots), ...]`` holds only the slots whose
        masks are not: the others read ``x`` itself."""
        group = [self.dest_modules[n] for n in names if n in self.dest_modules]
        if not group or group[0].in_srcs[1] == group[0].in_srcs[0]:
            return None
        assert all(d.in_srcs == group[0].in_srcs for d in group), "a destination group reads one set of sources"
        mask = group_mask(self.pm, self.state, group)  # [batch | 1, pos | 1, heads_total, n_in]
        if mask.shape[1] > 1:
            mask = self._positions(mask, 1)
        slots = None
        if sparse and self.in_place and mask.shape[-2] > 1:
            touched = (mask != 0).flatten(0, 1).any(0).any(-1)  # [heads_total]
            if not bool(touched.all()):
                slots = touched.nonzero()[:, 0]
                mask = mask.index_select(-2, slots)
                if len(slots) == 0:
                    return slots, x.new_empty((0,) + x.shape)
        return slots, self._inputs(group, mask, x)

    def _inputs(self, group, mask, x):
        lo, hi = group[0].in_srcs
        chunks = _recorded(self.pm, self.diffs, lo, hi, group[0].module_name)
        if self.in_place:
            # The residual joins the differences as one more "source" with weight 1, so the
            # product needs no separate add; its slot is free (that source runs later).
            self._positions(self.buffer[hi], 1).copy_(x)
            diff = self._positions(self.buffer[lo:hi + 1])  # [n_in + 1, batch, pos, d]
            mask = torch.cat([mask, mask.new_ones(mask.shape[:-1] + (1,))], dim=-1)
        else:
            chunks = [self._positions(c) for c in chunks]
            diff = torch.cat(chunks) if len(chunks) > 1 else chunks[0]  # [n_in, batch, pos, d]
        n, b, p, d = diff.shape
        if mask.shape[1] == 1:  # the same masks at every position
            if mask.shape[0] == 1:
                flat = diff.reshape(n, -1)
                if not self.in_place:
                    return torch.addmm(x.reshape(1, -1), mask[0, 0], flat).view(-1, b, p, d)
                # head slots are read once, right away (layer norm); a module's input may
                # become the residual stream itself, so it gets its own tensor
                heads = mask.shape[2]
                out = None if heads == 1 else scratch("head inputs", (heads, flat.shape[1]), flat)
                return torch.mm(mask[0, 0], flat, out=out).view(-1, b, p, d)
            # masks per batch row: one product per row, reading the differences in place; the
            # result is batch-major underneath ([batch, heads_total, pos, d])
            rows = diff.transpose(0, 1).flatten(2)
            out = torch.bmm(mask[:, 0], rows) if self.in_place else torch.baddbmm(x.reshape(b, 1, p * d), mask[:, 0],
                                                                                   rows)
            return out.view(b, -1, p, d).transpose(0, 1)
        delta = torch.einsum("bphn,nbpd->hbpd", mask.expand(b, p, *mask.shape[2:]), diff)
        return delta if self.in_place else x + delta


class CheckpointRecorder(SrcMajorRecorder):
    """A recorder that also keeps the residual at every point a lean forward can resume from."""

    def __init__(self, pm):
        super().__init__(pm)
        self.checkpoints: Dict[Tuple[int, int], Tuple[torch.Tensor, int]] = {}  # point -> (resid, n sources before)

    def checkpoint(self, point: Tuple[int, int], resid: torch.Tensor) -> None:
        self.checkpoints[point] = (resid, sum(o.shape[0] for o in self.outs.values()))


def record_checkpoints(pm, *args, **kwargs):
    """A plain forward of a model with a lean forward (:mod:`funcpatch.lean`) that returns
    ``(out, src_outs [n_srcs, batch, pos, d], {point: (resid there, n sources before)})``
    with points ``(block, 0)`` (entering the block), ``(block, 1)`` (entering its MLP) and
    ``(n_layers, 0)``: what :func:`resumed_patched_forward` starts from. None without one."""
    run = None if pm.lean is None else pm.lean.bind(args, kwargs, None)
    if run is None:
        return None
    rec = CheckpointRecorder(pm)
    out = run(rec)
    return out, rec.stacked(), rec.checkpoints


def resumed_patched_forward(pm, state: PatchState, point: Tuple[int, int], resid: torch.Tensor,
                            src_outs: torch.Tensor, *args, repeats: int = 1, **kwargs):
    """:func:`patched_forward` started at ``point`` (see :func:`record_checkpoints`; lean
    forwards only).

    Exact when no destination before ``point`` is patched (their masks are 0) and
    ``resid``/``src_outs`` come from an unpatched forward on the same inputs
    (:func:`record_checkpoints`): the residual at that point and the outputs
    ``[n_before, batch, pos, d]`` of the sources before it. Returns None when the model
    or the call has no lean forward (then run :func:`patched_forward`).

    With ``repeats`` the inputs (and ``resid``) are ``repeats`` stacked copies of the
    batch that ``state.patch_src_outs`` and ``src_outs`` were computed on, which are
    then used for every copy without being tiled (ACDC evaluates many circuits at once).
    """
    run = None if pm.lean is None else pm.lean.bind(args, kwargs, None, resume=(point, resid))
    return None if run is None else run(SrcMajorPatcher(pm, state, before=src_outs, repeats=repeats))


def _run(pm, hook_visitor, lean_visitor, args, kwargs, params):
    run = None if pm.lean is None else pm.lean.bind(args, kwargs, params)
    if run is not None:  # funcpatch's own forward (funcpatch.lean): no hooks, nothing shared
        visitor = lean_visitor()
        return run(visitor), visitor
    with activated(pm) as modules, serialized(pm):
        visitor = hook_visitor(modules)
        with visiting(visitor):
            if params is None:
                out = pm.model(*args, **kwargs)
            else:
                out = functional_call(pm.model, params, args, kwargs, strict=False)
    return out, visitor


def patched_forward(pm, state: PatchState, *args, params: Optional[Mapping[str, torch.Tensor]] = None,
                    **kwargs):
    """Run ``pm.model(*args, **kwargs)`` with the edges patched as ``state`` says.

    Pure: the output depends only on the arguments, and the model is left exactly as
    it was (also when the call raises). With ``params`` (name -> tensor, any subset of
    the model's parameters and buffers) the model runs through
    ``torch.func.functional_call`` with those values, so gradients w.r.t. weights flow.
    Composes with ``torch.func.vmap``/``grad``/``jvp``/``jacrev``.

    Returns the model's full output (apply ``pm.out_slice`` to score a task).
    """
    if not isinstance(state, PatchState):
        raise TypeError(f"state must be a funcpatch.PatchState (fp.init_state), got {type(state).__name__}")
    if state.patch_src_outs is None:
        raise ValueError("state has no patch values: call fp.patch_mode(pm, state, patch_src_outs) first "
                         "(patch_src_outs from fp.src_ablations)")
    expected = {m.module_name: m.mask_shape(pm.graph.seq_len) for m in pm.graph.dest_modules}
    if set(state.masks) != set(expected):
        raise ValueError(f"state.masks keys do not match this graph's destination modules: "
                         f"missing {sorted(set(expected) - set(state.masks))}, "
                         f"unexpected {sorted(set(state.masks) - set(expected))}")
    for k, shape in expected.items():
        got = tuple(state.masks[k].shape)
        if got != shape and got[1:] != shape:
            raise ValueError(f"mask for {k} has shape {got}; this graph needs {shape} "
                             "(optionally with a leading batch dim)")
    if state.patch_src_outs.shape[0] != len(pm.graph.srcs):
        raise ValueError(f"patch_src_outs has {state.patch_src_outs.shape[0]} sources, the graph has "
                         f"{len(pm.graph.srcs)}")
    out, _ = _run(pm, lambda modules: Patcher(pm, modules, state), lambda: SrcMajorPatcher(pm, state), args, kwargs,
                  params)
    return out


def record_src_outs(pm, *args, params=None, **kwargs) -> Tuple[object, torch.Tensor]:
    """A plain forward that also returns every source's output ``[n_srcs, batch, seq, d]``."""
    out, rec = _run(pm, lambda modules: Recorder(pm, modules), lambda: SrcMajorRecorder(pm), args, kwargs, params)
    return out, rec.stacked()
