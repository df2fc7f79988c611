"""Gradients of a loss with respect to every edge mask at masks = 0 (EAP), from one plain
forward and backward of funcpatch's own forward (:mod:`funcpatch.decoder`).

At masks = 0 a destination's input is ``x + sum_s m_s (patch_s - out_s)`` with every
``m_s = 0``, so ``dL/dm_s = <g, patch_s - out_s>`` where ``g`` is the gradient of the
loss with respect to that destination's own input and ``out_s`` the sources' outputs in
the plain (clean) forward. No per-head copies of the residual are needed to get ``g``:

- a module destination (an MLP's input, a residual node) gets a zero tensor added to its
  own input, whose gradient is ``g``;
- a head's Q/K/V input (a slot: with grouped-query attention, each query head's K and V
  slots project with their group's weights) goes through the shared norm and the slot's
  own projection, so a zero tensor added to the projected ``q/k/v`` slots gives
  ``dL/dq_h``; then ``g_h = N'(x)^T (W_h^T dL/dq_h)`` with the norm's backward (layer
  norm or RMSNorm) at the shared residual ``x``, the same for every slot.

(The patched forward's extra path, through ``out_s`` inside the differences, carries
``-m^T g = 0`` at masks = 0, so this is the exact gradient.) Over several devices the
forward and backward run block by block where the weights are; the scores are taken on
the patch values' device (where the recorded sources are gathered: the last block's),
so gradients and source outputs only ever move forward. Equal to
``torch.func.grad`` of the patched forward in tests/test_algos_grad.py. Not used where
heads are normalized after they are summed (Gemma-2: their edges are not additive).

EAP-IG-inputs (``fp.algos.eap_ig(variant="inputs")``) needs the same ``g`` on a forward
whose residual stream starts at an interpolated embedding, times *fixed* differences
(the patch values minus the clean run's outputs): ``resid`` resumes the forward there
and the differences are given, so nothing per source is recorded in that forward.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from funcpatch.scratch import scratch
from funcpatch.source_major import CheckpointRecorder


class _ZeroInputs(CheckpointRecorder):
    """Records sources and block inputs, and adds zero leaves at every destination."""

    def __init__(self, pm, record: bool = True):
        super().__init__(pm)
        self.record = record  # False: the differences are given (nothing per source is kept)
        self.leaves: Dict[str, torch.Tensor] = {}  # dest module -> zero leaf (its input's gradient)
        self.qkv_leaves: Dict[int, torch.Tensor] = {}  # block -> zero leaf on the projected q/k/v

    def src(self, name: str, out: torch.Tensor) -> None:
        if self.record:
            super().src(name, out)

    def narrow(self, k: int) -> bool:
        return True  # the loss reads the last positions only; sources there are scored alike

    def dest(self, names, x):
        name = names[0]
        if len(names) != 1 or name not in self.dest_modules or self.dest_modules[name].n_heads is not None:
            return None  # head inputs: through plain_qkv
        leaf = self.leaves[name] = torch.zeros_like(x, requires_grad=True)
        return (x + leaf).unsqueeze(0)

    def plain_qkv(self, block: int, qkv: torch.Tensor) -> torch.Tensor:
        """``qkv [slots, batch, pos, d_head]`` of block ``block``, plus a zero leaf where
        its head inputs are destinations."""
        if not any(f"blocks.{block}.hook_{x}" in self.dest_modules for x in ("q_input", "attn_in")):
            return qkv
        leaf = self.qkv_leaves[block] = torch.zeros_like(qkv, requires_grad=True)
        return qkv + leaf


def zero_mask_grads(pm, decoder, state, tokens: torch.Tensor, kwargs, loss: Callable,
                    resid: Optional[torch.Tensor] = None) -> Optional[Dict]:
    """``dL/dmasks`` at ``state``, whose masks must be 0 (dest module -> mask-shaped
    tensor), with ``loss(model output) -> scalar``, on ``decoder``
    (:class:`funcpatch.decoder.DecoderForward`). None where this does not apply (a call
    the decoder does not take, post-normalized heads, masks not all 0 or transformed, or
    a torch.func transform active): then take ``torch.func.grad`` of the patched forward.

    With ``resid [batch, pos, d]`` the residual stream starts there (in place of the
    embedding, the Resid Start node's output) and ``state.patch_src_outs`` holds fixed
    differences ``[n_srcs, batch, pos, d]``: the result is ``<g_dest, patch_src_outs[s]>``
    (the mask gradient of a forward whose differences do not depend on it)."""
    if (decoder.arch.post_norms or torch._C._are_functorch_transforms_active() or state.mask_fn is not None
            or state.dropout_p > 0 or any(bool(m.any()) for m in state.masks.values())):
        return None
    # the weights as constants: autograd then keeps only what the activations' gradients need
    weights = {name: p.detach() for name, p in decoder.model.named_parameters()}
    run = decoder.bind((tokens,), kwargs, weights, resume=None if resid is None else ((0, 0), resid))
    if run is None:
        return None
    vis = _ZeroInputs(pm, record=resid is None)
    with torch.enable_grad():
        value = loss(run(vis))
        leaves = list(vis.leaves.values()) + list(vis.qkv_leaves.values())
        got = torch.autograd.grad(value, leaves, allow_unused=True)
    grads = {k: torch.zeros_like(leaf) if g is None else g
             for k, leaf, g in zip(list(vis.leaves) + [("qkv", b) for b in vis.qkv_leaves], leaves, got)}
    with torch.no_grad():  # the scores are plain numbers (scratch tensors serve the large products)
        return _scores(pm, decoder, vis, grads, state.patch_src_outs, tokens.shape[0])


def _diffs(pm, vis: _ZeroInputs, patch: torch.Tensor, batch: int, lo: int, hi: int):
    """``(a, b, patch_s - out_s)`` for sources ``lo..hi-1``, one source module at a time
    (``[b - a, batch, pos, d]``): the differences are never held for every source at once.
    Positions a narrowed block did not compute keep the patch value (only destinations
    narrowed alike read them). A visitor that recorded nothing was given the differences
    themselves: their slices."""
    for s in pm.graph.src_modules:
        a, b = max(s.srcs[0], lo), min(s.srcs[1], hi)
        if a >= b:
            continue
        if not vis.record:
            yield a, b, patch[a:b]
            continue
        out = vis.outs[s.module_name][a - s.srcs[0]:b - s.srcs[0]].to(patch.device)
        diff = scratch(f"eap diff {b - a}", (b - a, batch, *patch.shape[2:]), patch)  # heads, MLP: two buffers
        diff.copy_(patch[a:b].expand(-1, batch, -1, -1))
        diff[:, :, diff.shape[2] - out.shape[2]:] -= out
        yield a, b, diff


def _scores(pm, decoder, vis: _ZeroInputs, grads, patch: torch.Tensor, batch: int) -> Dict[str, torch.Tensor]:
    """Mask-shaped ``<g, patch_s - out_s>`` for every destination module."""
    g = pm.graph
    scores = {}
    for d in g.dest_modules:
        lo, hi = d.in_srcs
        if d.n_heads is None:  # one "head": the gradient w.r.t. its own input
            grad_in = grads[d.module_name].unsqueeze(0).to(patch.device)  # [1, batch, pos', d]
            scores[d.module_name] = torch.cat(
                [_dot(grad_in, diff[:, :, diff.shape[2] - grad_in.shape[2]:], g.seq_len)
                 for _, _, diff in _diffs(pm, vis, patch, batch, lo, hi)], -1)[..., 0, :]
    for block in vis.qkv_leaves:
        names = [f"blocks.{block}.hook_{x}_input" for x in "qkv"]
        split = names[0] in vis.dest_modules
        lo, hi = vis.dest_modules[names[0] if split else f"blocks.{block}.hook_attn_in"].in_srcs
        head = _HeadGrads(pm, decoder, block, grads[("qkv", block)], vis.checkpoints[(block, 0)][0], split,
                          patch.device)
        per_slot = torch.cat([head.scores(diff) for _, _, diff in _diffs(pm, vis, patch, batch, lo, hi)], -1)
        if split:
            start = 0
            for name in names:
                n = vis.dest_modules[name].n_heads
                scores[name] = per_slot[..., start:start + n, :]
                start += n
        else:
            scores[f"blocks.{block}.hook_attn_in"] = per_slot
    return {d.module_name: scores[d.module_name] for d in g.dest_modules}


def _dot(grad_in: torch.Tensor, diff: torch.Tensor, seq_len) -> torch.Tensor:
    """``<grad_in[h], diff[s]>``: ``[heads, n_in]``, per position ``[seq, heads, n_in]`` in
    token graphs (positions a narrowed run did not compute: 0)."""
    if seq_len is None:
        return grad_in.flatten(1) @ diff.flatten(1).T
    per_pos = torch.einsum("hbpd,nbpd->phn", grad_in, diff)
    return F.pad(per_pos, (0, 0, 0, 0, seq_len - per_pos.shape[0], 0))


class _HeadGrads:
    """``<g_h, diff_s>`` for every head slot of ``block`` (each Q/K/V slot when ``split``,
    else one slot per head), where ``g_h`` is the gradient w.r.t. the slot's own input,
    from ``grad_qkv [slots, batch, pos, d_head]`` (w.r.t. its projection): back through
    the slot's weights, then through the norm at the shared residual ``x``.

    The norm's backward ``g = rstd (y - mean(y) - xhat mean(y xhat))`` (``y``: the
    gradient at its output times its weight; RMSNorm has no ``mean(y)`` term) is applied
    to the differences' side of the product, per position, so ``g`` itself is never formed.
    The slot side is computed once, on the block's device, then moved to ``device``
    (the differences'); :meth:`scores` takes the differences a chunk of sources at a time.
    """

    def __init__(self, pm, decoder, block: int, grad_qkv: torch.Tensor, x: torch.Tensor, split: bool,
                 device: torch.device):
        w = decoder.weights()
        H, dh = decoder.n_heads, decoder.d_head
        _, b, p, _ = grad_qkv.shape
        d = x.shape[-1]
        self.b, self.p, self.d, self.seq_len = b, p, d, pm.graph.seq_len
        self.centred = decoder.arch.norm == "layer"
        norm_w = decoder.norm_gain(w, f"{block}.ln1")
        if split:
            weight = decoder.slot_weights(w, block)[0] * norm_w  # [slots, dh, d]
            G = grad_qkv.reshape(grad_qkv.shape[0], b * p, dh)
        else:  # a head's slot feeds its Q, K and V: one product over the joined inner dims
            weight = decoder.qkv_rows(w, block)[0].view(3, H, dh, d).transpose(0, 1).reshape(H, 3 * dh, d) * norm_w
            G = grad_qkv.reshape(3, H, b * p, dh).permute(1, 2, 0, 3).reshape(H, b * p, 3 * dh)
        if self.centred:
            x = x - x.mean(-1, keepdim=True)
        rstd = torch.rsqrt(x.pow(2).mean(-1) + decoder.eps).reshape(b * p)
        self.xhat = x.reshape(b * p, d) * rstd[:, None]
        G = G * rstd[:, None]  # the norm's 1/std, per position, taken on the small side
        # [slots, b*p, d]: gradient at the norm's output, times its weight and 1/std
        self.y = torch.bmm(G, weight, out=scratch("eap head grads", (G.shape[0], b * p, d), G))
        self.y_xhat = (G * torch.matmul(self.xhat, weight.transpose(1, 2))).sum(-1) / d  # [slots, b*p]: mean_d y*xhat
        if self.centred:
            self.y_sum = torch.bmm(G, weight.sum(-1, keepdim=True))[..., 0] / d  # [slots, b*p]: mean_d y
        if device != self.y.device:
            self.y, self.xhat, self.y_xhat = self.y.to(device), self.xhat.to(device), self.y_xhat.to(device)
            if self.centred:
                self.y_sum = self.y_sum.to(device)

    def scores(self, diff: torch.Tensor) -> torch.Tensor:
        """``[slots, n]`` (per position ``[seq, slots, n]``) for ``diff [n, batch, pos, d]``."""
        b, p, d = self.b, self.p, self.d
        diff = diff.reshape(diff.shape[0], b * p, d)
        d_xhat = torch.mul(diff, self.xhat, out=scratch(f"eap diff xhat {len(diff)}", diff.shape, diff)).sum(-1)
        if self.centred:
            d_sum = diff.sum(-1)  # [n, b*p]
        if self.seq_len is None:
            out = self.y.flatten(1) @ diff.flatten(1).T - self.y_xhat @ d_xhat.T
            return out - self.y_sum @ d_sum.T if self.centred else out
        out = (torch.einsum("hbpd,nbpd->phn", self.y.view(-1, b, p, d), diff.view(-1, b, p, d))
               - torch.einsum("hbp,nbp->phn", self.y_xhat.view(-1, b, p), d_xhat.view(-1, b, p)))
        if self.centred:
            out = out - torch.einsum("hbp,nbp->phn", self.y_sum.view(-1, b, p), d_sum.view(-1, b, p))
        return out
