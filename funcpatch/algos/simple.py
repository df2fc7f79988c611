"""Baseline prune scores: activation magnitude, random, and a known (ground-truth) circuit."""

from __future__ import annotations

from typing import Collection, Dict, Optional, Union

import torch

from funcpatch.circuits import forward_kwargs, materialize_batches, progress_bar
from funcpatch.forward import record_src_outs
from funcpatch.graph import Edge
from funcpatch.state import edge_masks, init_state

PruneScores = Dict[str, torch.Tensor]

__all__ = ["activation_magnitude", "random_scores", "ground_truth"]


def activation_magnitude(pm, dataloader, progress: bool = True) -> PruneScores:
    """Score of ``src -> dest`` = the source's mean activation, in absolute value.

    Per batch: the mean of the source's output on the clean prompts over batch,
    positions and ``d_model``; its absolute value is averaged over batches (auto-circuit's
    ``activation_magnitude_prune_scores``). Every destination of a source gets the same
    score (also at every position / head). The incoming sources of each destination are
    read from the graph, so residual graphs get their own sources (auto-circuit takes
    the first ``n`` sources there).

    Returns:
        PruneScores: dest module -> ``[seq?, heads?, n_in_srcs]``.
    """
    batches = materialize_batches(dataloader)
    template = init_state(pm).masks
    scores = {k: torch.zeros_like(v) for k, v in template.items()}
    with torch.no_grad():
        for batch in progress_bar(batches, progress=progress, desc="Activation magnitude"):
            outs = record_src_outs(pm, batch.clean, **forward_kwargs(batch, "clean"))[1]
            means = outs.reshape(outs.shape[0], -1).mean(dim=1).abs()  # [n_srcs]
            for m in pm.graph.dest_modules:
                a, b = m.in_srcs
                s = scores[m.module_name]
                scores[m.module_name] = s + (means[a:b].to(s.dtype) / len(batches)).expand_as(s)
    return scores


def random_scores(pm, seed: Optional[int] = None, generator: Optional[torch.Generator] = None) -> PruneScores:
    """Uniform ``[0, 1)`` scores for every edge (the random baseline).

    ``seed`` (or an explicit CPU ``generator``) makes the scores reproducible, on any
    device: they are drawn on the CPU in graph order, then moved to the masks' device.
    Neither: torch's global generator.
    """
    if seed is not None and generator is not None:
        raise ValueError("pass seed or generator, not both")
    if seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    out = {}
    for k, v in init_state(pm).masks.items():
        out[k] = torch.rand(v.shape, generator=generator, dtype=v.dtype).to(v.device)
    return out


def ground_truth(pm, edges: Collection[Union[str, Edge]]) -> PruneScores:
    """1 for the given edges (Edge objects, or names: a name covers every position of a
    token-specific graph), 0 for all others. Unknown names raise, naming close matches."""
    if edges is None:
        raise ValueError("ground_truth needs the circuit's edges (names or Edge objects), got None")
    if isinstance(edges, (str, Edge)):
        edges = [edges]
    return edge_masks(pm, list(edges), 1.0)
