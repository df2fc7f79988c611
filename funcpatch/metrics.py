"""Metrics on model outputs and on prune scores: pure functions.

Shapes used throughout:

- ``logits``: ``[batch, vocab]`` (already sliced to the answer position),
  ``[batch, seq, vocab]`` (a metric per position, averaged over ``seq``), or ``[vocab]``
  (one prompt without its batch dimension, e.g. inside ``torch.func.vmap``; the
  per-prompt value is then a 0-d tensor).
- ``answers`` / ``wrong_answers``: an integer tensor ``[batch, n_answers]``; with 3-d
  logits also ``[batch, seq, n_answers]`` (answers per position); with 1-d logits
  ``[n_answers]``. Or, when prompts have different numbers of answers, a list of
  ``batch`` 1-d integer tensors (``[seq, n_i]`` also allowed with 3-d logits).

Every function returns a 0-d tensor averaged over the batch (and positions), or with
``per_prompt=True`` a ``[batch]`` tensor (averaged over positions only). The
differentiable ones (``logit_diff``, ``prob_diff``, ``logprob_diff``, ``answer_value``,
``answer_diff``, ``logit_diff_percent``, ``kl_divergence``) compose with ``torch.func``
(``grad``, ``vmap``); the accuracy-style ones return float tensors with no gradient.

The curve metrics (``area_under_curve``, ``measurements_auc``, ``roc``, ``roc_auc``,
``faithfulness``, ``faithfulness_curve``, ``cpr``, ``cmd``) work on plain numbers.
"""

from __future__ import annotations

import math
import numbers
from typing import List, Mapping, Optional, Sequence, Tuple, Union

import torch

Answers = Union[torch.Tensor, Sequence[torch.Tensor]]

__all__ = [
    "Answers",
    "ANSWER_KINDS",
    "answer_value",
    "answer_diff",
    "logit_diff",
    "prob_diff",
    "logprob_diff",
    "logit_diff_percent",
    "kl_divergence",
    "correct_answer_percent",
    "correct_answer_greater_than_incorrect_percent",
    "area_under_curve",
    "measurements_auc",
    "roc",
    "roc_auc",
    "MIB_PERCENTAGES",
    "mib_edge_counts",
    "faithfulness",
    "FaithfulnessUndefinedError",
    "faithfulness_curve",
    "cpr",
    "cmd",
]

# --------------------------------------------------------------------------------------
# Validation and gathering
# --------------------------------------------------------------------------------------

#: canonical kind -> aliases (the auto-circuit ``prob_func`` names are accepted too)
ANSWER_KINDS = {
    "logit": ("logit", "logits"),
    "prob": ("prob", "probs", "softmax"),
    "logprob": ("logprob", "logprobs", "log_softmax"),
}
_KIND_ALIASES = {alias: kind for kind, aliases in ANSWER_KINDS.items() for alias in aliases}


def _canonical_kind(kind) -> str:
    if isinstance(kind, str) and kind in _KIND_ALIASES:
        return _KIND_ALIASES[kind]
    raise ValueError(f"Unknown kind {kind!r}: expected one of {sorted(ANSWER_KINDS)}")


def _apply_kind(logits: torch.Tensor, kind: str) -> torch.Tensor:
    kind = _canonical_kind(kind)
    if kind == "prob":
        return torch.softmax(logits, dim=-1)
    if kind == "logprob":
        return torch.log_softmax(logits, dim=-1)
    return logits


def _check_logits(logits, what: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.dim() not in (1, 2, 3):
        raise ValueError(
            f"{what} must be [batch, vocab], [batch, seq, vocab] or [vocab], got shape {tuple(logits.shape)}"
        )
    if logits.shape[-1] == 0:
        raise ValueError(f"{what} has an empty vocab dimension: shape {tuple(logits.shape)}")
    if logits.dim() > 1 and logits.shape[0] == 0:
        raise ValueError(f"{what} has an empty batch: shape {tuple(logits.shape)}")


def _is_transformed(t: torch.Tensor) -> bool:
    """True for a tensor wrapped by a torch.func transform (its values cannot be read)."""
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check(t)) if check is not None else False


def _check_ids(ids: torch.Tensor, vocab: int, what: str) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{what} must be an integer tensor of token ids, got dtype {ids.dtype}")
    if ids.numel() == 0 or ids.shape[-1] == 0:
        raise ValueError(f"{what} holds no token ids (shape {tuple(ids.shape)}); each prompt needs at least one")
    if _is_transformed(ids):
        return  # values are not readable under vmap/grad; the shape checks above still hold
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{what} holds token id {bad}, outside the vocab [0, {vocab})")


def _gathered(vals: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``vals[..., ids]`` per row: ``vals [*lead, vocab]``, ``ids [*lead or prefix, n]``."""
    ids = ids.long().to(vals.device)  # over several devices the logits are on the last one
    if ids.dim() < vals.dim():  # [batch, n] with [batch, seq, vocab]: same ids at every position
        ids = ids.unsqueeze(1).expand(vals.shape[0], vals.shape[1], ids.shape[-1])
    return torch.gather(vals, -1, ids)


def _per_row_values(vals: torch.Tensor, answers: Answers, what: str, reduce: str = "mean") -> torch.Tensor:
    """Reduce (mean/min/max) ``vals`` over each prompt's answer ids.

    ``vals``: ``[batch, vocab]`` or ``[batch, seq, vocab]`` (1-d inputs are unsqueezed
    by the caller). Returns ``[batch]`` or ``[batch, seq]``.
    """
    red = {"mean": lambda x: x.mean(-1), "min": lambda x: x.amin(-1), "max": lambda x: x.amax(-1)}[reduce]
    batch, vocab = vals.shape[0], vals.shape[-1]
    seq_shape = tuple(vals.shape[1:-1])
    if isinstance(answers, torch.Tensor):
        ok_shapes = (2,) if vals.dim() == 2 else (2, 3)
        if answers.dim() not in ok_shapes:
            want = "[batch, n]" if vals.dim() == 2 else "[batch, n] or [batch, seq, n]"
            raise ValueError(f"{what} must have shape {want} for logits of shape {tuple(vals.shape)}, "
                             f"got {tuple(answers.shape)}")
        if answers.shape[0] != batch:
            raise ValueError(f"{what} has batch size {answers.shape[0]} but logits have batch size {batch}")
        if answers.dim() == 3 and tuple(answers.shape[1:-1]) != seq_shape:
            raise ValueError(f"{what} has {answers.shape[1]} positions but logits have {seq_shape[0]}")
        _check_ids(answers, vocab, what)
        return red(_gathered(vals, answers))
    if isinstance(answers, (list, tuple)):
        if len(answers) != batch:
            raise ValueError(f"{what} is a list of {len(answers)} tensors but logits have batch size {batch}")
        rows = []
        for i, (row, ids) in enumerate(zip(vals, answers)):
            name = f"{what}[{i}]"
            _check_ids(ids, vocab, name)
            ok = (1,) if vals.dim() == 2 else (1, 2)
            if ids.dim() not in ok:
                raise ValueError(f"{name} must be a 1-d tensor of token ids, got shape {tuple(ids.shape)}")
            if ids.dim() == 2 and tuple(ids.shape[:-1]) != seq_shape:
                raise ValueError(f"{name} has {ids.shape[0]} positions but logits have {seq_shape[0]}")
            ids = ids.long().to(row.device)
            if vals.dim() == 3 and ids.dim() == 1:
                ids = ids.unsqueeze(0).expand(row.shape[0], ids.shape[0])
            rows.append(red(torch.gather(row, -1, ids)))
        return torch.stack(rows)
    raise TypeError(f"{what} must be an integer tensor or a list of 1-d integer tensors, got {type(answers).__name__}")


def _prepare(logits: torch.Tensor, *answer_sets: Answers, what: str = "logits"):
    """Validate logits; lift a single unbatched prompt ``[vocab]`` to ``[1, vocab]``."""
    _check_logits(logits, what)
    if logits.dim() != 1:
        return logits, answer_sets, False
    lifted = []
    for a in answer_sets:
        if not isinstance(a, torch.Tensor) or a.dim() != 1:
            shape = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
            raise ValueError(f"with 1-d logits [vocab] the answers must be a 1-d tensor [n_answers], got {shape}")
        lifted.append(a.unsqueeze(0))
    return logits.unsqueeze(0), tuple(lifted), True


def _finish(per_pos: torch.Tensor, per_prompt: bool, unbatched: bool) -> torch.Tensor:
    """``[batch]`` or ``[batch, seq]`` -> ``[batch]`` (per_prompt) or 0-d mean."""
    per_row = per_pos.mean(-1) if per_pos.dim() == 2 else per_pos
    if per_prompt:
        return per_row[0] if unbatched else per_row
    return per_row.mean()


# --------------------------------------------------------------------------------------
# Answer metrics
# --------------------------------------------------------------------------------------


def answer_value(
    logits: torch.Tensor, answers: Answers, kind: str = "logit", *, per_prompt: bool = False
) -> torch.Tensor:
    """Mean value of the answer tokens, averaged over the batch.

    ``kind``: ``"logit"`` (raw logits), ``"prob"`` (softmax over vocab) or ``"logprob"``
    (log-softmax over vocab). For each prompt the value is the mean over its answer ids.

    Args:
        logits: ``[batch, vocab]``, ``[batch, seq, vocab]`` or ``[vocab]``.
        answers: ``[batch, n]`` (``[batch, seq, n]``, ``[n]``) ints or a ragged list.
        per_prompt: return ``[batch]`` instead of the batch mean.

    Returns:
        0-d tensor, or ``[batch]`` with ``per_prompt=True``.
    """
    logits, (answers,), unbatched = _prepare(logits, answers)
    vals = _apply_kind(logits, kind)
    return _finish(_per_row_values(vals, answers, "answers"), per_prompt, unbatched)


def answer_diff(
    logits: torch.Tensor,
    answers: Answers,
    wrong_answers: Answers,
    kind: str = "logit",
    *,
    per_prompt: bool = False,
) -> torch.Tensor:
    """Per prompt: mean value over ``answers`` minus mean value over ``wrong_answers``
    (values as in :func:`answer_value`), then averaged over the batch.

    Returns:
        0-d tensor, or ``[batch]`` with ``per_prompt=True``.
    """
    logits, (answers, wrong_answers), unbatched = _prepare(logits, answers, wrong_answers)
    vals = _apply_kind(logits, kind)
    diff = _per_row_values(vals, answers, "answers") - _per_row_values(vals, wrong_answers, "wrong_answers")
    return _finish(diff, per_prompt, unbatched)


def logit_diff(logits, answers, wrong_answers, *, per_prompt: bool = False) -> torch.Tensor:
    """Mean answer logit minus mean wrong-answer logit, averaged over the batch.

    ``logits [batch, vocab]`` (or ``[batch, seq, vocab]``, ``[vocab]``); answers
    ``[batch, n]`` ints or a ragged list. Returns a 0-d tensor (``[batch]`` with
    ``per_prompt=True``). Antisymmetric: swapping answers and wrong answers negates it.
    """
    return answer_diff(logits, answers, wrong_answers, "logit", per_prompt=per_prompt)


def prob_diff(logits, answers, wrong_answers, *, per_prompt: bool = False) -> torch.Tensor:
    """As :func:`logit_diff` on ``softmax(logits, -1)``."""
    return answer_diff(logits, answers, wrong_answers, "prob", per_prompt=per_prompt)


def logprob_diff(logits, answers, wrong_answers, *, per_prompt: bool = False) -> torch.Tensor:
    """As :func:`logit_diff` on ``log_softmax(logits, -1)`` (mathematically equal to
    :func:`logit_diff`: the log-normaliser cancels in the difference)."""
    return answer_diff(logits, answers, wrong_answers, "logprob", per_prompt=per_prompt)


def logit_diff_percent(
    patched_logits: torch.Tensor,
    clean_logits: torch.Tensor,
    answers: Answers,
    wrong_answers: Answers,
    kind: str = "logit",
    *,
    per_prompt: bool = False,
) -> torch.Tensor:
    """How much of the clean (full model) answer difference the patched model keeps, in %.

    Default (auto-circuit's ``diff_of_means=True``):
    ``100 * mean_b(diff_patched[b]) / mean_b(diff_clean[b])``. With ``per_prompt=True``:
    ``100 * diff_patched / diff_clean`` per prompt, ``[batch]`` (auto-circuit's
    ``diff_of_means=False`` reports the mean of these). ``diff`` is :func:`answer_diff`
    with the given ``kind``. A zero clean difference gives ``inf``/``nan`` (plain
    tensor division, so the function stays usable under ``torch.func`` transforms).

    Args:
        patched_logits, clean_logits: same shape, ``[batch, vocab]`` or
            ``[batch, seq, vocab]``.
    """
    _check_logits(patched_logits, "patched_logits")
    _check_logits(clean_logits, "clean_logits")
    if patched_logits.shape != clean_logits.shape:
        raise ValueError(
            f"patched_logits {tuple(patched_logits.shape)} and clean_logits {tuple(clean_logits.shape)} "
            "must have the same shape"
        )
    patched = answer_diff(patched_logits, answers, wrong_answers, kind, per_prompt=per_prompt)
    clean = answer_diff(clean_logits, answers, wrong_answers, kind, per_prompt=per_prompt)
    return patched / clean * 100.0


def kl_divergence(logits: torch.Tensor, target_logits: torch.Tensor, *, per_prompt: bool = False) -> torch.Tensor:
    """``KL(target || patched)`` over the vocab, averaged over every other position.

    ``sum_v q_v (log q_v - log p_v)`` with ``q = softmax(target_logits)`` (the clean /
    full model) and ``p = softmax(logits)`` (the circuit), then the mean over all leading
    positions (batch, and seq if present) — auto-circuit's ``multibatch_kl_div``
    ("batchmean" over every non-vocab dimension). Terms with ``q_v = 0`` count as 0.
    Not clamped at 0: tiny negative values from rounding can occur (auto-circuit clamps
    the reported float with ``max(kl, 0)``).

    Args:
        logits, target_logits: same shape, ``[batch, vocab]``, ``[batch, seq, vocab]``
            or ``[vocab]``.
        per_prompt: return ``[batch]`` (mean over seq) instead of the overall mean.
    """
    _check_logits(logits, "logits")
    _check_logits(target_logits, "target_logits")
    if logits.shape != target_logits.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target_logits {tuple(target_logits.shape)} must have the same shape"
        )
    unbatched = logits.dim() == 1
    if unbatched:
        logits, target_logits = logits.unsqueeze(0), target_logits.unsqueeze(0)
    logp = torch.log_softmax(logits, dim=-1)
    logq = torch.log_softmax(target_logits, dim=-1)
    q = logq.exp()
    safe_logq = torch.where(q > 0, logq, torch.zeros_like(logq))
    kl = (q * (safe_logq - logp)).sum(-1)  # [batch] or [batch, seq]
    return _finish(kl, per_prompt, unbatched)


def correct_answer_percent(logits: torch.Tensor, answers: Answers, *, per_prompt: bool = False) -> torch.Tensor:
    """Percentage of prompts (and positions) whose argmax token is one of the answers.

    ``torch.argmax`` breaks ties by the lowest token id, as auto-circuit does (which only
    allows a single answer per prompt; any number is allowed here).

    Returns:
        0-d float tensor in ``[0, 100]``, or ``[batch]`` with ``per_prompt=True``.
    """
    logits, (answers,), unbatched = _prepare(logits, answers)
    top = torch.argmax(logits, dim=-1, keepdim=True)  # [batch, (seq,) 1]
    # value 1 at the argmax token, 0 elsewhere; "max over answers" = any answer is argmax
    onehot = torch.zeros_like(logits).scatter(-1, top, 1.0)
    hit = _per_row_values(onehot.detach(), answers, "answers", reduce="max")
    return _finish(hit * 100.0, per_prompt, unbatched)


def correct_answer_greater_than_incorrect_percent(
    logits: torch.Tensor, answers: Answers, wrong_answers: Answers, *, per_prompt: bool = False
) -> torch.Tensor:
    """Percentage of prompts (and positions) whose lowest answer logit is strictly greater
    than their highest wrong-answer logit.

    Note: auto-circuit (single answer) takes ``argmax`` over ``[answer, *wrong]``, which
    counts an exact tie with the best wrong answer as correct; here a tie is incorrect.

    Returns:
        0-d float tensor in ``[0, 100]``, or ``[batch]`` with ``per_prompt=True``.
    """
    logits, (answers, wrong_answers), unbatched = _prepare(logits, answers, wrong_answers)
    vals = logits.detach()
    lo = _per_row_values(vals, answers, "answers", reduce="min")
    hi = _per_row_values(vals, wrong_answers, "wrong_answers", reduce="max")
    return _finish((lo > hi).to(vals.dtype) * 100.0, per_prompt, unbatched)


# --------------------------------------------------------------------------------------
# Curves
# --------------------------------------------------------------------------------------


def _floats(xs, what: str) -> List[float]:
    if isinstance(xs, torch.Tensor):
        if xs.dim() != 1:
            raise ValueError(f"{what} must be 1-d, got shape {tuple(xs.shape)}")
        out = [float(v) for v in xs.detach().cpu().tolist()]
    else:
        try:
            out = [float(v) for v in xs]
        except (TypeError, ValueError) as e:
            raise TypeError(f"{what} must be a sequence of numbers: {e}") from None
    for v in out:
        if not math.isfinite(v):
            raise ValueError(f"{what} holds a non-finite value {v}")
    return out


def _trapezoid(xs: Sequence[float], ys: Sequence[float]) -> float:
    return sum((x2 - x1) * (y1 + y2) / 2.0 for x1, x2, y1, y2 in zip(xs, xs[1:], ys, ys[1:]))


def area_under_curve(xs, ys, log_x: bool = False, log_eps: float = 1e-3) -> float:
    """Trapezoid-rule area under the points ``(xs[i], ys[i])``, sorted by x.

    With ``log_x=True`` the x axis is ``log10(x + log_eps)`` (base 10, as auto-circuit
    plots edge counts), so ``x = 0`` (the empty circuit) stays on the axis. Nothing is
    normalised: the area is in units of (transformed) x times y. A single point has
    area 0.

    Args:
        xs, ys: 1-d sequences/tensors of the same length (>= 1), finite.
        log_x: use the log x axis; needs every ``x + log_eps > 0``.
        log_eps: shift added before the log (> 0).

    Note:
        auto-circuit's own ``measurements_auc`` differs (skips segments touching
        ``x = 0`` on a log axis, subtracts the y of the first point); see
        :func:`measurements_auc` for that exact calculation.
    """
    xs_f, ys_f = _floats(xs, "xs"), _floats(ys, "ys")
    if len(xs_f) != len(ys_f):
        raise ValueError(f"xs has {len(xs_f)} values but ys has {len(ys_f)}")
    if not xs_f:
        raise ValueError("area_under_curve needs at least one point")
    pts = sorted(zip(xs_f, ys_f), key=lambda p: p[0])
    xs_f = [p[0] for p in pts]
    ys_f = [p[1] for p in pts]
    if log_x:
        if not log_eps > 0:
            raise ValueError(f"log_eps must be > 0, got {log_eps}")
        if xs_f[0] + log_eps <= 0:
            raise ValueError(f"log_x needs x + log_eps > 0 for every x; got x = {xs_f[0]}")
        xs_f = [math.log10(x + log_eps) for x in xs_f]
    return _trapezoid(xs_f, ys_f)


def measurements_auc(
    points: Sequence[Tuple[float, float]],
    log_x: bool = False,
    log_y: bool = False,
    y_min: Optional[float] = None,
    eps: float = 1e-3,
) -> float:
    """auto-circuit's ``measurements_auc``: area of ``(x, y)`` points (one at ``x = 0``)
    above the y of the ``x = 0`` point.

    Points are sorted by x and the first must have ``x == 0``; its y is the baseline
    subtracted from every height. With ``log_x`` the x axis is ``log10(x)`` and segments
    touching ``x = 0`` are skipped. With ``log_y`` (needs ``y_min > 0``) each y becomes
    ``log10(max(y, y_min)) - log10(y_min)`` (the baseline stays the raw first y, as in
    auto-circuit). Trapezoid rule; the result is ``max(area, eps)``.
    """
    pts = sorted(((float(x), float(y)) for x, y in points), key=lambda p: p[0])
    if not pts:
        raise ValueError("measurements_auc needs at least one point")
    if pts[0][0] != 0:
        raise ValueError(f"measurements_auc needs a point at x = 0 (the empty circuit); smallest x is {pts[0][0]}")
    if log_y and (y_min is None or not y_min > 0):
        raise ValueError(f"log_y needs y_min > 0, got {y_min!r}")
    if any(x < 0 for x, _ in pts):
        raise ValueError("measurements_auc needs every x >= 0")
    baseline = pts[0][1]
    area = 0.0
    for (x1, y1), (x2, y2) in zip(pts, pts[1:]):
        if log_y:
            y1 = math.log10(max(y1, y_min)) - math.log10(y_min)  # type: ignore[arg-type]
            y2 = math.log10(max(y2, y_min)) - math.log10(y_min)  # type: ignore[arg-type]
        if log_x:
            if x1 == 0 or x2 == 0:
                continue
            x1, x2 = math.log10(x1), math.log10(x2)
        area += (x2 - x1) * ((y1 - baseline) + (y2 - baseline)) / 2.0
    return max(area, eps)


def _flat_pairs(prune_scores: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]):
    if not isinstance(prune_scores, Mapping) or not isinstance(reference, Mapping):
        raise TypeError("prune_scores and reference_edges_mask must be dicts of module name -> tensor")
    if not prune_scores:
        raise ValueError("prune_scores is empty")
    missing = sorted(set(prune_scores) - set(reference))
    extra = sorted(set(reference) - set(prune_scores))
    if missing or extra:
        raise ValueError(
            f"reference_edges_mask must have the same modules as prune_scores; "
            f"missing from it: {missing}, not in prune_scores: {extra}"
        )
    scores, labels = [], []
    for name, s in prune_scores.items():
        m = reference[name]
        if not isinstance(s, torch.Tensor) or not isinstance(m, torch.Tensor):
            raise TypeError(f"prune_scores[{name!r}] and reference_edges_mask[{name!r}] must be tensors")
        if m.dtype != torch.bool:
            raise TypeError(f"reference_edges_mask[{name!r}] must be a bool tensor, got dtype {m.dtype}")
        if s.shape != m.shape:
            raise ValueError(
                f"prune_scores[{name!r}] has shape {tuple(s.shape)} but reference_edges_mask[{name!r}] "
                f"has shape {tuple(m.shape)}"
            )
        scores.append(s.detach().reshape(-1).abs().to(torch.float64).cpu())
        labels.append(m.reshape(-1).cpu())
    flat_s, flat_l = torch.cat(scores), torch.cat(labels)
    if torch.isnan(flat_s).any():
        raise ValueError("prune_scores contain NaN; edges cannot be ranked by NaN scores")
    return flat_s, flat_l


def _roc_counts(prune_scores, reference_edges_mask):
    """(FP counts, TP counts, n_neg, n_pos) at each distinct threshold, from the empty
    circuit to all edges; the counts are int64 tensors."""
    s, lab = _flat_pairs(prune_scores, reference_edges_mask)
    n_pos = int(lab.sum())
    n_neg = lab.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"reference_edges_mask has {n_pos} true and {n_neg} false edges; ROC needs at least one of each"
        )
    order = torch.argsort(s, descending=True, stable=True)
    s, lab = s[order], lab[order]
    tp = torch.cumsum(lab.to(torch.int64), 0)
    fp = torch.cumsum((~lab).to(torch.int64), 0)
    # the last index of each run of equal scores: the circuit at that threshold
    ends = torch.cat([torch.nonzero(s[1:] != s[:-1]).reshape(-1), torch.tensor([s.numel() - 1])])
    zero = torch.zeros(1, dtype=torch.int64)
    return torch.cat([zero, fp[ends]]), torch.cat([zero, tp[ends]]), n_neg, n_pos


def roc(
    prune_scores: Mapping[str, torch.Tensor], reference_edges_mask: Mapping[str, torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """ROC curve of prune scores against a known circuit.

    The threshold sweeps down over the distinct ``|score|`` values; at each, the circuit
    is every edge with ``|score| >= threshold`` (the tie rule of
    :mod:`funcpatch.edge_counts`, so tied edges enter together and give one diagonal
    step). ``TPR = TP / n_true_edges``, ``FPR = FP / n_other_edges``.

    Args:
        prune_scores: module name -> scores.
        reference_edges_mask: module name -> bool tensor of the same shape, ``True`` for
            edges of the true circuit. Same modules as ``prune_scores``.

    Returns:
        ``(fpr, tpr)``: 1-d float64 tensors of the same length, from ``(0, 0)`` (the empty
        circuit) to ``(1, 1)``, both non-decreasing.

    Raises:
        ValueError: mismatched modules/shapes, NaN scores, or a reference with no true
            edge or no false edge (a rate would be 0/0).
    """
    fp, tp, n_neg, n_pos = _roc_counts(prune_scores, reference_edges_mask)
    return fp.to(torch.float64) / n_neg, tp.to(torch.float64) / n_pos


def roc_auc(prune_scores: Mapping[str, torch.Tensor], reference_edges_mask: Mapping[str, torch.Tensor]) -> float:
    """Area under :func:`roc` (trapezoid over FPR): 1 for a perfect ranking, 0 for the
    reversed one, 0.5 when all scores are tied."""
    fp, tp, n_neg, n_pos = _roc_counts(prune_scores, reference_edges_mask)
    # trapezoid rule on integer counts (exact), then one division
    twice_area = int((fp.diff() * (tp[1:] + tp[:-1])).sum())
    return twice_area / (2 * n_neg * n_pos)


# --------------------------------------------------------------------------------------
# MIB faithfulness (Mechanistic Interpretability Benchmark, circuit localisation track)
# --------------------------------------------------------------------------------------

#: Circuit sizes of the MIB faithfulness curve, in percent of all edges.
MIB_PERCENTAGES: Tuple[float, ...] = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)


def _check_percentages(percentages) -> List[float]:
    ps = _floats(percentages, "percentages")
    if not ps:
        raise ValueError("percentages is empty")
    for p in ps:
        if not 0 <= p <= 100:
            raise ValueError(f"percentage {p} is outside [0, 100]")
    if any(b <= a for a, b in zip(ps, ps[1:])):
        raise ValueError(f"percentages must be strictly increasing, got {ps}")
    return ps


def mib_edge_counts(n_edges: int, percentages: Sequence[float] = MIB_PERCENTAGES) -> List[int]:
    """The edge count MIB uses for each percentage: ``int(p / 100 * n_edges)``."""
    if isinstance(n_edges, bool) or not isinstance(n_edges, numbers.Integral) or n_edges < 0:
        raise ValueError(f"n_edges must be a non-negative int, got {n_edges!r}")
    return [int(p / 100 * int(n_edges)) for p in _check_percentages(percentages)]


class FaithfulnessUndefinedError(ZeroDivisionError, ValueError):
    """Raised when ``m_full == m_empty``: faithfulness is 0/0 or x/0."""


def faithfulness(m_circuit, m_empty, m_full):
    """MIB faithfulness ``(m(circuit) - m(empty)) / (m(full) - m(empty))``.

    1 means the circuit recovers the full model's metric, 0 means it does no better than
    the empty circuit (everything ablated). Floats give a float; tensors broadcast and
    keep their gradient.

    Raises:
        FaithfulnessUndefinedError: (both a ``ZeroDivisionError`` and a ``ValueError``)
            when ``m_full == m_empty``: the metric does not separate the full model
            from the empty circuit, so faithfulness is undefined.
    """
    denom = m_full - m_empty
    if isinstance(denom, torch.Tensor):
        if bool((denom == 0).any()):
            raise FaithfulnessUndefinedError(
                "faithfulness is undefined: m_full == m_empty, so the metric does not separate the "
                "full model from the empty circuit"
            )
        return (m_circuit - m_empty) / denom
    if denom == 0:
        raise FaithfulnessUndefinedError(
            f"faithfulness is undefined: m_full == m_empty == {m_full!r}, so the metric does not "
            "separate the full model from the empty circuit"
        )
    return (m_circuit - m_empty) / denom


def faithfulness_curve(
    metric_by_edge_count: Mapping[int, float],
    n_edges: int,
    m_empty: float,
    m_full: float,
    percentages: Sequence[float] = MIB_PERCENTAGES,
) -> Tuple[List[float], List[float]]:
    """MIB faithfulness at each percentage of edges.

    For each percentage ``p`` the circuit has ``int(p / 100 * n_edges)`` edges
    (:func:`mib_edge_counts`); its metric is looked up in ``metric_by_edge_count`` and
    turned into :func:`faithfulness`.

    Args:
        metric_by_edge_count: edge count -> metric of that circuit (floats or 0-d
            tensors). Must hold every count of :func:`mib_edge_counts`. Beware that with
            tied scores a circuit of nominal size ``k`` can hold more edges (see
            ``funcpatch.edge_counts.circuit_size_at``): key by the counts you asked for.
        n_edges: number of edges in the model.
        m_empty: the metric with every edge ablated.
        m_full: the metric of the full (unablated) model.
        percentages: strictly increasing percentages in ``[0, 100]``.

    Returns:
        ``(percentages, faithfulness values)`` as two lists of floats.
    """
    ps = _check_percentages(percentages)
    counts = mib_edge_counts(n_edges, ps)
    missing = [c for c in counts if c not in metric_by_edge_count]
    if missing:
        have = sorted(metric_by_edge_count)
        raise KeyError(
            f"metric_by_edge_count has no value for edge counts {missing} (needed for percentages "
            f"{[p for p, c in zip(ps, counts) if c in missing]} of {n_edges} edges); it has {have[:20]}"
            f"{' ...' if len(have) > 20 else ''}. Evaluate the circuits at mib_edge_counts(n_edges)."
        )
    m_empty_f, m_full_f = float(m_empty), float(m_full)
    fs = [float(faithfulness(float(metric_by_edge_count[c]), m_empty_f, m_full_f)) for c in counts]
    return ps, fs


def _curve_area(percentages, f, transform) -> float:
    ps = _check_percentages(percentages)
    fs = _floats(f, "f")
    if len(ps) != len(fs):
        raise ValueError(f"percentages has {len(ps)} values but f has {len(fs)}")
    if len(ps) < 2:
        raise ValueError("an area needs at least two points")
    return _trapezoid([p / 100.0 for p in ps], [transform(v) for v in fs])


def cpr(percentages: Sequence[float], f: Sequence[float]) -> float:
    """MIB CPR (circuit performance ratio): area under the faithfulness curve.

    Normalisation, exactly as MIB computes it: x is the *fraction* of edges
    (``percentage / 100``, a linear axis), the trapezoid rule runs over consecutive given
    points only (no extrapolation to x = 0), and the sum is not divided by the x range.
    With :data:`MIB_PERCENTAGES` the x range is ``0.001 .. 1``, so ``f = 1`` everywhere
    gives 0.999. Higher is better.
    """
    return _curve_area(percentages, f, lambda v: v)


def cmd(percentages: Sequence[float], f: Sequence[float]) -> float:
    """MIB CMD (circuit-model distance): area under ``|1 - f|``, normalised exactly like
    :func:`cpr` (trapezoid over x = fraction of edges, given points only, no division by
    the x range). 0 means every circuit matches the full model. Lower is better."""
    return _curve_area(percentages, f, lambda v: abs(1.0 - v))
