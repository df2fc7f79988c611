"""Subnetwork probing and circuit probing: learn edge masks by gradient descent.

Subnetwork probing (Cao et al., 2021, as adapted by auto-circuit's
``subnetwork_probing_prune_scores``): every edge has a mask logit, trained with Adam to
keep the patched model faithful to the clean model while a λ-weighted penalty pushes the
(expected) number of edges in the circuit down. Circuit probing repeats it for several
target circuit sizes and scores each edge by the smallest circuit it belongs to.

The masks are plain tensors ``{dest module: [seq?, heads?, n_in_srcs]}`` passed into the
pure :func:`funcpatch.patched_forward`; gradients come from ``torch.autograd.grad`` with
respect to those tensors only, so the model (its parameters and their ``.grad``) is never
touched. All randomness (hard concrete samples, dropout, the penalty's sample) is drawn
from one ``torch.Generator`` seeded with ``seed``: a run is reproducible.

Semantics kept from the seed library:

* Default patch values are the dataset-wide ``TOKENWISE_MEAN_CORRUPT`` ablation.
* Without ``tree_optimisation`` the model runs on the *corrupt* prompts, masks start at
  ``-init_val`` and the penalty counts the mask mass (edges patched); with it, the model
  runs on the *clean* prompts, masks start at ``+init_val`` and the penalty counts
  ``n_edges - mass`` (edges left clean). Faithfulness always compares with the clean
  model's output.
* With ``mask_fn="hard_concrete"`` the forward samples one mask per example (noise
  ``[batch, *mask]``) and the penalty uses a separate single sample; "sigmoid" uses
  ``sigmoid(mask)``; None the raw mask. Dropout (``dropout_p``) multiplies the mask by a
  Bernoulli keep-mask scaled by ``1 / (1 - p)``, per example with hard concrete.
* With ``circuit_size`` the penalty is ``relu(n - circuit_size) / circuit_size`` instead
  of ``n / n_edges``. ``avoid_edges`` adds ``± avoid_lambda / n_avoid * f(mask[e])`` per
  avoided edge, ``f = sigmoid(m - temp * log(-left / right))`` for hard concrete,
  ``sigmoid`` for "sigmoid", identity for None (sign: + without tree optimisation).
* Returned scores: ``|extreme| + sign * mask`` (extreme = the smallest mask and sign +1
  without tree optimisation; the largest mask and sign -1 with it), so all scores are
  ``>= 0`` and a higher score means an edge the training kept in the circuit.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Sequence, Union

import torch

from funcpatch import distributed
from funcpatch.ablation import AblationType, as_ablation_type, dataset_tokenwise_mean
from funcpatch.circuits import (batch_patch_values, forward_kwargs, last_position_kwargs, materialize_batches,
                                progress_bar)
from funcpatch.data import batch_rows
from funcpatch.edge_counts import prune_scores_threshold
from funcpatch.forward import patched_forward
from funcpatch.metrics import (answer_value, correct_answer_percent, kl_divergence, logit_diff,
                               logit_diff_percent)
from funcpatch.patchable import PatchableModel
from funcpatch.state import (HC_LEFT, HC_RIGHT, HC_TEMP, MASK_FNS, MaskNoise, PatchState, init_state, mask_fn_mode,
                             sample_mask_noise)

__all__ = ["subnetwork_probing", "subnetwork_probing_run", "circuit_probing", "ProbingResult",
           "SP_FAITHFULNESS_TARGETS", "SP_INIT_VAL"]

PruneScores = Dict[str, torch.Tensor]

SP_FAITHFULNESS_TARGETS = ("kl_div", "mse", "answer", "wrong_answer", "correct_percent", "logit_diff_percent",
                           "logit_diff")
_MASK_P = 0.9  # Cao et al.'s initial probability that a hard concrete mask is on
_P = (_MASK_P - HC_LEFT) / (HC_RIGHT - HC_LEFT)
#: The seed's ``init_mask_val``: ``log(p / (1 - p))`` with ``p = (0.9 - left) / (right - left)`` (= log 5).
SP_INIT_VAL = math.log(_P / (1 - _P))
_REGULARIZE_CONST = HC_TEMP * math.log(-HC_LEFT / HC_RIGHT)


@dataclass(frozen=True)
class ProbingResult:
    """What :func:`subnetwork_probing_run` returns.

    prune_scores: PruneScores (``{dest module: [seq?, heads?, n_in_srcs]}``, all ``>= 0``).
    masks: the trained mask logits (same shapes), detached.
    losses, faithfulness, regularization: per training step (one step per batch per
        epoch): the loss, its faithfulness term, and λ times its penalty term.
    val_faithfulness, val_stds: per step, with a validation dataloader: the mean and
        standard deviation over prompts of the logit-difference percentage.
    """

    prune_scores: PruneScores
    masks: Dict[str, torch.Tensor]
    losses: List[float] = field(default_factory=list)
    faithfulness: List[float] = field(default_factory=list)
    regularization: List[float] = field(default_factory=list)
    val_faithfulness: List[float] = field(default_factory=list)
    val_stds: List[float] = field(default_factory=list)


# --------------------------------------------------------------------------------------
# Argument checks


def _check_real(name, x, *, positive=False, nonneg=False):
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x):
        raise ValueError(f"{name} must be a finite real number, got {x!r}")
    if positive and x <= 0:
        raise ValueError(f"{name} must be > 0, got {x!r}")
    if nonneg and x < 0:
        raise ValueError(f"{name} must be >= 0, got {x!r}")


def _check_int(name, x, minimum):
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or x < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {x!r}")


def _check_common(pm, learning_rate, epochs, regularize_lambda, mask_fn, dropout_p, init_val, avoid_lambda,
                  faithfulness_target):
    if not isinstance(pm, PatchableModel):
        raise TypeError(f"pm must be a funcpatch.PatchableModel (fp.patchable(model)), got {type(pm).__name__}")
    if faithfulness_target not in SP_FAITHFULNESS_TARGETS:
        raise ValueError(f"unknown faithfulness_target {faithfulness_target!r}; valid: {list(SP_FAITHFULNESS_TARGETS)}")
    if mask_fn not in MASK_FNS:
        raise ValueError(f"unknown mask_fn {mask_fn!r}; valid: {list(MASK_FNS)}")
    _check_real("learning_rate", learning_rate, positive=True)
    _check_int("epochs", epochs, 0)
    _check_real("regularize_lambda", regularize_lambda)
    _check_real("init_val", init_val)
    _check_real("avoid_lambda", avoid_lambda)
    _check_real("dropout_p", dropout_p, nonneg=True)
    if dropout_p >= 1:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")


# --------------------------------------------------------------------------------------
# Patch values and targets


def _patch_values(pm, batches, ablation_type, clean_corrupt, tree) -> List[torch.Tensor]:
    """Patch values ``[n_srcs, batch, seq, d]`` for each batch, in order."""
    if ablation_type.batch_specific:
        which = clean_corrupt if clean_corrupt is not None else ("corrupt" if tree else "clean")
        if which not in ("clean", "corrupt"):
            raise ValueError(f"clean_corrupt must be 'clean', 'corrupt' or None, got {clean_corrupt!r}")
    else:
        if clean_corrupt is not None:
            raise ValueError(f"{ablation_type.name} does not depend on the batch's prompts: pass clean_corrupt=None "
                             f"(got {clean_corrupt!r})")
        which = None
    mean = None
    if ablation_type.mean_over_dataset:
        mean = dataset_tokenwise_mean(pm, batches, ablation_type)
    return [batch_patch_values(pm, b, which, ablation_type, mean) for b in batches]


def _hard_concrete(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + logits) / HC_TEMP)
    return (s * (HC_RIGHT - HC_LEFT) + HC_LEFT).clamp(0.0, 1.0)


def _faithfulness(target: str, logits: torch.Tensor, clean_logits: torch.Tensor, batch) -> torch.Tensor:
    if target == "kl_div":
        return kl_divergence(logits, clean_logits)
    if target == "mse":
        answers = batch.answers
        if not isinstance(answers, torch.Tensor):
            raise ValueError("faithfulness_target='mse' compares the outputs with batch.answers as regression "
                             "targets: answers must be one tensor, not a ragged list")
        try:
            shape = torch.broadcast_shapes(logits.shape, answers.shape)
        except RuntimeError:
            shape = None
        if shape != logits.shape:
            raise ValueError(f"faithfulness_target='mse' compares out[pm.out_slice] {tuple(logits.shape)} with "
                             f"batch.answers {tuple(answers.shape)} (the seed's regression target): their shapes "
                             "must broadcast to the output's")
        return (logits - answers.to(logits.dtype)).pow(2).mean()
    if target == "answer":
        return -answer_value(logits, batch.answers)
    if target == "wrong_answer":
        return -answer_value(logits, batch.wrong_answers)
    if target == "correct_percent":
        return correct_answer_percent(logits, batch.answers) / 100.0
    if target == "logit_diff_percent":
        pct = logit_diff_percent(logits, clean_logits, batch.answers, batch.wrong_answers, per_prompt=True)
        return (100.0 - pct).abs().mean()
    return -logit_diff(logits, batch.answers, batch.wrong_answers)  # "logit_diff"


# --------------------------------------------------------------------------------------
# Subnetwork probing


def subnetwork_probing_run(
    pm: PatchableModel,
    dataloader,
    learning_rate: float = 0.1,
    epochs: int = 20,
    regularize_lambda: float = 10.0,
    mask_fn: Optional[str] = "hard_concrete",
    dropout_p: float = 0.0,
    init_val: float = SP_INIT_VAL,
    show_train_graph: bool = False,
    circuit_size: Optional[int] = None,
    tree_optimisation: bool = False,
    avoid_edges=None,
    avoid_lambda: float = 1.0,
    faithfulness_target: str = "kl_div",
    validation_dataloader=None,
    *,
    ablation_type: Union[AblationType, str] = AblationType.TOKENWISE_MEAN_CORRUPT,
    clean_corrupt: Optional[Literal["clean", "corrupt"]] = None,
    seed: int = 0,
    generator: Optional[torch.Generator] = None,
    progress: bool = True,
) -> ProbingResult:
    """Subnetwork probing with its training history; see :func:`subnetwork_probing`."""
    _check_common(pm, learning_rate, epochs, regularize_lambda, mask_fn, dropout_p, init_val, avoid_lambda,
                  faithfulness_target)
    if circuit_size is not None:
        _check_int("circuit_size", circuit_size, 1)
    ablation_type = as_ablation_type(ablation_type)
    with pm.forward.session(pm):
        return _train(pm, dataloader, learning_rate, epochs, regularize_lambda, mask_fn, dropout_p, init_val,
                      show_train_graph, circuit_size, tree_optimisation, avoid_edges, avoid_lambda,
                      faithfulness_target, validation_dataloader, ablation_type, clean_corrupt, seed, generator,
                      progress)


def _train(pm, dataloader, learning_rate, epochs, regularize_lambda, mask_fn, dropout_p, init_val, show_train_graph,
           circuit_size, tree_optimisation, avoid_edges, avoid_lambda, faithfulness_target, validation_dataloader,
           ablation_type, clean_corrupt, seed, generator, progress) -> ProbingResult:
    batches = materialize_batches(dataloader)
    val_batches = None if validation_dataloader is None else materialize_batches(validation_dataloader,
                                                                                "validation_dataloader")
    template = init_state(pm)
    n_edges = pm.graph.n_edges
    if n_edges == 0:
        raise ValueError("the graph has no edges: nothing to probe")
    device = next(iter(template.masks.values())).device
    if generator is None:
        generator = torch.Generator(device=device)
        generator.manual_seed(int(seed))

    avoid = [] if avoid_edges is None else pm.graph.edges_named(avoid_edges)
    n_avoid = len(avoid)
    tree = bool(tree_optimisation)
    which_in = "clean" if tree else "corrupt"
    hc = mask_fn == "hard_concrete"

    def clean_logits_of(bs):
        with torch.no_grad():
            return [pm(b.clean, **forward_kwargs(b, "clean"))[pm.out_slice].detach() for b in bs]

    clean_logits = clean_logits_of(batches)
    lean = last_position_kwargs(pm)
    patches = _patch_values(pm, batches, ablation_type, clean_corrupt, tree)
    if val_batches is not None:
        val_clean = clean_logits_of(val_batches)
        val_patches = _patch_values(pm, val_batches, ablation_type, clean_corrupt, tree)

    start = float(init_val if tree else -init_val)
    masks = {m: torch.full_like(t, start).requires_grad_(True) for m, t in template.masks.items()}
    params = list(masks.values())
    optim = torch.optim.Adam(params, lr=learning_rate)

    def noise_for(n_batch):
        return sample_mask_noise(template, mask_fn="hard_concrete" if hc else None, dropout=dropout_p > 0,
                                 batch_size=n_batch if hc else None, generator=generator)

    def state_for(ms, patch, noise):
        return mask_fn_mode(PatchState(ms, patch), mask_fn, float(dropout_p), noise)

    result = ProbingResult({}, {})
    bar = progress_bar(range(epochs), progress=progress, desc="Subnetwork Probing")
    for epoch in bar:
        if epoch > 0:
            bar.set_description_str(f"Subnetwork Probing epoch {epoch} loss {result.losses[-1]:.3f} "
                                    f"{faithfulness_target} {result.faithfulness[-1]:.3f}", refresh=False)
        for i, batch in enumerate(batches):
            # under torch.distributed each rank runs its share of the batch's prompts; every
            # rank draws the whole batch's noise, so the generator stays in step everywhere
            n_rows = batch.clean.shape[0]
            noise = noise_for(n_rows)
            rows = distributed.my_rows(n_rows, allow_empty=True)
            share = batch_rows(batch, rows)
            if hc:
                noise = MaskNoise(*({m: u[rows] for m, u in part.items()} if part is not None else None
                                    for part in (noise.concrete, noise.dropout)))
            state = state_for(masks, patches[i][:, rows], noise)
            inputs = share.clean if tree else share.corrupt
            faith = torch.zeros((), device=device)  # an empty share (fewer prompts than ranks) adds nothing
            if len(inputs):
                logits = patched_forward(pm, state, inputs, **forward_kwargs(share, which_in), **lean)[pm.out_slice]
                # the targets are means over prompts: a share weighs its fraction of the batch
                faith = _faithfulness(faithfulness_target, logits, clean_logits[i][rows], share)
                faith = faith * (len(inputs) / n_rows)

            flat = torch.cat([p.reshape(-1) for p in params])
            if hc:
                u = torch.rand((1, flat.numel()), generator=generator, dtype=flat.dtype, device=flat.device)
                sampled = _hard_concrete(flat, u.clamp(1e-4, 1 - 1e-4))
            elif mask_fn == "sigmoid":
                sampled = torch.sigmoid(flat)
            else:
                sampled = flat
            n_mask = n_edges - sampled.sum() if tree else sampled.sum()
            if circuit_size:
                n_mask = torch.relu(n_mask - circuit_size)
            regularize = n_mask / (circuit_size if circuit_size else n_edges)
            for e in avoid:
                weight = (-1.0 if tree else 1.0) * avoid_lambda / n_avoid
                penalty = masks[e.dest.module_name][e.patch_idx]
                if mask_fn is not None:
                    penalty = torch.sigmoid(penalty - (_REGULARIZE_CONST if hc else 0.0))
                regularize = regularize + weight * penalty
            # the faithfulness gradients of the shares, added in rank order, then the penalty's
            faith_grads = _grads(faith, params)
            faith, faith_grads = distributed.sum_in_rank_order((faith.detach(), faith_grads), device)
            grads = [a + b for a, b in zip(faith_grads, _grads(regularize * regularize_lambda, params))]
            loss = faith + regularize.detach() * regularize_lambda

            result.losses.append(loss.item())
            result.faithfulness.append(faith.item())
            result.regularization.append(regularize.item() * regularize_lambda)
            for p, g in zip(params, grads):
                p.grad = g
            optim.step()

            if val_batches is not None:
                j = i if i < len(val_batches) else 0
                vb = val_batches[j]
                vin = vb.clean if tree else vb.corrupt
                with torch.no_grad():
                    vstate = state_for({m: p.detach() for m, p in masks.items()}, val_patches[j],
                                       noise_for(vin.shape[0]))
                    vlogits = patched_forward(pm, vstate, vin, **forward_kwargs(vb, which_in), **lean)[pm.out_slice]
                    pct = logit_diff_percent(vlogits, val_clean[j], vb.answers, vb.wrong_answers, "logprob",
                                             per_prompt=True)
                result.val_faithfulness.append(pct.mean().item())
                result.val_stds.append(pct.std().item() if pct.numel() > 1 else 0.0)

    final = {m: p.detach().clone() for m, p in masks.items()}
    flat = torch.cat([p.reshape(-1) for p in final.values()])
    extreme = (flat.max() if tree else flat.min()).abs()
    sign = -1.0 if tree else 1.0
    scores = {m: extreme + sign * p for m, p in final.items()}
    if show_train_graph:
        _plot_history(result, faithfulness_target)
    return ProbingResult(scores, final, result.losses, result.faithfulness, result.regularization,
                         result.val_faithfulness, result.val_stds)


def _grads(value: torch.Tensor, params: List[torch.Tensor]) -> List[torch.Tensor]:
    """``d value / d params`` (zeros where ``value`` does not depend on a parameter)."""
    if not value.requires_grad:
        return [torch.zeros_like(p) for p in params]
    got = torch.autograd.grad(value, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, got)]


def _plot_history(result: ProbingResult, faithfulness_target: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot(result.losses, label="Loss")
    ax.plot(result.faithfulness, label=faithfulness_target)
    if result.val_faithfulness:
        ax.errorbar(range(len(result.val_faithfulness)), result.val_faithfulness, yerr=result.val_stds,
                    label=f"Val {faithfulness_target}")
    ax.plot(result.regularization, label="Regularization")
    ax.set_title("Subnetwork Probing")
    ax.set_xlabel("Step")
    ax.legend()
    plt.show()


def subnetwork_probing(
    pm: PatchableModel,
    dataloader,
    learning_rate: float = 0.1,
    epochs: int = 20,
    regularize_lambda: float = 10.0,
    mask_fn: Optional[str] = "hard_concrete",
    dropout_p: float = 0.0,
    init_val: float = SP_INIT_VAL,
    show_train_graph: bool = False,
    circuit_size: Optional[int] = None,
    tree_optimisation: bool = False,
    avoid_edges=None,
    avoid_lambda: float = 1.0,
    faithfulness_target: str = "kl_div",
    validation_dataloader=None,
    *,
    ablation_type: Union[AblationType, str] = AblationType.TOKENWISE_MEAN_CORRUPT,
    clean_corrupt: Optional[Literal["clean", "corrupt"]] = None,
    seed: int = 0,
    progress: bool = True,
) -> PruneScores:
    """Learn edge masks that keep the circuit faithful with few edges (subnetwork probing).

    See the module docstring for the loss. Each training step is one batch:
    ``loss = faithfulness + regularize_lambda * penalty``, minimised with Adam over the
    mask logits (plain tensors).

    Args:
        pm: the patchable model.
        dataloader: PromptDataLoader or iterable of PromptPairBatch (every batch, every epoch).
        learning_rate: Adam's learning rate.
        epochs: passes over the dataloader.
        regularize_lambda: weight of the circuit-size penalty.
        mask_fn: "hard_concrete" (recommended), "sigmoid" or None.
        dropout_p: dropout on the masks during training, in [0, 1).
        init_val: masks start at ``-init_val`` (``+init_val`` with tree optimisation);
            default the seed's ``log 5`` (a hard concrete mask starts ~90% off / on).
        show_train_graph: plot the loss curves with matplotlib at the end.
        circuit_size: aim for this many edges (penalise only the excess).
        tree_optimisation: run on the clean prompts and learn which edges to ablate.
        avoid_edges: Edge objects or names to keep out of the circuit (names cover all
            positions of a token-specific graph), penalised with ``avoid_lambda``.
        faithfulness_target: "kl_div" (KL(clean || circuit)), "mse" (output vs
            ``batch.answers`` as regression targets, as the seed), "answer" / "wrong_answer"
            (maximise the mean (wrong) answer logit, as the seed), "correct_percent"
            (fraction correct; no gradient), "logit_diff_percent" (``|100 - %|`` per
            prompt, averaged), or "logit_diff" (maximise the logit difference).
        validation_dataloader: also record the validation logit-difference percentage.
        ablation_type: patch values (default TOKENWISE_MEAN_CORRUPT, as the seed).
        clean_corrupt: for the batch-specific ablation types, which prompts they are
            computed on (default: "clean" without tree optimisation — the clean values
            patched into the corrupt run — and "corrupt" with it).
        seed: seeds the ``torch.Generator`` all noise comes from.
        progress: show a tqdm bar.

    Returns:
        PruneScores ``{dest module: [seq?, heads?, n_in_srcs]}``, all ``>= 0``.
    """
    return subnetwork_probing_run(
        pm, dataloader, learning_rate, epochs, regularize_lambda, mask_fn, dropout_p, init_val, show_train_graph,
        circuit_size, tree_optimisation, avoid_edges, avoid_lambda, faithfulness_target, validation_dataloader,
        ablation_type=ablation_type, clean_corrupt=clean_corrupt, seed=seed, progress=progress).prune_scores


# --------------------------------------------------------------------------------------
# Circuit probing


def circuit_probing(
    pm: PatchableModel,
    dataloader,
    circuit_sizes: Sequence[Union[int, str]] = ("true_size",),
    official_edges=None,
    learning_rate: float = 0.1,
    epochs: int = 20,
    regularize_lambda: float = 10.0,
    mask_fn: Optional[str] = "hard_concrete",
    dropout_p: float = 0.0,
    init_val: float = -SP_INIT_VAL,
    show_train_graph: bool = False,
    tree_optimisation: bool = False,
    avoid_edges=None,
    avoid_lambda: float = 1.0,
    faithfulness_target: str = "kl_div",
    validation_dataloader=None,
    *,
    ablation_type: Union[AblationType, str] = AblationType.TOKENWISE_MEAN_CORRUPT,
    clean_corrupt: Optional[Literal["clean", "corrupt"]] = None,
    seed: int = 0,
    progress: bool = True,
) -> PruneScores:
    """Subnetwork probing at several target sizes; an edge scores by its smallest circuit.

    For each size in ascending order, :func:`subnetwork_probing` runs with
    ``circuit_size=size`` (all runs draw from one generator seeded with ``seed``); its
    circuit of ``size`` edges (tie rule of :mod:`funcpatch.edge_counts`) gives every edge
    not yet scored the score ``len(sizes) - i`` for the ``i``-th smallest size. Edges in
    no circuit score 0.

    Args:
        circuit_sizes: ints in ``[1, n_edges]`` and/or "true_size" (= the number of
            ``official_edges``); no duplicates.
        official_edges: the reference circuit (Edge objects or names), for "true_size".
        init_val: default ``-SP_INIT_VAL`` (masks start at ``+log 5`` without tree
            optimisation), as the seed.
        Others: as :func:`subnetwork_probing`.

    Returns:
        PruneScores with the graph's mask shapes: integers ``0 .. len(circuit_sizes)``.
    """
    if not isinstance(pm, PatchableModel):
        raise TypeError(f"pm must be a funcpatch.PatchableModel (fp.patchable(model)), got {type(pm).__name__}")
    if isinstance(circuit_sizes, (str, bytes, numbers.Number)) or not hasattr(circuit_sizes, "__iter__"):
        raise TypeError(f"circuit_sizes must be a sequence of ints and/or 'true_size', got {circuit_sizes!r}")
    n_edges = pm.graph.n_edges
    sizes = []
    for size in circuit_sizes:
        if size == "true_size":
            if official_edges is None:
                raise ValueError("circuit_sizes contains 'true_size' but official_edges is None: pass the "
                                 "reference circuit's edges, or give the sizes as ints")
            size = len(pm.graph.edges_named(official_edges))
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or not 1 <= size <= n_edges:
            raise ValueError(f"each circuit size must be an int in [1, {n_edges}] or 'true_size', got {size!r}")
        sizes.append(int(size))
    if not sizes:
        raise ValueError("circuit_sizes is empty: give at least one size")
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"circuit_sizes has duplicates: {sizes}")
    sizes = sorted(sizes)

    template = init_state(pm)
    generator = torch.Generator(device=next(iter(template.masks.values())).device)
    generator.manual_seed(int(seed))
    scores = {m: torch.zeros_like(t) for m, t in template.masks.items()}
    for i, size in enumerate(progress_bar(sizes, progress=progress, desc="Circuit Probing")):
        new = subnetwork_probing_run(
            pm, dataloader, learning_rate, epochs, regularize_lambda, mask_fn, dropout_p, init_val,
            show_train_graph, size, tree_optimisation, avoid_edges, avoid_lambda, faithfulness_target,
            validation_dataloader, ablation_type=ablation_type, clean_corrupt=clean_corrupt, generator=generator,
            progress=progress).prune_scores
        if any(bool((s < 0).any()) for s in new.values()):
            raise RuntimeError("subnetwork probing returned negative scores; circuit probing needs scores >= 0")
        threshold = prune_scores_threshold(new, size)
        score = float(len(sizes) - i)
        for m, s in new.items():
            in_new = (s >= threshold) & (scores[m] == 0)
            scores[m] = torch.where(in_new, torch.full_like(scores[m], score), scores[m])
    return scores
