"""MIB's circuit evaluation (``evaluate_area_under_curve`` of MIB's circuit track).

For each of MIB's percentages ``p`` the circuit is the top ``int(p * n_edges)`` edges by
``|score|`` (or by score), pruned of the edges that no longer connect the input to the
logits; the model runs with every edge outside it patched (an *intervention*) and its
metric is normalised between the empty circuit (0) and the full model (1).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch

from funcpatch import distributed
from funcpatch.circuits import check_prune_scores, forward_kwargs, materialize_batches
from funcpatch.forward import patched_forward, record_src_outs
from funcpatch.intervene import intervene
from funcpatch.metrics import _trapezoid, answer_diff, faithfulness
from funcpatch.mib.formats import _edge_cells, _forward_to_backward, check_mib_graph, mib_cfg
from funcpatch.patches import RecordPatch
from funcpatch.state import init_state, patch_mode

__all__ = ["FRACTIONS", "INTERVENTIONS", "METRICS", "MibResults", "evaluate", "evaluate_circuits", "mib_circuit"]

#: MIB's interventions: ``patching`` (the corrupt prompts' values), ``zero``, ``mean`` and
#: ``mean-positional`` (means over ``intervention_dataloader``'s clean prompts)
INTERVENTIONS = ("patching", "zero", "mean", "mean-positional")
#: MIB's circuit sizes as fractions of the edges, as its code writes them (``int(p * n)`` edges;
#: :data:`funcpatch.metrics.MIB_PERCENTAGES` are the same in percent)
FRACTIONS = (.001, .002, .005, .01, .02, .05, .1, .2, .5, 1)
#: MIB's metrics at the last position: answer minus wrong answer, of the logits or the probabilities
#: (mean over a prompt's answers); ``prob_mass_diff``: the summed probability of the answers minus
#: that of the wrong answers (EAP-IG/MIB's greater-than metric, with read_dataset_csv's year answers)
METRICS = ("logit_diff", "prob_diff", "prob_mass_diff")
Metric = Union[str, Callable[[torch.Tensor, object], torch.Tensor]]


@dataclass(frozen=True)
class MibResults:
    """The five results of MIB's ``evaluate_area_under_curve``, in its order (also unpacks
    as a tuple): circuit sizes, CPR (area under the faithfulness curve), CMD (area between
    it and 1), the mean faithfulness, and the faithfulness at each of ``fractions``."""

    weighted_edge_counts: List[float]
    area_under: float
    area_from_1: float
    average: float
    faithfulnesses: List[float]
    fractions: Tuple[float, ...] = FRACTIONS

    def __iter__(self):
        return iter((self.weighted_edge_counts, self.area_under, self.area_from_1, self.average,
                     self.faithfulnesses))


def _prune(in_graph: torch.Tensor, f2b: torch.Tensor) -> torch.Tensor:
    """Drop, to a fixed point, every edge whose source lacks an outgoing edge or (but the
    input) an incoming one, or whose destination's node is out (the logits never are)."""
    while True:
        has_in = (f2b & in_graph.any(dim=0)).any(dim=1)
        has_in[0] = True
        nodes = in_graph.any(dim=1) & has_in
        cols = (nodes[:, None] & f2b).any(dim=0)
        cols[-1] = True
        pruned = in_graph & nodes[:, None] & cols[None, :]
        if torch.equal(pruned, in_graph):
            return pruned
        in_graph = pruned


def mib_circuit(pm, scores: Mapping[str, torch.Tensor], n: int, absolute: bool = True) -> Dict[str, torch.Tensor]:
    """MIB's circuit of ``n`` edges: ``apply_topn(n, absolute, prune=True)``.

    The top ``n`` edges by ``|score|`` (``absolute``) or by score; ties are broken by
    EAP-IG's matrix order (source's forward index, then destination's backward index),
    where EAP-IG's unstable ``argsort`` leaves them unspecified. Then the edges that no
    longer connect the input to the logits are pruned (so the circuit may have fewer
    than ``n`` edges).

    Returns:
        bool masks, dest module -> ``[heads?, n_in_srcs]``: True = in the circuit.
    """
    check_prune_scores(pm, scores)
    cfg = mib_cfg(pm)
    cells = list(_edge_cells(pm, cfg))
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(cells):
        raise ValueError(f"n must be an int in [0, {len(cells)}] (the graph's edges), got {n!r}")
    f2b = _forward_to_backward(cfg)
    matrix = torch.full(f2b.shape, -math.inf, dtype=torch.float64)
    for e, _, r, c in cells:
        s = float(e.prune_score(scores))
        matrix[r, c] = abs(s) if absolute else s
    order = torch.sort(matrix.flatten(), descending=True, stable=True).indices[:n]
    chosen = torch.zeros(matrix.numel(), dtype=torch.bool)
    chosen[order] = True
    in_graph = _prune(chosen.view(f2b.shape), f2b)
    out = {m.module_name: torch.zeros(m.mask_shape(None), dtype=torch.bool) for m in pm.graph.dest_modules}
    for e, _, r, c in cells:
        out[e.dest.module_name][e.patch_idx] = bool(in_graph[r, c])
    return out


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def _prob_mass_diff(logits: torch.Tensor, batch) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    return torch.stack([p[a].sum() - p[w].sum() for p, a, w in zip(probs, batch.answers, batch.wrong_answers)])


def _metric_fn(metric: Metric) -> Callable[[torch.Tensor, object], torch.Tensor]:
    if callable(metric):
        return metric
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid: {list(METRICS)} or a callable "
                         "(last-position logits [batch, vocab], batch) -> [batch]")
    if metric == "prob_mass_diff":
        return _prob_mass_diff
    kind = "logit" if metric == "logit_diff" else "prob"
    return lambda logits, batch: answer_diff(logits, batch.answers, batch.wrong_answers, kind, per_prompt=True)


def _token_embedding(pm, tokens, kwargs) -> torch.Tensor:
    """MIB's input node: ``hook_embed``, the token embedding alone ``[batch, seq, d_model]``
    (a transformers model's own input embedding)."""
    if "hook_embed" in getattr(pm.model, "hook_dict", {}):
        _, rec = intervene(pm.model, {"hook_embed": RecordPatch()}, tokens, **kwargs)
        return rec["hook_embed"][0]
    if callable(getattr(pm.model, "get_input_embeddings", None)):
        return pm.model.get_input_embeddings()(tokens)
    raise ValueError(f"{type(pm.model).__name__} has no hook_embed (MIB's input node) nor get_input_embeddings()")


def _lengths(batch) -> torch.Tensor:
    mask = getattr(batch, "attention_mask", None)
    if mask is None:
        return torch.full((batch.clean.shape[0],), batch.clean.shape[1])
    return mask.sum(dim=1)


def _means(pm, loader, positional: bool) -> torch.Tensor:
    """MIB's means over ``loader``'s clean prompts, every source (the input: token embedding).

    ``mean-positional``: ``[n_src, seq, d_model]``, the mean over prompts at each position.
    ``mean``: ``[d_model]``, as MIB's code (EAP-IG's ``compute_mean_activations``) computes
    it: per prompt, each source's value at its last real token divided by the prompt's
    length, averaged over prompts, then averaged over all sources.
    """
    total, parts = 0, []
    batches = materialize_batches(loader, "intervention_dataloader")
    with torch.no_grad():
        for b in (batches[i] for i in distributed.my_batches(batches)):
            kwargs = forward_kwargs(b, "clean")
            outs = record_src_outs(pm, b.clean, **kwargs)[1]
            # (over several devices the sources are on the last block's device, the embedding on the first's)
            outs = torch.cat([_token_embedding(pm, b.clean, kwargs)[None].to(outs), outs[1:]])
            if positional:
                if getattr(b, "attention_mask", None) is not None and not bool(b.attention_mask.all()):
                    raise ValueError("mean-positional needs unpadded prompts of one length (MIB's positions "
                                     "count from the first token; funcpatch pads on the left)")
                part = outs.sum(dim=1)
            else:
                part = (outs[:, :, -1] / _lengths(b).to(outs)[None, :, None]).sum(dim=1)
            parts.append((part, b.clean.shape[0]))
    acc = None
    for part, n in distributed.gather_in_order(parts, len(batches)):  # batch order: one process's sums
        if acc is not None and part.shape != acc.shape:
            raise ValueError(f"mean-positional: prompts of different lengths ({tuple(part.shape)} vs "
                             f"{tuple(acc.shape)}); MIB's positional mean needs one length")
        acc = part if acc is None else acc + part
        total += n
    if acc is None:
        raise ValueError("intervention_dataloader has no batches")
    acc = acc / total
    return acc if positional else acc.mean(dim=0)


def _patch_values(pm, batch, intervention, means) -> torch.Tensor:
    """``[n_src, batch, seq, d_model]``: what each source's edges out of the circuit carry."""
    kwargs = forward_kwargs(batch, "clean")
    if intervention == "patching":
        return record_src_outs(pm, batch.corrupt, **forward_kwargs(batch, "corrupt"))[1]
    clean = record_src_outs(pm, batch.clean, **kwargs)[1]
    # MIB ablates the token embedding only: Resid Start keeps its position embedding
    position = clean[0] - _token_embedding(pm, batch.clean, kwargs).to(clean.dtype)
    if intervention == "zero":
        patch = torch.zeros_like(clean)
    elif intervention == "mean":
        patch = means.to(clean).expand_as(clean).clone()
    else:
        if means.shape[1] != clean.shape[2]:
            raise ValueError(f"mean-positional: the means span {means.shape[1]} positions, the prompts "
                             f"{clean.shape[2]}")
        patch = means.to(clean)[:, None].expand_as(clean).clone()
    patch[0] = patch[0] + position
    return patch


def evaluate(pm, dataloader, scores: Mapping[str, torch.Tensor], intervention: str = "patching",
             absolute: bool = True, log_scale: bool = False, metric: Metric = "logit_diff",
             intervention_dataloader=None) -> MibResults:
    """MIB's ``evaluate_area_under_curve`` at the edge level, on funcpatch's graph.

    For ``p`` in :data:`FRACTIONS`: the circuit
    :func:`mib_circuit` ``(int(p * n_edges))``; every edge outside it is patched with
    ``intervention``'s value; faithfulness ``(m(C) - m(empty)) / (m(full) - m(empty))``
    with ``m`` the metric averaged over all prompts, ``m(full)`` the unpatched model and
    ``m(empty)`` the circuit of 0 edges. CPR (``area_under``) and CMD (``area_from_1``)
    are trapezoid sums over the percentages (their logarithms with ``log_scale``).

    Args:
        pm: a PatchableModel whose graph MIB can express (:func:`check_mib_graph`).
        dataloader: prompt pairs (clean, corrupt, answers, wrong answers); the metric is
            read at the last position (funcpatch's loaders pad on the left).
        scores: PruneScores, dest module -> ``[heads?, n_in_srcs]``.
        intervention: ``"patching"`` (corrupt prompts' values), ``"zero"``, ``"mean"``,
            ``"mean-positional"`` (means over ``intervention_dataloader``'s clean prompts).
            MIB's input node is the token embedding alone: zero and mean ablations of it
            keep the position embedding (funcpatch's Resid Start patch value is the
            position embedding plus the ablated token embedding).
        metric: ``"logit_diff"`` / ``"prob_diff"`` (answer minus wrong answer, mean over
            each prompt's answers), ``"prob_mass_diff"`` (summed probabilities: MIB's
            greater-than), or ``fn(logits [batch, vocab], batch) -> [batch]``.

    Returns:
        :class:`MibResults`: ``(weighted_edge_counts, area_under, area_from_1, average,
        faithfulnesses)``; the edge counts are those of the pruned circuits evaluated.

    Known differences from MIB's code (at EAP-IG commit 7af394a, which MIB pins): its
    ``apply_topn`` prunes a single pass before counting edges, while its evaluation prunes
    to a fixed point, so the counts it reports can exceed the circuits it evaluates
    (later EAP-IG counts the evaluated circuit, as here); ties in ``|score|`` are
    ordered here (see :func:`mib_circuit`), where its ``argsort`` leaves them
    unspecified. ``"mean"`` reproduces its code's arithmetic (see ``_means``), which is
    not a per-source mean. Agreement measured on the zoo's ioi model against MIB's code:
    tests/test_mib.py, to 1e-4.
    """
    check_prune_scores(pm, scores)
    n_edges = pm.graph.n_edges
    circuits = [mib_circuit(pm, scores, int(p * n_edges), absolute) for p in FRACTIONS]
    return _curve(pm, dataloader, mib_circuit(pm, scores, 0, absolute), circuits, FRACTIONS, intervention,
                  log_scale, metric, intervention_dataloader)


def evaluate_circuits(pm, dataloader, circuits, intervention: str = "patching", log_scale: bool = False,
                      metric: Metric = "logit_diff", intervention_dataloader=None) -> MibResults:
    """:func:`evaluate` for given binary circuits (a MIB submission of circuits, not scores).

    Args:
        circuits: bool masks (dest module -> ``[heads?, n_in_srcs]``, True = in the
            circuit), e.g. the in-graph flags :func:`funcpatch.mib.load` returns; each is
            pruned as MIB's evaluation prunes, then evaluated.

    Returns:
        :class:`MibResults` whose ``fractions`` are the pruned circuits' edge fractions,
        sorted (CPR and CMD run over those, not over MIB's fixed fractions).
    """
    check_mib_graph(pm)
    if not circuits:
        raise ValueError("circuits is empty: give at least one in-graph mask dict")
    pruned = []
    for c in circuits:
        check_prune_scores(pm, c)
        pruned.append(mib_circuit(pm, {k: v.float() for k, v in c.items()}, int(sum(int(v.sum()) for v in c.values())),
                                  absolute=False))
    sizes = [sum(int(v.sum()) for v in c.values()) for c in pruned]
    order = sorted(range(len(pruned)), key=lambda i: sizes[i])
    fractions = tuple(sizes[i] / pm.graph.n_edges for i in order)
    if log_scale and fractions[0] == 0:
        raise ValueError("log_scale needs circuits with at least one edge (log of the fraction 0)")
    empty = {k: torch.zeros_like(v) for k, v in pruned[0].items()}
    return _curve(pm, dataloader, empty, [pruned[i] for i in order], fractions, intervention, log_scale, metric,
                  intervention_dataloader)


def _curve(pm, dataloader, empty_circuit, circuits, fractions, intervention, log_scale, metric,
           intervention_dataloader) -> MibResults:
    """Faithfulness of each circuit (against the full model and ``empty_circuit``), and the areas."""
    check_mib_graph(pm)
    if intervention not in INTERVENTIONS:
        raise ValueError(f"unknown intervention {intervention!r}; valid: {list(INTERVENTIONS)}")
    metric_fn = _metric_fn(metric)
    means = None
    if "mean" in intervention:
        if intervention_dataloader is None:
            raise ValueError(f"intervention={intervention!r} needs intervention_dataloader (prompts to average over)")
        means = _means(pm, intervention_dataloader, intervention == "mean-positional")
    elif intervention_dataloader is not None:
        raise ValueError(f"intervention_dataloader is used by the mean interventions only, not {intervention!r}")
    batches = materialize_batches(dataloader)
    template = init_state(pm)

    mine = distributed.my_batches(batches)  # all of them without a process group
    with torch.no_grad():
        prepared = [(b, forward_kwargs(b, "clean"), _patch_values(pm, b, intervention, means))
                    for b in (batches[i] for i in mine)]

        def score(in_graph: Optional[Dict[str, torch.Tensor]]) -> float:
            values = []
            for b, kwargs, patch in prepared:
                if in_graph is None:
                    out = pm.model(b.clean, **kwargs)
                else:
                    masks = {k: (~v).to(template.masks[k]) for k, v in in_graph.items()}
                    state = dataclasses.replace(patch_mode(pm, template, patch), masks=masks)
                    out = patched_forward(pm, state, b.clean, **kwargs)
                values.append(metric_fn(_logits(out)[:, -1], b).reshape(-1))
            # every batch's values, in batch order on every rank (the same mean as one process)
            return float(torch.cat(distributed.gather_in_order(values, len(batches))).mean())

        baseline = score(None)
        empty = score(empty_circuit)
        counts = [float(sum(int(v.sum()) for v in c.values())) for c in circuits]
        faith = [faithfulness(score(c), empty, baseline) for c in circuits]
    xs = [math.log(p) for p in fractions] if log_scale else list(fractions)
    return MibResults(counts, _trapezoid(xs, faith), _trapezoid(xs, [abs(1 - f) for f in faith]),
                      sum(faith) / len(faith), faith, tuple(fractions))
