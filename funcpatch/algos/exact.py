"""Exact edge effects: patch each edge alone and measure the change in the loss.

The first-order approximation of these numbers is :func:`funcpatch.algos.eap` (same
loss, same sign): ``exact[e] = L(only e patched) - L(nothing patched)`` while
``eap[e] = dL/dm_e`` at ``m = 0``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Literal, Optional, Tuple, Union

import torch
from torch.func import vmap

from funcpatch import distributed
from funcpatch.ablation import AblationType
from funcpatch.algos.mask_gradient import _check_batch_answers, _check_common, answer_loss
from funcpatch.circuits import (batch_patch_values, dataset_mean_ablation, forward_kwargs, last_position_kwargs,
                                materialize_batches, progress_bar)
from funcpatch.forward import patched_forward
from funcpatch.state import init_state, patch_mode

PruneScores = Dict[str, torch.Tensor]

__all__ = ["exact_patching", "one_hot_masks"]


def _layout(pm) -> List[Tuple[str, Tuple[int, ...]]]:
    return [(m.module_name, tuple(m.mask_shape(pm.graph.seq_len))) for m in pm.graph.dest_modules]


def one_hot_masks(pm, start: int, stop: int, template: Optional[Dict[str, torch.Tensor]] = None
                  ) -> Dict[str, torch.Tensor]:
    """Masks for mask entries ``start..stop-1`` (all modules' masks flattened in graph order),
    one entry set to 1 per row: dest module -> ``[stop - start, *mask shape]``.

    Every mask entry is one edge, so row ``i`` patches exactly one edge.
    """
    template = init_state(pm).masks if template is None else template
    layout = _layout(pm)
    sizes = [int(torch.Size(s).numel()) for _, s in layout]
    total = sum(sizes)
    n = stop - start
    like = next(iter(template.values()))
    flat = torch.zeros(n, total, dtype=like.dtype, device=like.device)
    flat[torch.arange(n), torch.arange(start, stop)] = 1.0
    parts = torch.split(flat, sizes, dim=1)
    return {name: p.reshape(n, *shape) for (name, shape), p in zip(layout, parts)}


def exact_patching(pm, dataloader, metric: Optional[Callable[[torch.Tensor, object], torch.Tensor]] = None,
                   ablation_type: Union[AblationType, str] = AblationType.RESAMPLE,
                   clean_corrupt: Optional[Literal["clean", "corrupt"]] = "corrupt", batch_edges: int = 64,
                   grad_function: str = "logit", answer_function: str = "avg_diff",
                   progress: bool = True) -> PruneScores:
    """The true effect of patching each edge alone: ``sum_batches [L(edge patched) - L(clean)]``.

    For each batch the model runs on the clean prompts; one edge at a time carries its
    patch value (``ablation_type``, computed on the ``clean_corrupt`` prompts) and every
    other edge its clean value. ``batch_edges`` edges are evaluated per call, with
    ``torch.func.vmap`` over their one-hot masks.

    Args:
        pm: the patchable model.
        dataloader: a PromptDataLoader (or an iterable of PromptPairBatch).
        metric: ``metric(output[pm.out_slice], batch) -> 0-d tensor``, a loss; must be
            vmap-compatible. None: :func:`funcpatch.algos.answer_loss` with
            ``grad_function`` / ``answer_function`` (default ``-logit_diff``, the loss
            :func:`funcpatch.algos.eap` differentiates, so EAP approximates these numbers).
        batch_edges: edges per vmapped call (memory grows with it).
        progress: tqdm progress bar.

    Returns:
        PruneScores: dest module -> ``[seq?, heads?, n_in_srcs]``.
    """
    ablation_type, which = _check_common(pm, grad_function, answer_function, ablation_type, clean_corrupt)
    if isinstance(batch_edges, bool) or not isinstance(batch_edges, int) or batch_edges < 1:
        raise ValueError(f"batch_edges must be an int >= 1, got {batch_edges!r}")
    if metric is not None and not callable(metric):
        raise TypeError(f"metric must be callable (output, batch) -> 0-d tensor, got {type(metric).__name__}")
    batches = materialize_batches(dataloader)
    if metric is None:
        for i, b in enumerate(batches):
            _check_batch_answers(b, i, answer_function)

        def metric(out, batch):
            return answer_loss(out, batch.answers, batch.wrong_answers, grad_function, answer_function)

    dataset_mean = dataset_mean_ablation(pm, dataloader, ablation_type)
    template = init_state(pm)
    layout = _layout(pm)
    total = sum(int(torch.Size(s).numel()) for _, s in layout)
    if total != pm.graph.n_edges:
        raise RuntimeError(f"the masks hold {total} entries but the graph has {pm.graph.n_edges} edges")
    like = next(iter(template.masks.values()))
    chunks = [(a, min(a + batch_edges, total)) for a in range(0, total, batch_edges)]

    mine = distributed.my_batches(batches)  # all of them without a process group
    per_batch = []
    bar = progress_bar(total=len(mine) * len(chunks), progress=progress, desc="Exact patching")
    with torch.no_grad():
        for batch in (batches[i] for i in mine):
            patch = batch_patch_values(pm, batch, which, ablation_type, dataset_mean)
            state = patch_mode(pm, template, patch)
            kwargs = {**forward_kwargs(batch, "clean"), **last_position_kwargs(pm)}

            def loss(masks, state=state, batch=batch, kwargs=kwargs):
                out = patched_forward(pm, dataclasses.replace(state, masks=masks), batch.clean, **kwargs)
                value = metric(out[pm.out_slice], batch)
                if not isinstance(value, torch.Tensor) or value.dim() != 0:
                    raise ValueError("metric must return a 0-d tensor, got "
                                     f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value)}")
                return value

            base = loss(template.masks)
            batch_scores = torch.zeros(total, dtype=like.dtype, device=like.device)
            for a, b in chunks:
                vals = vmap(loss)(one_hot_masks(pm, a, b, template.masks))
                batch_scores[a:b] = (vals - base).to(batch_scores.dtype)
                bar.update(1)
            per_batch.append(batch_scores)
    bar.close()
    flat_scores = torch.zeros(total, dtype=like.dtype, device=like.device)
    for batch_scores in distributed.gather_in_order(per_batch, len(batches), like.device):
        flat_scores += batch_scores  # in batch order: the same sums on every rank as in one process
    parts = torch.split(flat_scores, [int(torch.Size(s).numel()) for _, s in layout])
    return {name: p.reshape(shape).clone() for (name, shape), p in zip(layout, parts)}
