"""Evaluate circuits: run the model with only a circuit's edges (or only the rest) patched.

A *circuit of size k* is read off prune scores in one of two ways:

- the tie rule of :mod:`funcpatch.edge_counts` (the default, as auto-circuit): every edge
  whose ``|score|`` is ``>=`` the ``|score|`` of the k-th highest edge, so tied scores at
  the threshold make the circuit larger than k;
- exact sizes (``exact_sizes=True``): the first k edges of :func:`edge_ranks`, i.e. the
  top k by ``|score|`` with ties broken by the graph's edge order ``pm.graph.edges``
  (token position, destination, head, source), so the circuit has exactly k edges.

:func:`run_circuits` runs each batch once per requested size and returns the outputs,
keyed by the circuit's *real* size.

This module also holds the small helpers the prune algorithms share: materialising a
dataloader's batches, the model keyword arguments of a batch, and the patch values of a
batch for an ablation type.
"""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Dict, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import torch
from tqdm.auto import tqdm

from funcpatch import distributed
from funcpatch.ablation import AblationType, as_ablation_type, enum_member, src_ablations
from funcpatch.edge_counts import desc_prune_scores, prune_scores_threshold
from funcpatch.forward import patched_forward, record_src_outs
from funcpatch.state import _param_device, init_state, patch_mode

PruneScores = Dict[str, torch.Tensor]
#: ``{real edge count: {batch.key: model output[pm.out_slice]}}``
CircuitOutputs = Dict[int, Dict[int, torch.Tensor]]

__all__ = ["PatchType", "CircuitOutputs", "run_circuits", "circuit_masks", "edge_ranks"]


class PatchType(Enum):
    """Which edges :func:`run_circuits` patches.

    EDGE_PATCH: patch the circuit's edges. The model runs on the corrupt prompt and the
        circuit's edges carry the ablation computed on the clean prompt, so with
        RESAMPLE the empty circuit is the corrupt run and the full circuit the clean run.
    TREE_PATCH: patch the edges *not* in the circuit. The model runs on the clean prompt
        and every other edge carries the ablation computed on the corrupt prompt.
    """

    EDGE_PATCH = 1
    TREE_PATCH = 2

    def __str__(self) -> str:
        return self.name.replace("_", " ").title()


def as_patch_type(x: Union[PatchType, str]) -> PatchType:
    return enum_member(PatchType, x, "patch_type")


# --------------------------------------------------------------------------------------
# Helpers shared with funcpatch.algos


def progress_bar(iterable=None, *, progress: bool, desc: str = "", total: Optional[int] = None):
    """A tqdm bar, silent with ``progress=False``."""
    return tqdm(iterable, desc=desc, total=total, disable=not progress, leave=False)


def materialize_batches(dataloader, what: str = "dataloader") -> List:
    """The batches of ``dataloader`` as a list (iterated once), checked to be prompt-pair batches.

    Any re-iterable of :class:`funcpatch.PromptPairBatch` works (a PromptDataLoader, or a
    plain list of batches, e.g. for MicroModel whose inputs are float vectors).
    """
    if dataloader is None:
        raise TypeError(f"{what} must be a PromptDataLoader or an iterable of PromptPairBatch, got None")
    try:
        batches = list(dataloader)
    except TypeError:
        raise TypeError(f"{what} must be a PromptDataLoader or an iterable of PromptPairBatch, "
                        f"got {type(dataloader).__name__}") from None
    if not batches:
        raise ValueError(f"{what} yielded no batches: at least one batch of prompt pairs is needed")
    for i, b in enumerate(batches):
        missing = [a for a in ("key", "clean", "corrupt", "answers", "wrong_answers") if not hasattr(b, a)]
        if missing:
            raise TypeError(f"{what} batch {i} is a {type(b).__name__} without {missing}: expected a "
                            "funcpatch.PromptPairBatch")
        if b.clean.shape != b.corrupt.shape:
            raise ValueError(f"{what} batch {i}: clean {tuple(b.clean.shape)} and corrupt "
                             f"{tuple(b.corrupt.shape)} prompts must have the same shape")
    return batches


def forward_kwargs(batch, which: Literal["clean", "corrupt"]) -> Dict[str, torch.Tensor]:
    """Model keyword arguments for ``batch``'s clean or corrupt prompts: the attention mask
    of padded prompts (``attention_mask`` / ``corrupt_attention_mask``), else nothing."""
    mask = getattr(batch, "attention_mask", None)
    if which == "corrupt" and getattr(batch, "corrupt_attention_mask", None) is not None:
        mask = batch.corrupt_attention_mask
    return {} if mask is None else {"attention_mask": mask}


def last_position_kwargs(pm) -> Dict[str, int]:
    """``{"logits_to_keep": 1}`` when a task scores the last position only
    (``slice_output="last_seq"``) and the forward takes it (``pm.forward``): the last
    block's tail and the unembedding then run at that position alone, with the same
    scored outputs. ``{}`` otherwise."""
    return {"logits_to_keep": 1} if pm.forward.takes_logits_to_keep and pm.slice_output == "last_seq" else {}


def resolve_clean_corrupt(ablation_type: AblationType, clean_corrupt: Optional[str]) -> Optional[str]:
    """Which prompts a batch's ablation is computed on (None for the dataset-wide and ZERO types).

    The batch-specific types (RESAMPLE, BATCH_TOKENWISE_MEAN, BATCH_ALL_TOK_MEAN) need
    "clean" or "corrupt". The others do not use it: None or the default "corrupt" are
    accepted, "clean" is an error (it could not be honoured).
    """
    if ablation_type.batch_specific:
        if clean_corrupt not in ("clean", "corrupt"):
            raise ValueError(f"{ablation_type.name} is computed per batch: clean_corrupt must be 'clean' or "
                             f"'corrupt', got {clean_corrupt!r}")
        return clean_corrupt
    if clean_corrupt not in (None, "corrupt"):
        raise ValueError(f"{ablation_type.name} does not depend on the batch's prompts: pass clean_corrupt=None "
                         f"(got {clean_corrupt!r})")
    return None


def dataset_mean_ablation(pm, dataloader, ablation_type: AblationType) -> Optional[torch.Tensor]:
    """The dataset-wide patch values of the TOKENWISE_MEAN types, else None."""
    if not ablation_type.mean_over_dataset:
        return None
    return src_ablations(pm, dataloader, ablation_type)


def batch_patch_values(pm, batch, which: Optional[str], ablation_type: AblationType,
                       dataset_mean: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Patch values ``[n_srcs, batch, seq, d]`` for one batch.

    ``which`` ("clean" / "corrupt") picks the prompts the batch-specific types are computed
    on; ZERO uses the clean prompts for shapes only; the dataset-wide means come from
    ``dataset_mean`` (:func:`dataset_mean_ablation`). Padded prompts run with their
    attention mask.
    """
    n = batch.clean.shape[0]
    if ablation_type.mean_over_dataset:
        if dataset_mean is None:
            raise ValueError(f"{ablation_type.name} needs the dataset mean (dataset_mean_ablation)")
        return dataset_mean[:, :n]
    which = which or "clean"
    tokens = batch.clean if which == "clean" else batch.corrupt
    kwargs = forward_kwargs(batch, which)
    if not kwargs:
        return src_ablations(pm, tokens, ablation_type)
    with torch.no_grad():
        outs = record_src_outs(pm, tokens, **kwargs)[1]
    if ablation_type == AblationType.RESAMPLE:
        return outs
    if ablation_type == AblationType.ZERO:
        return torch.zeros_like(outs)
    if ablation_type == AblationType.BATCH_TOKENWISE_MEAN:
        return outs.mean(dim=1, keepdim=True).expand_as(outs).contiguous()
    return outs.mean(dim=(1, 2), keepdim=True).expand_as(outs).contiguous()


def check_prune_scores(pm, prune_scores: Mapping[str, torch.Tensor]) -> None:
    """``prune_scores`` must have exactly ``pm``'s mask keys and shapes."""
    if not isinstance(prune_scores, Mapping):
        raise TypeError(f"prune_scores must be a dict (dest module name -> tensor), got {type(prune_scores).__name__}")
    expected = {m.module_name: m.mask_shape(pm.graph.seq_len) for m in pm.graph.dest_modules}
    missing, extra = sorted(set(expected) - set(prune_scores)), sorted(set(prune_scores) - set(expected))
    if missing or extra:
        raise ValueError(f"prune_scores keys do not match the graph's destination modules: missing {missing}, "
                         f"unexpected {extra}")
    for k, shape in expected.items():
        if tuple(prune_scores[k].shape) != tuple(shape):
            raise ValueError(f"prune_scores[{k!r}] has shape {tuple(prune_scores[k].shape)}; the graph's mask "
                             f"has shape {tuple(shape)}")


# --------------------------------------------------------------------------------------
# Circuits


def _row_major(idx: Sequence[int], shape: Sequence[int]) -> int:
    flat = 0
    for i, n in zip(idx, shape):
        flat = flat * n + i
    return flat


def edge_ranks(pm, prune_scores: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Each edge's rank (0 = first) when edges are sorted by ``|score|``, highest first,
    ties in the graph's edge order ``pm.graph.edges`` (a stable sort over that order).

    The circuit of exactly k edges is ``rank < k``. Infinite scores rank first.

    Returns:
        ``{dest module: int64 [seq?, heads?, n_in_srcs]}`` (ranks on the scores' devices).

    Raises:
        ValueError: keys/shapes that do not match ``pm``'s masks, NaN scores.
    """
    check_prune_scores(pm, prune_scores)
    names = [m.module_name for m in pm.graph.dest_modules]
    flat = torch.cat([prune_scores[n].detach().reshape(-1).to("cpu", torch.float64) for n in names]).abs()
    if torch.isnan(flat).any():
        bad = [n for n in names if torch.isnan(prune_scores[n]).any()]
        raise ValueError(f"prune_scores contain NaN in {bad}; edges cannot be ranked by NaN scores")
    offsets, start = {}, 0
    for n in names:
        offsets[n], start = start, start + prune_scores[n].numel()
    # each graph edge's position in ``flat`` (row-major within its module), in graph order
    index = torch.tensor([offsets[e.dest.module_name]
                          + _row_major(e.patch_idx, prune_scores[e.dest.module_name].shape)
                          for e in pm.graph.edges], dtype=torch.long)
    order = torch.sort(flat[index], descending=True, stable=True).indices
    ranks = torch.full((flat.numel(),), flat.numel(), dtype=torch.long)  # entries that are no edge: never in
    ranks[index[order]] = torch.arange(order.numel())
    return {n: ranks[offsets[n]:offsets[n] + prune_scores[n].numel()].reshape(prune_scores[n].shape)
            .to(prune_scores[n].device) for n in names}


def circuit_masks(pm, prune_scores: Mapping[str, torch.Tensor], edge_count: int,
                  patch_type: Union[PatchType, str] = PatchType.EDGE_PATCH,
                  desc_scores: Optional[torch.Tensor] = None, *,
                  ranks: Optional[Mapping[str, torch.Tensor]] = None) -> Tuple[Dict[str, torch.Tensor], int]:
    """Masks that patch the circuit of (nominal) size ``edge_count``, and its real size.

    Without ``ranks`` the circuit is every edge with ``|score| >= threshold`` (the
    ``edge_count``-th highest ``|score|``; ``+inf`` for 0 edges), so ties at the
    threshold are all included. With ``ranks`` (:func:`edge_ranks`) it is the edges of
    rank ``< edge_count``: exactly ``edge_count`` edges.
    EDGE_PATCH: mask 1 on the circuit; TREE_PATCH: mask 1 everywhere else.

    Returns:
        ``({dest module: mask [seq?, heads?, n_in_srcs]}, real circuit size)``; the masks
        have the model's dtype and device whatever the scores' are.
    """
    patch_type = as_patch_type(patch_type)
    desc = desc_prune_scores(prune_scores) if desc_scores is None else desc_scores
    threshold = prune_scores_threshold(desc, edge_count)  # also validates edge_count
    template = init_state(pm).masks
    masks, size = {}, 0
    for m in pm.graph.dest_modules:
        scores = prune_scores[m.module_name]
        like = template[m.module_name]
        if ranks is None:
            in_circuit = scores.abs() >= threshold.to(scores.device)
        else:
            in_circuit = ranks[m.module_name] < edge_count
        size += int(in_circuit.sum())
        keep = in_circuit if patch_type == PatchType.EDGE_PATCH else ~in_circuit
        masks[m.module_name] = keep.to(dtype=like.dtype, device=like.device)
    return masks, size


def tile(x: torch.Tensor, n: int, dim: int = 0) -> torch.Tensor:
    """``x`` repeated ``n`` times along ``dim``."""
    return x.repeat(*[n if i == dim else 1 for i in range(x.dim())])


def stacked_patched_forward(pm, state, tokens: torch.Tensor, kwargs, repeats: int, resume=None):
    """:func:`patched_forward` of ``repeats`` circuits side by side along the batch: the
    inputs ``tokens`` (and tensor ``kwargs``) are tiled ``repeats`` times, ``state.masks``
    hold one row per stacked row and ``state.patch_src_outs`` is the untiled batch's.
    ``resume=(point, resid, src_outs)`` (a clean checkpoint of the untiled batch,
    ``pm.forward.checkpoints``) starts there (:meth:`funcpatch.forward.PatchForward.resumed`).
    """
    tokens = tile(tokens, repeats)
    kwargs = {k: tile(v, repeats) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    point, resid, src_outs = resume or ((0, 0), None, None)
    return pm.forward.resumed(pm, state, point, None if resid is None else tile(resid, repeats), src_outs,
                              (tokens,), kwargs, repeats)


# Stacked circuits per forward (run_circuits(vmap_sizes=True), vmap_chunk_size=None): as
# many as keep the stacked inputs of the largest destination group (e.g. every Q/K/V
# head slot of a layer, ``[slots, rows, seq, d]``) within this many elements. Measured on
# the benchmark's models: stacking pays where per-operation overhead dominates (2-layer,
# d_model 64: 2-3 circuits per forward 0.7x the time of one at a time) and costs once
# the stacked intermediates outgrow the caches (4 layers, d_model 256: 3 or more 1.2-1.5x).
_STACK_BUDGET = 2 ** 20


def _sizes_per_forward(pm, rows: int, patch: torch.Tensor) -> int:
    slots: Dict[Tuple[int, int], int] = {}
    for d in pm.graph.dest_modules:
        slots[d.in_srcs] = slots.get(d.in_srcs, 0) + (d.n_heads or 1)
    per_circuit = max(slots.values(), default=1) * rows * patch[0, 0].numel()
    return max(1, _STACK_BUDGET // per_circuit)


def _stack(mask_sets: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {k: torch.stack([m[k] for m in mask_sets]) for k in mask_sets[0]}


def run_circuits(pm, dataloader, test_edge_counts: Sequence[int], prune_scores: Mapping[str, torch.Tensor],
                 patch_type: Union[PatchType, str] = PatchType.EDGE_PATCH,
                 ablation_type: Union[AblationType, str] = AblationType.RESAMPLE,
                 reverse_clean_corrupt: bool = False, render_graph: bool = False, progress: bool = True,
                 vmap_sizes: bool = False, vmap_chunk_size: Optional[int] = None,
                 exact_sizes: bool = False) -> CircuitOutputs:
    """Run every batch with each circuit size in ``test_edge_counts`` patched.

    Semantics (auto-circuit's ``run_circuits``): with EDGE_PATCH the model runs on the
    *corrupt* prompts and the circuit's edges are patched with the ablation computed on
    the *clean* prompts; with TREE_PATCH it runs on the *clean* prompts and the edges
    outside the circuit are patched with the ablation computed on the *corrupt* prompts.
    ``reverse_clean_corrupt`` swaps the two roles. The dataset-wide ablation types are
    computed once over ``dataloader``. With RESAMPLE, for both patch types, 0 edges gives
    the corrupt run and all edges the clean run (with ``reverse_clean_corrupt``: the
    other way round); in between they differ (a patched edge carries the other run's
    source output, an unpatched one the source output of the patched run itself).

    Ties: by default (auto-circuit's rule) the circuit of nominal size k holds every edge
    whose ``|score|`` is ``>=`` the k-th highest, and the outputs are keyed by that real
    size. With ``exact_sizes=True`` it holds exactly k edges: the top k of
    :func:`edge_ranks` (ties broken by the graph's edge order), keyed by k.

    Args:
        pm: the patchable model.
        dataloader: a PromptDataLoader (or an iterable of PromptPairBatch).
        test_edge_counts: nominal circuit sizes, each in ``[0, n_edges]``
            (see :func:`funcpatch.edge_counts.edge_counts_util`).
        prune_scores: PruneScores (dest module -> ``[seq?, heads?, n_in_srcs]``).
        patch_type: PatchType (or its name).
        ablation_type: AblationType (or its name).
        reverse_clean_corrupt: swap the clean and corrupt prompts (input and patches).
        render_graph: not supported (funcpatch has no graph renderer); True raises.
        progress: show tqdm progress bars.
        vmap_sizes: evaluate all sizes of a batch at once, vectorised: one patched forward
            with the circuits side by side along the batch (per-row masks), which keeps
            funcpatch's fast no-grad path (``torch.func.vmap`` over the masks gives the same
            outputs, slower). Same outputs as the sequential loop.
        vmap_chunk_size: with ``vmap_sizes``, the most sizes per forward. None: as many as
            keep the stacked inputs of one destination group within 2**20 elements
            (stacking pays on small models and costs on large ones, whose stacked
            intermediates outgrow the caches; on large ones this is one size per forward).
        exact_sizes: circuits of exactly the requested sizes (see Ties above).

    Returns:
        ``{real edge count: {batch.key: model output[pm.out_slice]}}`` (detached), sizes in
        the order of ``test_edge_counts``.
    """
    if render_graph:
        raise NotImplementedError("render_graph=True: funcpatch has no graph renderer; plot the circuit yourself")
    patch_type = as_patch_type(patch_type)
    ablation_type = as_ablation_type(ablation_type)
    check_prune_scores(pm, prune_scores)
    counts = list(test_edge_counts)
    batches = materialize_batches(dataloader)
    desc = desc_prune_scores(prune_scores)
    ranks = edge_ranks(pm, prune_scores) if exact_sizes else None
    circuits = [circuit_masks(pm, prune_scores, c, patch_type, desc, ranks=ranks) for c in counts]  # validates counts

    # unique real sizes, in the order first requested (equal sizes mean equal circuits)
    unique: Dict[int, Dict[str, torch.Tensor]] = {}
    for masks, size in circuits:
        unique.setdefault(size, masks)
    sizes = list(unique)

    run_on_clean = (patch_type == PatchType.TREE_PATCH) != bool(reverse_clean_corrupt)
    input_which = "clean" if run_on_clean else "corrupt"
    patch_which = "corrupt" if run_on_clean else "clean"
    dataset_mean = dataset_mean_ablation(pm, dataloader, ablation_type)

    out: CircuitOutputs = {s: {} for s in sizes}
    template = init_state(pm)
    stacked = _stack([unique[s] for s in sizes]) if vmap_sizes else None
    mine = distributed.my_batches(batches)  # all of them without a process group
    bar = progress_bar(total=len(mine) * len(sizes), progress=progress, desc="Running circuits")
    local: List[Dict[int, torch.Tensor]] = []  # per batch: {real size: output}
    with torch.no_grad():
        for batch in (batches[i] for i in mine):
            got = {}
            local.append(got)
            tokens = batch.clean if input_which == "clean" else batch.corrupt
            kwargs = {**forward_kwargs(batch, input_which), **last_position_kwargs(pm)}
            patch = batch_patch_values(pm, batch, patch_which, ablation_type, dataset_mean)
            state = patch_mode(pm, template, patch)

            def run(masks, state=state, tokens=tokens, kwargs=kwargs):
                return patched_forward(pm, dataclasses.replace(state, masks=masks), tokens, **kwargs)[pm.out_slice]

            if vmap_sizes:
                rows = tokens.shape[0]
                step = vmap_chunk_size or _sizes_per_forward(pm, rows, patch)
                for a in range(0, len(sizes), step):
                    # the circuits of these sizes side by side along the batch: per-row masks
                    chunk = {k: v[a:a + step].repeat_interleave(rows, dim=0) for k, v in stacked.items()}
                    n = len(sizes[a:a + step])
                    outs = stacked_patched_forward(pm, dataclasses.replace(state, masks=chunk), tokens, kwargs,
                                                   n)[pm.out_slice]
                    outs = outs.reshape(n, rows, *outs.shape[1:])
                    for i, s in enumerate(sizes[a:a + step]):
                        got[s] = outs[i].detach().clone()
                    bar.update(n)
            else:
                for s in sizes:
                    got[s] = run(unique[s]).detach().clone()
                    bar.update(1)
    bar.close()
    for batch, got in zip(batches, distributed.gather_in_order(local, len(batches), _param_device(pm))):
        for s in sizes:
            out[s][batch.key] = got[s]
    return out
