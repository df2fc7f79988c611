"""What a destination's patched input is made of, whatever the activation layout: the
masks of a destination group joined, the recorded source differences it reads, and the
check that patch values fit the sources they replace."""

from __future__ import annotations

from typing import Dict

import torch

from funcpatch.state import PatchState, effective_mask


def recorded(pm, store: Dict[str, torch.Tensor], lo: int, hi: int, needed_by: str):
    """What ``store`` holds for the source modules with src_idx in [lo, hi), in order."""
    parts = []
    for s in pm.graph.src_modules:
        if lo <= s.srcs[0] and s.srcs[1] <= hi:
            if s.module_name not in store:
                raise RuntimeError(f"source module {s.module_name} had not run before {needed_by}: the graph's "
                                   "layer order does not match the model's execution order")
            parts.append(store[s.module_name])
    return parts


def group_mask(pm, state: PatchState, group) -> torch.Tensor:
    """The masks of destination modules that read the same sources, joined along the
    head dim: ``[batch | 1, pos | 1, heads_total, n_in]`` (a module without heads is one)."""
    seq_len = pm.graph.seq_len
    masks = []
    for d in group:
        m = effective_mask(state, d.module_name)
        batched = m.dim() == len(d.mask_shape(seq_len)) + 1
        # (one reshape: a module without heads is one "head"; no batch or position dim broadcasts)
        masks.append(m.reshape(m.shape[0] if batched else 1, seq_len or 1, d.n_heads or 1, m.shape[-1]))
    if len(masks) == 1:
        return masks[0]
    if any(m.shape[:-2] != masks[0].shape[:-2] for m in masks):  # (some per row or position, some not)
        lead = torch.broadcast_shapes(*(m.shape[:-2] for m in masks))
        masks = [m.expand(*lead, *m.shape[-2:]) for m in masks]
    return torch.cat(masks, dim=-2)


def check_patch_shape(patch: torch.Tensor, out: torch.Tensor, module_name: str) -> None:
    """``patch`` and ``out``: ``[n, batch, seq, ...]`` for one source module."""
    if patch.shape[2:] != out.shape[2:] or patch.shape[1] not in (1, out.shape[1]):
        raise ValueError(f"patch_src_outs has per-source shape {tuple(patch.shape[1:])} but source {module_name} "
                         f"outputs {tuple(out.shape[1:])} (batch, seq, ...); compute the patch values on inputs "
                         "of the same shape")
