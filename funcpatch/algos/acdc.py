"""ACDC: greedy edge pruning against a faithfulness threshold τ (Conmy et al., 2023).

Semantics (those of auto-circuit's ``acdc_prune_scores``):

* Only the **first batch** of the dataloader is used. The model runs on its *clean*
  prompts; a removed edge carries the ablation value (RESAMPLE: the source's output on
  the *corrupt* prompts).
* For every ``τ = base * 10**exp`` (``product(tao_bases, tao_exps)``) an independent
  greedy run starts with every edge kept (all masks 0) and ``prev = 0.0``. It visits
  every edge once, destinations in **reverse topological order** (by destination
  layer, last layer first). Visiting edge ``e``: remove it together with the edges
  removed so far and measure ``faith`` = KL(clean output || circuit output) (or the
  MSE between them) on ``out[pm.out_slice]``. If ``faith - prev < τ`` the edge stays
  removed and ``prev = faith``; otherwise it is put back.
* Returned PruneScores: ``+inf`` for an edge no run removed, else the smallest τ at
  which a run removed it. Higher score = more important (kept up to a larger τ).

Edge order (fixed, independent of Python's hash seed): ``pm.graph.edges`` stably sorted
by destination layer, descending. Within a layer the graph order holds: token position,
destination module (Q, K, V inputs of each head, then the MLP input, as built),
head, then source index ascending — so a destination's incoming edges are tried from
the earliest source (the embedding) to the latest. :func:`acdc_edge_order` returns it.

How it is fast while staying exact
----------------------------------
A circuit's output depends only on which edges are removed (its mask), so any set of
masks can be evaluated together: funcpatch stacks them along the batch dimension (mask
``[K * batch, ...]``, inputs tiled ``K`` times) and runs one patched forward. Two things
are evaluated together each step:

1. **All τ runs.** The runs are independent, so their next candidates go in one
   forward. Runs in the same state (same removed set) share one evaluation.
2. **Speculation** (``lookahead > 1``). The greedy walk within a run is sequential:
   whether edge ``i`` is removed changes the baseline of edge ``i + 1``. A run predicts
   that its next decisions repeat its last one and, when its current streak of equal
   decisions is ``k`` long, evaluates the candidates of its next ``min(k, lookahead)``
   edges *assuming those predictions* (removing the earlier ones of them if the
   prediction is "remove"). Decisions are then taken in order exactly as in the
   sequential algorithm; at the first decision that differs from its prediction the
   later candidates are discarded (their baseline was wrong) and the run continues from
   there in the next step. Every decision is therefore made on exactly the mask the
   sequential algorithm would use; speculation only changes how many forwards it takes
   (at least one decision per run per step). ACDC decisions come in long streaks (a
   destination's unimportant inputs, or every input of an important one), so this cuts
   the number of sequential forwards severalfold for typically 10-30% extra candidates.

3. **Only what a circuit changes** (where ``pm.forward.checkpoints`` offers resume
   points: funcpatch's own forward, :mod:`funcpatch.decoder`, except Gemma-2). Every edge into a destination before a circuit's first removed edge
   is kept, so up to there the circuit runs exactly as the clean forward. One clean
   forward records the residual at every checkpoint (each block's attention and MLP,
   and the end) and every source's output; each evaluation resumes at the checkpoint
   of its earliest removed edge, the patch values and the earlier outputs serving all
   ``K`` circuits untiled. Head slots whose masks are 0 in every circuit read the
   residual unpatched, and with ``slice_output="last_seq"`` the last block's tail and
   the unembedding run at the last position only. Elsewhere every candidate runs
   through the whole patched forward.

Measured on the benchmark's 2-layer model (``benchmarks/``): 0.34-0.35 s for two τ
values, against 1.8-2.2 s for auto-circuit's ``acdc_prune_scores`` on the same weights
and data (same scores on every edge).

Results equal the one-mask-at-a-time algorithm up to floating-point differences
between batch sizes (about 1e-7 relative), which matter only for a ``faith - prev``
within that distance of τ.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from itertools import product
from typing import Dict, List, Literal, Optional, Sequence, Tuple, Union

import torch

from funcpatch import distributed
from funcpatch.ablation import AblationType, as_ablation_type
from funcpatch.circuits import (batch_patch_values, dataset_mean_ablation, forward_kwargs, last_position_kwargs,
                                progress_bar, resolve_clean_corrupt, stacked_patched_forward)
from funcpatch.data import batch_rows
from funcpatch.forward import patched_forward
from funcpatch.graph import Edge
from funcpatch.patchable import PatchableModel
from funcpatch.state import init_state, patch_mode

__all__ = ["acdc", "acdc_runs", "acdc_taus", "acdc_edge_order", "AcdcRun", "ACDC_FAITHFULNESS_TARGETS",
           "AcdcSelfCheckError"]

PruneScores = Dict[str, torch.Tensor]
ACDC_FAITHFULNESS_TARGETS = ("kl_div", "mse")
DEFAULT_TAO_EXPS = (-5, -4, -3, -2)
DEFAULT_TAO_BASES = (1, 3, 5, 7, 9)
_ROW_BUDGET = 2 ** 26  # elements of tiled patch values per forward (max_batch_rows=None)


class AcdcSelfCheckError(AssertionError):
    """``test_mode=True`` found a step whose output differs from the independent recomputation."""


@dataclass(frozen=True)
class AcdcRun:
    """The result of one greedy ACDC run at threshold ``tau``.

    removed: the removed edges, in the order they were removed.
    faithfulness: the metric of the final circuit (the run's last accepted ``faith``,
        0.0 when nothing was removed — the seed's starting ``prev``).
    """

    tau: float
    removed: Tuple[Edge, ...]
    faithfulness: float


def acdc_taus(tao_exps: Sequence[numbers.Real] = DEFAULT_TAO_EXPS,
              tao_bases: Sequence[numbers.Real] = DEFAULT_TAO_BASES) -> List[float]:
    """The thresholds ``[base * 10**exp for base, exp in product(tao_bases, tao_exps)]``
    (the seed's order: bases outer, exponents inner)."""
    grids = []
    for what, xs in (("tao_exps", tao_exps), ("tao_bases", tao_bases)):
        if isinstance(xs, (str, bytes)) or not hasattr(xs, "__iter__"):
            raise TypeError(f"{what} must be a sequence of numbers, got {type(xs).__name__}")
        xs = list(xs)
        if not xs:
            raise ValueError(f"{what} is empty: give at least one value")
        bad = [x for x in xs if isinstance(x, bool) or not isinstance(x, numbers.Real) or math.isnan(x)]
        if bad:
            raise TypeError(f"{what} must hold real numbers, got {bad}")
        grids.append(xs)
    exps, bases = grids
    return [a * 10 ** b for a, b in product(bases, exps)]


def acdc_edge_order(pm: PatchableModel) -> Tuple[Edge, ...]:
    """The order ACDC visits edges: ``pm.graph.edges`` stably sorted by destination layer,
    descending (reverse topological). Deterministic: it never iterates a set."""
    return tuple(sorted(pm.graph.edges, key=lambda e: -e.dest.layer))


# --------------------------------------------------------------------------------------
# Evaluating many circuits in one forward


class _Evaluator:
    """Faithfulness of circuits given as boolean "removed" vectors over ``pm.graph.edges``.

    ``evaluate(removed [K, n_edges] bool) -> (faith [K] list of floats, outs [K, batch, ...])``.
    """

    def __init__(self, pm, tokens, kwargs, patch, clean_out, target, max_rows, lean_kwargs):
        self.pm, self.tokens, self.kwargs, self.patch = pm, tokens, kwargs, patch
        self.lean_kwargs = lean_kwargs
        self.clean_out, self.target = clean_out, target
        self.clean_probs = None  # (q, log q) of the clean outputs, for KL
        self.batch = tokens.shape[0]
        self.max_k = max(1, max_rows // self.batch)
        g = pm.graph
        n = g.n_edges
        self.template = init_state(pm)
        # module -> LongTensor of the mask's shape holding each entry's edge id (n = none).
        index = {m: torch.full(t.shape, n, dtype=torch.long) for m, t in self.template.masks.items()}
        self.device = next(iter(self.template.masks.values())).device if index else patch.device
        for i, e in enumerate(g.edges):
            index[e.dest.module_name][e.patch_idx] = i
        self.index = {m: idx.to(self.device) for m, idx in index.items()}
        self.dtype = next(iter(self.template.masks.values())).dtype if index else torch.float32
        # Resuming: with a lean forward, a circuit whose removed edges all lie at or after a
        # checkpoint (a block's attention or MLP, or the end) runs exactly as the clean
        # forward before it, so its forward starts there.
        rec = pm.forward.checkpoints(pm, (tokens,), {**kwargs, **lean_kwargs}) if g.factorized else None
        self.checkpoints = rec[2] if rec is not None and rec[2] else None
        if self.checkpoints is not None:
            self.src_outs = rec[1]
            # checkpoint index 2 * block + stage of each edge's destination; the last entry: none removed
            self.edge_point = torch.tensor([_dest_point(e.dest.module_name) for e in g.edges] +
                                           [2 * max(b for b, _ in self.checkpoints)], device=self.device)

    def masks(self, removed: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``removed [K, n_edges]`` -> masks ``{module: [K, *mask_shape]}`` (1 = removed)."""
        removed = removed.to(device=self.device, dtype=self.dtype)
        vals = torch.cat([removed, removed.new_zeros(removed.shape[0], 1)], 1)
        return {m: vals[:, idx] for m, idx in self.index.items()}

    def outputs(self, removed: torch.Tensor) -> torch.Tensor:
        """Circuit outputs ``[K, batch, ...]`` (``out[pm.out_slice]`` of each circuit)."""
        k = removed.shape[0]
        masks = {m: v.repeat_interleave(self.batch, dim=0) for m, v in self.masks(removed).items()}
        resume = None
        if self.checkpoints is not None:
            # start at the first checkpoint a removed edge changes; the patch values and
            # the earlier sources' outputs serve every circuit untiled
            hit = torch.nonzero(removed.any(0))[:, 0]
            point = divmod(int(self.edge_point[hit].min() if len(hit) else self.edge_point[-1]), 2)
            resid, n_before = self.checkpoints[point]
            resume = (point, resid, self.src_outs[:n_before])
        state = dataclasses.replace(self.template, masks=masks, patch_src_outs=self.patch)
        with torch.no_grad():
            out = stacked_patched_forward(self.pm, state, self.tokens, {**self.kwargs, **self.lean_kwargs}, k,
                                          resume)[self.pm.out_slice]
        return out.reshape(k, self.batch, *out.shape[1:])

    def faith_sums(self, outs: torch.Tensor) -> torch.Tensor:
        """``[K]``: the faithfulness metric of each circuit's outputs ``[K, batch, ...]``,
        summed (not yet averaged) over the batch and positions."""
        k = outs.shape[0]
        if self.target == "kl_div":
            # fp.metrics.kl_divergence's arithmetic, its clean side (q, log q) computed once
            if self.clean_probs is None:
                logq = torch.log_softmax(self.clean_out, dim=-1)
                q = logq.exp()
                self.clean_probs = q, torch.where(q > 0, logq, torch.zeros_like(logq))
            q, logq = self.clean_probs
            return (q * (logq - torch.log_softmax(outs, dim=-1))).sum(-1).reshape(k, -1).sum(1)
        return (outs - self.clean_out.unsqueeze(0)).pow(2).reshape(k, -1).sum(1)

    def evaluate(self, removed: torch.Tensor, keep_outputs: bool = False):
        sums, outs = [], []
        for start in range(0, removed.shape[0], self.max_k):
            o = self.outputs(removed[start:start + self.max_k])
            sums.append(self.faith_sums(o))
            if keep_outputs:
                outs.append(o)
        # the mean over every prompt and position; under torch.distributed the ranks' shares
        # of the batch are added in rank order, so every rank takes the same decisions
        per_item = self.clean_out[..., 0] if self.target == "kl_div" else self.clean_out
        sums, count = distributed.sum_in_rank_order((torch.cat(sums), torch.tensor(per_item.numel())))
        return (sums / count).tolist(), (torch.cat(outs) if keep_outputs else None)


def _dest_point(module_name: str) -> int:
    """``2 * block + stage`` of the first checkpoint a destination's patch can change:
    its block's attention (Q/K/V inputs, stage 0) or MLP (stage 1); after the last block
    (``2 * n_layers``) for the final residual."""
    block = int(module_name.split(".")[1])
    if module_name.endswith("hook_resid_post"):
        return 2 * (block + 1)
    return 2 * block + (1 if module_name.endswith("hook_mlp_in") else 0)


# --------------------------------------------------------------------------------------
# The greedy runs


@dataclass
class _Run:
    tau: float
    removed: torch.Tensor  # [n_edges] bool
    order_removed: List[int]
    prev: float = 0.0
    ptr: int = 0  # position in the visiting order
    last_accept: bool = False  # the prediction for speculated decisions
    streak: int = 0  # how many decisions in a row equalled last_accept


def _depth(r: _Run, lookahead: int) -> int:
    """Speculation depth: as many candidates as the run's current streak of equal
    decisions is long (at least 1, at most ``lookahead``)."""
    return max(1, min(lookahead, r.streak))


def _check_args(pm, faithfulness_target, lookahead, max_batch_rows):
    if not isinstance(pm, PatchableModel):
        raise TypeError(f"pm must be a funcpatch.PatchableModel (fp.patchable(model)), got {type(pm).__name__}")
    if faithfulness_target not in ACDC_FAITHFULNESS_TARGETS:
        raise ValueError(f"unknown faithfulness_target {faithfulness_target!r}; valid: "
                         f"{list(ACDC_FAITHFULNESS_TARGETS)}")
    if isinstance(lookahead, bool) or not isinstance(lookahead, int) or lookahead < 1:
        raise ValueError(f"lookahead must be an int >= 1, got {lookahead!r}")
    if max_batch_rows is not None and (isinstance(max_batch_rows, bool) or not isinstance(max_batch_rows, int)
                                       or max_batch_rows < 1):
        raise ValueError(f"max_batch_rows must be a positive int or None, got {max_batch_rows!r}")


def _first_batch(dataloader):
    if dataloader is None:
        raise TypeError("dataloader must be a PromptDataLoader or an iterable of PromptPairBatch, got None")
    try:
        batch = next(iter(dataloader))
    except TypeError:
        raise TypeError(f"dataloader must be a PromptDataLoader or an iterable of PromptPairBatch, "
                        f"got {type(dataloader).__name__}") from None
    except StopIteration:
        raise ValueError("dataloader yielded no batches: ACDC needs one batch of prompt pairs") from None
    for a in ("clean", "corrupt"):
        if not isinstance(getattr(batch, a, None), torch.Tensor):
            raise TypeError(f"the dataloader's batches must be funcpatch.PromptPairBatch (with .clean and "
                            f".corrupt tensors), got {type(batch).__name__}")
    if batch.clean.shape != batch.corrupt.shape:
        raise ValueError(f"clean {tuple(batch.clean.shape)} and corrupt {tuple(batch.corrupt.shape)} prompts "
                         "must have the same shape")
    return batch


def acdc_runs(pm: PatchableModel, dataloader, taus: Sequence[float], *,
              faithfulness_target: Literal["kl_div", "mse"] = "kl_div",
              ablation_type: Union[AblationType, str] = AblationType.RESAMPLE,
              test_mode: bool = False, progress: bool = True, lookahead: int = 2,
              max_batch_rows: Optional[int] = None) -> List[AcdcRun]:
    """One greedy ACDC run per threshold in ``taus``; see the module docstring.

    Args:
        pm: the patchable model.
        dataloader: a PromptDataLoader or an iterable of PromptPairBatch; only the
            first batch is used (clean ``[batch, ...]`` model inputs).
        taus: thresholds (real numbers; ``inf`` removes every edge).
        faithfulness_target: "kl_div" (KL(clean || circuit) over the last dim, averaged
            over every other position, as auto-circuit's ``multibatch_kl_div``) or "mse"
            (mean squared difference of the outputs).
        ablation_type: what removed edges carry. Batch-specific types are computed on the
            batch's corrupt prompts, the dataset-wide means over ``dataloader``.
        test_mode: after every decision, recompute the circuit's output independently
            (``fp.patch_mode(pm, fp.init_state(pm), patch, edges=removed)`` and a plain
            ``fp.patched_forward`` on the unbatched inputs) and raise
            :class:`AcdcSelfCheckError` if it differs (atol 1e-3, rtol 1e-4).
        progress: tqdm progress bar (quiet with False).
        lookahead: the most candidates one run evaluates per step (speculation depth;
            1 = none). Results do not depend on it.
        max_batch_rows: the most rows (circuits × batch size) in one forward. None: as
            many as keep the tiled patch values ``[n_srcs, rows, ...]`` within
            ``2**26`` elements (256 MiB in float32). Results do not depend on it.

    Returns:
        One :class:`AcdcRun` per τ, in the order of ``taus``.
    """
    _check_args(pm, faithfulness_target, lookahead, max_batch_rows)
    taus = list(taus)
    bad = [t for t in taus if isinstance(t, bool) or not isinstance(t, numbers.Real) or math.isnan(t)]
    if bad:
        raise TypeError(f"taus must be real numbers, got {bad}")
    with pm.forward.session(pm):
        return _acdc_runs(pm, dataloader, taus, faithfulness_target, ablation_type, test_mode, progress,
                          lookahead, max_batch_rows)


def _acdc_runs(pm, dataloader, taus, faithfulness_target, ablation_type, test_mode, progress, lookahead,
               max_batch_rows) -> List[AcdcRun]:
    ablation_type = as_ablation_type(ablation_type)
    batch = _first_batch(dataloader)
    which = resolve_clean_corrupt(ablation_type, "corrupt")
    patch = batch_patch_values(pm, batch, which, ablation_type, dataset_mean_ablation(pm, dataloader, ablation_type))
    # under torch.distributed each rank evaluates every circuit on its share of the prompts
    rows = distributed.my_rows(batch.clean.shape[0], "first batch")
    batch, patch = batch_rows(batch, rows), patch[:, rows]
    kwargs = forward_kwargs(batch, "clean")
    tokens = batch.clean
    with torch.no_grad():
        clean_out = patched_forward(pm, patch_mode(pm, init_state(pm), patch), tokens, **kwargs)[pm.out_slice]
    if faithfulness_target == "kl_div" and clean_out.dim() < 2:
        raise ValueError(f"faithfulness_target='kl_div' needs outputs [batch, ..., classes]; out[pm.out_slice] has "
                         f"shape {tuple(clean_out.shape)}: use faithfulness_target='mse'")

    if max_batch_rows is None:
        per_row = max(1, patch[:, :1].numel())
        max_batch_rows = max(tokens.shape[0], _ROW_BUDGET // per_row)
    rows = max_batch_rows
    ev = _Evaluator(pm, tokens, kwargs, patch, clean_out, faithfulness_target, rows, last_position_kwargs(pm))
    edges = pm.graph.edges
    position = {e: i for i, e in enumerate(edges)}
    order = [position[e] for e in acdc_edge_order(pm)]
    n = len(order)
    runs = [_Run(float(t), torch.zeros(n, dtype=torch.bool), []) for t in taus]

    def reference(removed_ids: List[int]) -> torch.Tensor:
        state = patch_mode(pm, init_state(pm), patch, edges=[edges[i] for i in removed_ids])
        with torch.no_grad():
            return patched_forward(pm, state, tokens, **kwargs)[pm.out_slice]

    bar = progress_bar(progress=progress, desc="ACDC", total=n * len(runs))
    n_steps = 0
    try:
        active = [r for r in runs if r.ptr < n]
        while active:
            # Candidates of every active run (deduplicated across runs).
            keys: Dict[Tuple[int, ...], int] = {}
            cands: List[torch.Tensor] = []
            plans = []
            for r in active:
                cur = r.removed.clone()
                slots = []
                for step in range(min(_depth(r, lookahead), n - r.ptr)):
                    j = order[r.ptr + step]
                    c = cur.clone()
                    c[j] = True
                    key = tuple(torch.nonzero(c)[:, 0].tolist())
                    if key not in keys:
                        keys[key] = len(cands)
                        cands.append(c)
                    slots.append(keys[key])
                    if r.last_accept:
                        cur[j] = True
                plans.append((r, slots))
            faiths, outs = ev.evaluate(torch.stack(cands), keep_outputs=test_mode)
            n_steps += 1
            decided = 0
            for r, slots in plans:
                predicted = r.last_accept
                for slot in slots:
                    j = order[r.ptr]
                    if test_mode:
                        ids = r.order_removed + [j]
                        ref = reference(ids)
                        got = outs[slot]
                        if got.shape != ref.shape or not torch.allclose(got, ref, atol=1e-3, rtol=1e-4):
                            diff = (got - ref).abs().max().item() if got.shape == ref.shape else "shape"
                            raise AcdcSelfCheckError(
                                f"ACDC test_mode: at tau={r.tau}, edge {edges[j]!r} (removed so far: "
                                f"{[edges[i] for i in r.order_removed]}) the batched evaluation differs from "
                                f"the independent recomputation (max |diff| = {diff})")
                    faith = faiths[slot]
                    accept = faith - r.prev < r.tau
                    if accept:
                        r.removed[j] = True
                        r.order_removed.append(j)
                        r.prev = faith
                    r.ptr += 1
                    r.streak = r.streak + 1 if accept == r.last_accept else 1
                    r.last_accept = accept
                    decided += 1
                    if accept != predicted:
                        break
            bar.update(decided)
            active = [r for r in active if r.ptr < n]
            bar.set_postfix_str(f"batched steps={n_steps}, runs left={len(active)}", refresh=False)
    finally:
        bar.close()
    return [AcdcRun(r.tau, tuple(edges[i] for i in r.order_removed), r.prev) for r in runs]


def acdc(pm: PatchableModel, dataloader, tao_exps: Sequence[int] = DEFAULT_TAO_EXPS,
         tao_bases: Sequence[int] = DEFAULT_TAO_BASES,
         faithfulness_target: Literal["kl_div", "mse"] = "kl_div",
         ablation_type: Union[AblationType, str] = AblationType.RESAMPLE,
         test_mode: bool = False, progress: bool = True, *, taus: Optional[Sequence[float]] = None,
         lookahead: int = 2, max_batch_rows: Optional[int] = None) -> PruneScores:
    """ACDC prune scores (auto-circuit's ``acdc_prune_scores``; see the module docstring).

    Runs greedy ACDC at every ``τ = base * 10**exp`` (or at ``taus`` when given) on the
    first batch of ``dataloader`` and scores each edge by the smallest τ at which it was
    removed (``+inf``: never removed). The circuit of the edges with score ``> τ`` is
    the circuit ACDC found at τ.

    Args:
        pm: the patchable model (``fp.patchable(model, slice_output=...)``).
        dataloader: PromptDataLoader or iterable of PromptPairBatch (first batch used).
        tao_exps, tao_bases: the τ grid (seed defaults: exps -5..-2, bases 1, 3, 5, 7, 9).
        faithfulness_target: "kl_div" or "mse" (against the clean, unpatched output).
        ablation_type: what removed edges carry (default RESAMPLE from the corrupt prompts).
        test_mode: check every step against an independent recomputation (slow).
        progress: show a tqdm bar.
        taus: explicit thresholds instead of the grid.
        lookahead, max_batch_rows: speed knobs (:func:`acdc_runs`); results do not depend
            on them.

    Returns:
        PruneScores: ``{dest module: [seq?, heads?, n_in_srcs]}`` with the graph's mask
        shapes and dtype; ``+inf`` for edges kept at every τ.
    """
    grid = acdc_taus(tao_exps, tao_bases) if taus is None else list(taus)
    if not grid:
        raise ValueError("taus is empty: give at least one threshold")
    runs = acdc_runs(pm, dataloader, grid, faithfulness_target=faithfulness_target, ablation_type=ablation_type,
                     test_mode=test_mode, progress=progress, lookahead=lookahead, max_batch_rows=max_batch_rows)
    scores = {m: torch.full_like(t, math.inf) for m, t in init_state(pm).masks.items()}
    for run in runs:
        for e in run.removed:
            s = scores[e.dest.module_name]
            s[e.patch_idx] = min(run.tau, s[e.patch_idx].item())
    return scores
