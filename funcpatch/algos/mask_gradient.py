"""Gradient-based edge scores: mask gradients, EAP and EAP-IG, as ``torch.func.grad`` over masks.

Every edge has a mask ``m`` that interpolates what it carries between the clean value
(``m = 0``) and the patch value (``m = 1``): the destination's input is
``x + m * (patch_src - src)``. So the gradient of a loss with respect to an edge's mask
is ``(patch_src - src) . dL/d(dest input)``, summed over batch, positions and
``d_model`` -- edge attribution patching (Syed et al. 2023) when the masks are 0. Here
that gradient is taken with ``torch.func.grad`` of a pure function of the masks (no
backward hooks, nothing mutated), and per-prompt scores come from ``torch.func.vmap``.

Conventions (those of auto-circuit's ``mask_gradient_prune_scores``):

- loss: ``-answer_diff`` ("avg_diff"), ``-answer_value`` ("avg_val") or ``mse`` ("mse") of
  the token values (``grad_function`` applied to the sliced logits); each batch's loss is
  a mean over its prompts;
- scores are *summed* over batches (and over the integrated-gradient sample points);
- with the default loss a positive score means: patching the edge (towards the corrupt
  value) would *lower* the logit difference, i.e. the edge supports the clean behaviour.
  Only ``|score|`` matters for ranking edges.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Literal, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from funcpatch import distributed, metrics
from funcpatch.ablation import AblationType, as_ablation_type
from funcpatch.circuits import (batch_patch_values, dataset_mean_ablation, forward_kwargs, last_position_kwargs,
                                materialize_batches, progress_bar, resolve_clean_corrupt)
from funcpatch.data import batch_rows
from funcpatch.forward import patched_forward, record_src_outs
from funcpatch.state import PatchState, _param_device, edge_masks, init_state

PruneScores = Dict[str, torch.Tensor]

GRAD_FUNCTIONS = ("logit", "prob", "logprob", "logit_exp")
ANSWER_FUNCTIONS = ("avg_diff", "avg_val", "mse")
EAP_IG_VARIANTS = ("mask", "inputs")
EAP_IG_ENDPOINTS = ("clean", "corrupt")  # interpolation points k = 1..m (the paper) or 0..m-1 (EAP-IG's code)

__all__ = ["GRAD_FUNCTIONS", "ANSWER_FUNCTIONS", "EAP_IG_VARIANTS", "token_values", "answer_loss",
           "mask_gradient", "eap", "eap_ig"]


# --------------------------------------------------------------------------------------
# Losses


def _check_choice(value, valid: Sequence[str], what: str) -> str:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {list(valid)}")
    return value


def token_values(logits: torch.Tensor, grad_function: str = "logit") -> torch.Tensor:
    """``logits`` (``[..., vocab]``) mapped by ``grad_function``.

    "logit": unchanged; "prob": softmax; "logprob": log-softmax; "logit_exp": softmax
    whose normaliser is held constant for the gradient (``exp(x) / sum(exp(x)).detach()``).
    """
    _check_choice(grad_function, GRAD_FUNCTIONS, "grad_function")
    if grad_function == "logit":
        return logits
    if grad_function == "prob":
        return torch.softmax(logits, dim=-1)
    if grad_function == "logprob":
        return torch.log_softmax(logits, dim=-1)
    num = torch.exp(logits)
    return num / num.sum(dim=-1, keepdim=True).detach()


def answer_loss(logits: torch.Tensor, answers, wrong_answers=None, grad_function: str = "logit",
                answer_function: str = "avg_diff") -> torch.Tensor:
    """The loss whose mask gradient :func:`mask_gradient` computes (a 0-d tensor).

    Args:
        logits: the model output sliced with ``pm.out_slice``, ``[batch, vocab]`` (or
            ``[batch, seq, vocab]``).
        answers: ``[batch, n]`` token ids or a list of ``[n_i]`` (for "mse": float targets
            of the same shape as ``logits``).
        wrong_answers: like ``answers`` (needed by "avg_diff").
        grad_function: see :func:`token_values`.
        answer_function: "avg_diff": ``-(mean answer value - mean wrong-answer value)``;
            "avg_val": ``-(mean answer value)``; "mse": ``mse(values, answers)``; each
            averaged over the batch.
    """
    _check_choice(answer_function, ANSWER_FUNCTIONS, "answer_function")
    vals = token_values(logits, grad_function)
    if answer_function == "avg_diff":
        if wrong_answers is None:
            raise ValueError("answer_function='avg_diff' needs wrong_answers")
        return -metrics.answer_diff(vals, answers, wrong_answers, "logit")
    if answer_function == "avg_val":
        return -metrics.answer_value(vals, answers, "logit")
    if not isinstance(answers, torch.Tensor) or not answers.is_floating_point():
        raise ValueError("answer_function='mse' compares the token values with float targets: answers must be a "
                         f"float tensor shaped like the sliced output {tuple(vals.shape)}, got "
                         f"{answers.dtype if isinstance(answers, torch.Tensor) else type(answers).__name__}")
    if answers.shape != vals.shape:
        raise ValueError(f"answer_function='mse': answers have shape {tuple(answers.shape)} but the sliced output "
                         f"has shape {tuple(vals.shape)}; they must match")
    return F.mse_loss(vals, answers.to(vals.dtype))


def _check_batch_answers(batch, i: int, answer_function: str) -> None:
    """Shape checks done before any transform, so errors name the whole batch."""
    n = batch.clean.shape[0]
    sets = [("answers", batch.answers)]
    if answer_function == "avg_diff":
        sets.append(("wrong_answers", batch.wrong_answers))
    for what, a in sets:
        if isinstance(a, torch.Tensor):
            if answer_function == "mse":
                ok = a.is_floating_point() and a.dim() >= 1 and a.shape[0] == n
                want = f"a float tensor [batch={n}, ...] shaped like the sliced output"
            else:
                ok = a.dim() in (2, 3) and a.shape[0] == n and not a.is_floating_point()
                want = f"an integer tensor [batch={n}, n_answers] or a list of {n} 1-d tensors"
            if not ok:
                raise ValueError(f"batch {i}: {what} has shape {tuple(a.shape)} and dtype {a.dtype}; "
                                 f"answer_function={answer_function!r} needs {want}")
        elif isinstance(a, (list, tuple)):
            if answer_function == "mse":
                raise ValueError(f"batch {i}: answer_function='mse' needs {what} as one float tensor, got a list")
            if len(a) != n:
                raise ValueError(f"batch {i}: {what} is a list of {len(a)} tensors for {n} prompts")
        else:
            raise TypeError(f"batch {i}: {what} must be a tensor or a list of tensors, got {type(a).__name__}")


# --------------------------------------------------------------------------------------
# The gradient step


def _masks_grad(pm, base: PatchState, patch: torch.Tensor, tokens, kwargs, answers, wrong, loss_fn: Callable,
                patch2: Optional[torch.Tensor] = None, held: Optional[Dict[str, torch.Tensor]] = None):
    """``d loss / d masks`` at ``base.masks`` (pure; composes with vmap).

    With ``patch2`` the gradient is of ``L(masks, patch) - L(masks', patch2)``, where
    ``masks'`` keeps the entries flagged in ``held`` fixed at their base value (used by
    EAP-IG-inputs, see :func:`eap_ig`).
    """
    def run(masks, patch_values):
        out = patched_forward(pm, PatchState(masks, patch_values), tokens, **kwargs,
                              **last_position_kwargs(pm))[pm.out_slice]
        return loss_fn(out, answers, wrong)

    def loss(masks):
        if patch2 is None:
            return run(masks, patch)
        masks2 = {k: torch.where(held[k], base.masks[k], m) for k, m in masks.items()}
        return run(masks, patch) - run(masks2, patch2)

    if patch2 is None:  # at masks = 0 (EAP): from one plain forward/backward where the model allows
        fast = pm.forward.zero_mask_grads(pm, dataclasses.replace(base, patch_src_outs=patch), tokens,
                                          {**kwargs, **last_position_kwargs(pm)},
                                          lambda out: loss_fn(out[pm.out_slice], answers, wrong))
        if fast is not None:
            return fast
    return grad(loss)(base.masks)


def _batch_grads(pm, base: PatchState, patch, tokens, kwargs, batch, loss_fn, per_prompt: bool,
                 chunk_size: Optional[int], patch2=None, held=None) -> Dict[str, torch.Tensor]:
    """The mask gradient of one batch: ``[*mask]``, or ``[batch, *mask]`` with ``per_prompt``."""
    answers, wrong = batch.answers, batch.wrong_answers
    if not per_prompt:
        return _masks_grad(pm, base, patch, tokens, kwargs, answers, wrong, loss_fn, patch2, held)

    def one(tok, p, p2, kw, a, w):
        lift = (lambda x: None if x is None else x.unsqueeze(0))
        return _masks_grad(pm, base, p.unsqueeze(1), tok.unsqueeze(0), {k: v.unsqueeze(0) for k, v in kw.items()},
                           lift(a), lift(w), loss_fn, None if p2 is None else p2.unsqueeze(1), held)

    ragged = not isinstance(answers, torch.Tensor) or (wrong is not None and not isinstance(wrong, torch.Tensor))
    # padded prompts: the bridge derives position ids from the attention mask with
    # data-dependent control flow, which vmap cannot batch
    if not ragged and not kwargs:
        w = wrong if isinstance(wrong, torch.Tensor) else None
        in_dims = (0, 1, None if patch2 is None else 1, 0, 0, None if w is None else 0)
        return vmap(one, in_dims=in_dims, chunk_size=chunk_size)(tokens, patch, patch2, kwargs, answers, w)
    # prompts with different numbers of answers (or padding masks): one prompt at a time
    rows = []
    for j in range(tokens.shape[0]):
        rows.append(_masks_grad(pm, base, patch[:, j:j + 1], tokens[j:j + 1],
                                {k: v[j:j + 1] for k, v in kwargs.items()}, [answers[j]],
                                None if wrong is None else [wrong[j]], loss_fn,
                                None if patch2 is None else patch2[:, j:j + 1], held))
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _accumulate(total: Optional[Dict[str, torch.Tensor]], g: Dict[str, torch.Tensor]):
    if total is None:
        return {k: v.detach().clone() for k, v in g.items()}
    for k, v in g.items():
        total[k] = total[k] + v.detach()
    return total


def _check_common(pm, grad_function, answer_function, ablation_type, clean_corrupt):
    _check_choice(grad_function, GRAD_FUNCTIONS, "grad_function")
    _check_choice(answer_function, ANSWER_FUNCTIONS, "answer_function")
    ablation_type = as_ablation_type(ablation_type)
    which = resolve_clean_corrupt(ablation_type, clean_corrupt)
    return ablation_type, which


def _loss_fn(grad_function, answer_function):
    def fn(out, answers, wrong):
        return answer_loss(out, answers, wrong, grad_function, answer_function)
    return fn


# --------------------------------------------------------------------------------------
# Public algorithms


def mask_gradient(pm, dataloader, grad_function: str = "logit", answer_function: str = "avg_diff",
                  mask_val: Optional[float] = None, integrated_grad_samples: Optional[int] = None,
                  ablation_type: Union[AblationType, str] = AblationType.RESAMPLE,
                  clean_corrupt: Optional[Literal["clean", "corrupt"]] = "corrupt", per_prompt: bool = False,
                  progress: bool = True, vmap_chunk_size: Optional[int] = None,
                  max_memory: Optional[int] = None) -> PruneScores:
    """Prune scores: the gradient of the loss with respect to every edge mask.

    The same numbers as auto-circuit's ``mask_gradient_prune_scores``. For each batch the
    model runs on the clean prompts with every mask at one value and patch values from
    ``ablation_type`` (computed on the ``clean_corrupt`` prompts); the loss is
    :func:`answer_loss`; gradients are summed over batches.

    Exactly one of:

    - ``mask_val``: the gradient at every mask = ``mask_val`` (0: EAP, at the clean run);
    - ``integrated_grad_samples`` ``N``: the gradients at mask = ``s / N`` for
      ``s = 0, 1, ..., N`` (``N + 1`` points, both ends included), *summed* (not averaged)
      -- an integrated gradient over the masks up to the factor ``N + 1``.

    Giving both or neither raises (auto-circuit asserts the same; for EAP call
    :func:`eap`).

    Args:
        pm: the patchable model.
        dataloader: a PromptDataLoader (or an iterable of PromptPairBatch).
        grad_function: "logit" | "prob" | "logprob" | "logit_exp" (:func:`token_values`).
        answer_function: "avg_diff" | "avg_val" | "mse" (:func:`answer_loss`).
        ablation_type: the patch values (AblationType or its name).
        clean_corrupt: the prompts the per-batch ablations are computed on.
        per_prompt: one score set per prompt, from ``torch.func.vmap`` over the prompts
            of each batch (batches with ragged answer lists or attention masks run one
            prompt at a time: vmap cannot batch the bridge's padding logic).
        progress: tqdm progress bar.
        vmap_chunk_size: with ``per_prompt``, prompts per vmapped chunk (None: all).
        max_memory: a budget in bytes for the per-source tensors of one step (the patch
            values and the sources' clean outputs, ``2 x [n_srcs, rows, seq, d_model]``,
            which dominate the peak on models with many sources): each batch runs in
            sub-batches of as many prompts as fit (at least one), the gradients of the
            batch's mean loss added with weights ``rows / batch``. None: whole batches.
            Ablations that average over the batch (BATCH_*_MEAN) are still computed on
            the whole batch.

    Returns:
        PruneScores: dest module -> ``[seq?, heads?, n_in_srcs]`` (with ``per_prompt``:
        ``[n_prompts, seq?, heads?, n_in_srcs]``, prompts in dataloader order; summing
        them over prompts and dividing each batch's rows by its size gives the
        batch-summed scores).
    """
    ablation_type, which = _check_common(pm, grad_function, answer_function, ablation_type, clean_corrupt)
    if (mask_val is None) == (integrated_grad_samples is None):
        raise ValueError("give exactly one of mask_val (gradient at one mask value; 0 = EAP) and "
                         f"integrated_grad_samples (integrated gradients); got mask_val={mask_val!r}, "
                         f"integrated_grad_samples={integrated_grad_samples!r}")
    if integrated_grad_samples is not None:
        if isinstance(integrated_grad_samples, bool) or not isinstance(integrated_grad_samples, int) \
                or integrated_grad_samples < 1:
            raise ValueError(f"integrated_grad_samples must be an int >= 1, got {integrated_grad_samples!r}")
        values = [s / integrated_grad_samples for s in range(integrated_grad_samples + 1)]
    else:
        values = [float(mask_val)]
    batches = materialize_batches(dataloader)
    for i, b in enumerate(batches):
        _check_batch_answers(b, i, answer_function)
    loss_fn = _loss_fn(grad_function, answer_function)
    dataset_mean = dataset_mean_ablation(pm, dataloader, ablation_type)

    _check_max_memory(max_memory)
    mine = distributed.my_batches(batches)  # all of them without a process group
    bar = progress_bar(total=len(mine) * len(values), progress=progress, desc="Mask gradients")
    per_batch: List[Dict[str, torch.Tensor]] = []
    for batch in (batches[i] for i in mine):
        shares = []
        for share, patch_values in _shares(pm, batch, which, ablation_type, dataset_mean, max_memory):
            kwargs = forward_kwargs(share, "clean")
            patch = patch_values()
            total = None
            for v in values:
                base = init_state(pm, v)
                g = _batch_grads(pm, base, patch, share.clean, kwargs, share, loss_fn, per_prompt, vmap_chunk_size)
                total = _accumulate(total, g)
            shares.append((total, share.clean.shape[0]))
        bar.update(len(values))
        per_batch.append(_join_shares(shares, per_prompt))
    bar.close()
    return _combine(distributed.gather_in_order(per_batch, len(batches), _param_device(pm)), per_prompt)


def _check_max_memory(max_memory) -> None:
    if max_memory is not None and (isinstance(max_memory, bool) or not isinstance(max_memory, int)
                                   or max_memory < 1):
        raise ValueError(f"max_memory must be a positive int (bytes) or None, got {max_memory!r}")


def _shares(pm, batch, which, ablation_type: AblationType, dataset_mean, max_memory: Optional[int]):
    """``(sub-batch, patch_values)`` for consecutive prompts of ``batch``, where
    ``patch_values()`` computes that sub-batch's patch values (on each call: so that only
    the caller holds them): the whole batch with ``max_memory=None``, else as many prompts
    per sub-batch as keep ``2 x [n_srcs, rows, seq, d_model]`` (patch values and the
    recorded clean outputs) within ``max_memory`` bytes."""
    def values(rows):
        return lambda: batch_patch_values(pm, rows, which, ablation_type, dataset_mean).detach()

    n = batch.clean.shape[0]
    if max_memory is None:
        yield batch, values(batch)
        return
    one = values(batch_rows(batch, slice(0, 1)))()
    step = max(1, max_memory // (2 * one.numel() * one.element_size()))
    del one
    # the batch means need every prompt of the batch; the other types are per prompt
    whole = (values(batch)()
             if ablation_type in (AblationType.BATCH_TOKENWISE_MEAN, AblationType.BATCH_ALL_TOK_MEAN) else None)
    for a in range(0, n, step):
        share = batch_rows(batch, slice(a, a + step))
        yield share, (values(share) if whole is None else lambda a=a: whole[:, a:a + step])


def _join_shares(shares: List[Tuple[Dict[str, torch.Tensor], int]], per_prompt: bool) -> Dict[str, torch.Tensor]:
    """One batch's gradients from its sub-batches' ``(gradients, prompts)``: per prompt,
    their rows in order; else the sum weighted by each sub-batch's share of the prompts
    (the loss is a mean over them)."""
    if len(shares) == 1:
        return shares[0][0]
    if per_prompt:
        return {k: torch.cat([g[k] for g, _ in shares]) for k in shares[0][0]}
    n = sum(rows for _, rows in shares)
    out = {k: v * (shares[0][1] / n) for k, v in shares[0][0].items()}
    for g, rows in shares[1:]:
        for k, v in g.items():
            out[k] = out[k] + v * (rows / n)
    return out


def _combine(per_batch: List[Dict[str, torch.Tensor]], per_prompt: bool) -> PruneScores:
    if per_prompt:
        return {k: torch.cat([b[k] for b in per_batch]) for k in per_batch[0]}
    out = {k: v.clone() for k, v in per_batch[0].items()}
    for b in per_batch[1:]:
        for k, v in b.items():
            out[k] = out[k] + v
    return out


def eap(pm, dataloader, answer_function: str = "avg_diff", grad_function: str = "logit",
        ablation_type: Union[AblationType, str] = AblationType.RESAMPLE,
        clean_corrupt: Optional[Literal["clean", "corrupt"]] = "corrupt", per_prompt: bool = False,
        progress: bool = True, vmap_chunk_size: Optional[int] = None, max_memory: Optional[int] = None
        ) -> PruneScores:
    """Edge attribution patching (Syed et al. 2023): :func:`mask_gradient` at ``mask_val=0``.

    Score of edge ``src -> dest`` = ``sum_batches sum_{prompt, pos, d} (patch_src - clean_src)
    * dL/d(dest input)`` at the clean run, with ``L = -logit_diff`` by default. Sign
    convention (auto-circuit's, and that of Syed et al.'s code): a positive score means
    patching the edge is predicted to *lower* the logit difference. Rank by ``|score|``.
    ``max_memory``: see :func:`mask_gradient`.

    Returns:
        PruneScores (``[n_prompts, ...]`` per module with ``per_prompt``).
    """
    return mask_gradient(pm, dataloader, grad_function=grad_function, answer_function=answer_function,
                         mask_val=0.0, ablation_type=ablation_type, clean_corrupt=clean_corrupt,
                         per_prompt=per_prompt, progress=progress, vmap_chunk_size=vmap_chunk_size,
                         max_memory=max_memory)


def _resid_start_edges(pm):
    g = pm.graph
    if not g.factorized:
        raise ValueError("eap_ig(variant='inputs') interpolates the input through the Resid Start edges, which "
                         "reach every destination only in a factorized graph: build pm with factorized=True")
    starts = [s for s in g.srcs if s.name == "Resid Start"]
    if len(starts) != 1:
        raise ValueError("eap_ig(variant='inputs') needs the graph's 'Resid Start' source (the input embedding)")
    rs = starts[0]
    edges = [e for e in g.edges if e.src == rs]
    if len(edges) != len(g.dests) * (g.seq_len or 1):
        raise ValueError("eap_ig(variant='inputs'): 'Resid Start' does not feed every destination")
    return rs, edges


def eap_ig(pm, dataloader, samples: int = 50, variant: Literal["mask", "inputs"] = "mask",
           endpoint: Literal["clean", "corrupt"] = "clean", grad_function: str = "logit", answer_function: str = "avg_diff",
           ablation_type: Union[AblationType, str] = AblationType.RESAMPLE,
           clean_corrupt: Optional[Literal["clean", "corrupt"]] = "corrupt", per_prompt: bool = False,
           progress: bool = True, vmap_chunk_size: Optional[int] = None, max_memory: Optional[int] = None
           ) -> PruneScores:
    """EAP with integrated gradients, over the masks or over the inputs.

    ``variant="mask"``: :func:`mask_gradient` with ``integrated_grad_samples=samples``:
    the sum of the mask gradients at every mask = ``s / samples``, ``s = 0..samples``
    (auto-circuit's "Integrated Edge Gradients"; note: a *sum* of ``samples + 1`` points).

    ``variant="inputs"``: EAP-IG-inputs (Hanna et al. 2024, "Have Faith in
    Faithfulness"). With ``z`` the clean and ``z'`` the patch value of the input
    embedding (the corrupt prompt's, for RESAMPLE), the score of ``src -> dest`` is

        ``(patch_src - clean_src) . (1/m) sum_{k=1..m} dL/d(dest input) at z' + (k/m)(z - z')``

    with ``m = samples`` and ``endpoint`` choosing the points:

    - ``"clean"`` (default): ``k = 1..m``, the paper's formula: the clean end is included,
      the corrupt end excluded, so ``samples=1`` is exactly :func:`eap`;
    - ``"corrupt"``: ``k = 0..m-1``, as EAP-IG's code (``get_scores_eap_ig``, which MIB's
      leaderboard numbers come from) computes it: the corrupt end included, the clean end
      excluded. It equals EAP-IG's scores up to one uniform factor (sign and the mean over
      prompts; measured: tests/test_mib.py).

    ``patch_src`` and ``clean_src`` come from separate plain runs. A *mean* over the
    steps, summed over batches.

    How it is computed with funcpatch's masks, without hooks of its own:

    1. Interpolated input. In a factorized graph the "Resid Start" source (the embedding,
       ``blocks.0.hook_resid_pre``) feeds every destination, and every read of the
       residual stream is a destination. Setting the masks of all Resid Start edges to
       ``a = 1 - k/m`` (its patch value: ``z'``) and every other mask to 0 therefore runs
       the model exactly as if its residual stream started at ``z + a (z' - z)``.
    2. Gradient times the *fixed* difference. At those masks the mask gradient of an edge
       is ``(P_src - src_now) . dL/d(dest input)``, where ``src_now`` is the source's output
       in the interpolated run. Taking it for two patch tensors that differ only off the
       embedding -- ``P1 = patch`` and ``P2 = clean`` outputs -- and subtracting cancels
       ``src_now``: ``(patch_src - clean_src) . dL/d(dest input)``. (The two runs have the
       same value; only their gradients differ.) For Resid Start edges ``src_now`` *is*
       the clean embedding, so their ``P1`` gradient is already the score. Both runs are
       one ``torch.func.grad`` of ``L(M, P1) - L(M', P2)``, ``M'`` holding the Resid Start
       masks fixed.
    3. One backward. Where ``pm.forward`` allows (funcpatch's own forward, heads not
       normalized after their sum, no transform active), the same numbers come from one
       plain forward per point whose residual stream starts at ``z + a (z' - z)``, one
       backward to every destination's input, and the product with the differences
       ``patch_src - clean_src``, formed once per batch
       (:func:`funcpatch.zero_grads.zero_mask_grads`): no per-slot inputs are
       differentiated and one per-source tensor is kept, not three. Elsewhere step 2 runs.

    Other ablation types interpolate towards their own embedding value (e.g. ZERO
    towards a zero embedding) and use ``patch_src - clean_src`` likewise.

    ``max_memory``: see :func:`mask_gradient` (here counting three per-source tensors:
    the patch values, the clean outputs and their blend, which step 2 holds; step 3
    holds at most two, while it forms the differences).

    Returns:
        PruneScores (``[n_prompts, ...]`` per module with ``per_prompt``).
    """
    _check_choice(variant, EAP_IG_VARIANTS, "variant")
    _check_choice(endpoint, EAP_IG_ENDPOINTS, "endpoint")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an int >= 1, got {samples!r}")
    if variant == "mask":
        if endpoint != "clean":
            raise ValueError("endpoint applies to variant='inputs' (the interpolated inputs); variant='mask' sums "
                             "the mask gradients at s / samples, s = 0..samples: pass endpoint='clean'")
        return mask_gradient(pm, dataloader, grad_function=grad_function, answer_function=answer_function,
                             integrated_grad_samples=samples, ablation_type=ablation_type,
                             clean_corrupt=clean_corrupt, per_prompt=per_prompt, progress=progress,
                             vmap_chunk_size=vmap_chunk_size, max_memory=max_memory)

    ablation_type, which = _check_common(pm, grad_function, answer_function, ablation_type, clean_corrupt)
    rs, rs_edges = _resid_start_edges(pm)
    batches = materialize_batches(dataloader)
    for i, b in enumerate(batches):
        _check_batch_answers(b, i, answer_function)
    loss_fn = _loss_fn(grad_function, answer_function)
    dataset_mean = dataset_mean_ablation(pm, dataloader, ablation_type)
    held = {k: v.bool() for k, v in edge_masks(pm, rs_edges, 1.0).items()}

    _check_max_memory(max_memory)
    mine = distributed.my_batches(batches)
    bar = progress_bar(total=len(mine) * samples, progress=progress, desc="EAP-IG (inputs)")
    alphas = [1.0 - k / samples for k in (range(1, samples + 1) if endpoint == "clean" else range(samples))]
    per_batch = []
    for batch in (batches[i] for i in mine):
        shares = []
        budget = None if max_memory is None else max(1, 2 * max_memory // 3)  # _shares counts two tensors
        for share, patch_values in _shares(pm, batch, which, ablation_type, dataset_mean, budget):
            total = _ig_inputs_one_backward(pm, share, patch_values, rs.src_idx, alphas, loss_fn, per_prompt)
            if total is None:  # no such path for this forward: torch.func.grad of the patched forward
                total = _ig_inputs_grad(pm, share, patch_values(), rs.src_idx, alphas, loss_fn, per_prompt,
                                        vmap_chunk_size, held)
            shares.append(({name: v / samples for name, v in total.items()}, share.clean.shape[0]))
        bar.update(samples)
        per_batch.append(_join_shares(shares, per_prompt))
    bar.close()
    return _combine(distributed.gather_in_order(per_batch, len(batches), _param_device(pm)), per_prompt)


def _ig_inputs_grad(pm, share, patch: torch.Tensor, rs_idx: int, alphas: Sequence[float], loss_fn, per_prompt: bool,
                    chunk_size: Optional[int], held: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """EAP-IG-inputs' mask gradients of one (sub-)batch summed over the interpolation
    points ``alphas`` (the Resid Start masks), each as one ``torch.func.grad`` of
    ``L(M, P1) - L(M', P2)`` (see :func:`eap_ig`, steps 1 and 2)."""
    kwargs = forward_kwargs(share, "clean")
    with torch.no_grad():
        clean_outs = record_src_outs(pm, share.clean, **kwargs)[1]
    is_rs = torch.zeros(patch.shape[0], dtype=torch.bool, device=patch.device)
    is_rs[rs_idx] = True
    patch2 = torch.where(is_rs.view(-1, *([1] * (patch.dim() - 1))), patch, clean_outs.to(patch.dtype))
    del clean_outs
    template = init_state(pm)
    total = None
    for alpha in alphas:
        masks = {name: h.to(template.masks[name].dtype) * alpha for name, h in held.items()}
        base = dataclasses.replace(template, masks=masks)
        g = _batch_grads(pm, base, patch, share.clean, kwargs, share, loss_fn, per_prompt, chunk_size,
                         patch2=patch2, held=held)
        total = _accumulate(total, g)
    return total


def _ig_inputs_one_backward(pm, share, patch_values: Callable[[], torch.Tensor], rs_idx: int,
                            alphas: Sequence[float], loss_fn, per_prompt: bool) -> Optional[Dict[str, torch.Tensor]]:
    """What :func:`_ig_inputs_grad` returns, from one plain forward and backward per point
    where ``pm.forward`` has that path, else None: the residual stream starts at the
    interpolated embedding ``z + a (z' - z)`` and the gradients at the destinations meet
    the fixed differences ``patch - clean`` (``pm.forward.zero_mask_grads`` with
    ``resid``). The differences are formed in the clean outputs' memory, after which the
    patch values are dropped: one per-source tensor is held during the steps, not three.
    (A forward without that path says so at the first point, after a clean run and the
    patch values, which the fallback then computes again: two plain forwards, no grad.)"""
    patch = patch_values()
    with torch.no_grad():
        diffs = record_src_outs(pm, share.clean, **forward_kwargs(share, "clean"))[1].to(patch.dtype)
        start = diffs[rs_idx].clone()  # z, the clean embedding
        torch.sub(patch, diffs, out=diffs)  # a fresh tensor: nothing else holds it
    del patch
    template = init_state(pm)
    totals = []
    for rows in ([slice(j, j + 1) for j in range(share.clean.shape[0])] if per_prompt else [slice(None)]):
        part = batch_rows(share, rows)
        state = dataclasses.replace(template, patch_src_outs=diffs[:, rows])
        kwargs = {**forward_kwargs(part, "clean"), **last_position_kwargs(pm)}
        total = None
        for alpha in alphas:
            g = pm.forward.zero_mask_grads(pm, state, part.clean, kwargs,
                                           lambda out: loss_fn(out[pm.out_slice], part.answers, part.wrong_answers),
                                           start[rows] + alpha * diffs[rs_idx, rows])
            if g is None:
                return None
            total = _accumulate(total, g)
        totals.append(total)
    return totals[0] if not per_prompt else {k: torch.stack([t[k] for t in totals]) for k in totals[0]}
