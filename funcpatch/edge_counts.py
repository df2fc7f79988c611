"""Edge counts to test, and where prune scores cut a circuit of a given size.

``PruneScores`` is a ``dict[str, torch.Tensor]``: destination module name -> score
tensor of the same shape as that module's mask. A higher ``|score|`` means a more
important edge. All functions here are pure: they never modify their inputs.

The tie rule (the same as auto-circuit's ``run_circuits``): a circuit of
``edge_count`` edges is every edge whose ``|score|`` is ``>=`` the ``|score|`` of the
``edge_count``-th highest edge (:func:`prune_scores_threshold`). When scores are tied
at that threshold the circuit holds more than ``edge_count`` edges;
:func:`circuit_size_at` gives the real size and :func:`circuit_edge_masks` the edges.
"""

from __future__ import annotations

import enum
import numbers
from typing import Collection, Dict, List, Mapping, Optional, Sequence, Union

import torch

PruneScores = Dict[str, torch.Tensor]

__all__ = [
    "EdgeCounts",
    "TestEdges",
    "PruneScores",
    "flat_prune_scores",
    "desc_prune_scores",
    "prune_scores_threshold",
    "circuit_size_at",
    "circuit_edge_masks",
    "logarithmic_edge_counts",
    "edge_counts_util",
]


class EdgeCounts(enum.Enum):
    """How :func:`edge_counts_util` chooses the circuit sizes to test.

    - ``ALL``: every size ``0, 1, ..., n_edges``.
    - ``LOGARITHMIC``: ``1..9, 10, 20, ..., 90, 100, 200, ...`` below ``n_edges``
      (every ``n`` that is a multiple of the largest power of ten ``<= n``).
    - ``GROUPS``: one size per distinct ``|score|``: the number of edges whose
      ``|score|`` is ``>=`` that value (the circuit sizes the tie rule can produce).
    """

    ALL = "all"
    LOGARITHMIC = "logarithmic"
    GROUPS = "groups"


#: What ``test_counts`` accepts: an :class:`EdgeCounts`, or an explicit list whose
#: ints are edge counts and whose floats are fractions of ``n_edges``.
TestEdges = Union[EdgeCounts, Sequence[Union[int, float]]]


def _check_prune_scores(prune_scores: Mapping[str, torch.Tensor], what: str = "prune_scores") -> None:
    if not isinstance(prune_scores, Mapping):
        raise TypeError(
            f"{what} must be a dict mapping destination module names to score tensors, "
            f"got {type(prune_scores).__name__}"
        )
    if len(prune_scores) == 0:
        raise ValueError(f"{what} is empty: it must hold at least one score tensor")
    for name, scores in prune_scores.items():
        if not isinstance(scores, torch.Tensor):
            raise TypeError(f"{what}[{name!r}] must be a torch.Tensor, got {type(scores).__name__}")
        if scores.dtype == torch.bool or scores.is_complex():
            raise TypeError(f"{what}[{name!r}] must hold real numbers, got dtype {scores.dtype}")


def flat_prune_scores(prune_scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """All scores as one 1-d tensor ``[n_scored_edges]``, in dict order, signs kept."""
    _check_prune_scores(prune_scores)
    return torch.cat([scores.reshape(-1) for scores in prune_scores.values()])


def desc_prune_scores(prune_scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Every ``|score|``, flattened into one 1-d tensor and sorted in descending order.

    Args:
        prune_scores: module name -> score tensor (any shapes).

    Returns:
        ``[n_scored_edges]`` tensor of absolute scores, largest first.

    Raises:
        ValueError: if the dict is empty or a score is NaN (NaN has no place in an
            ordering of edges).
    """
    flat = flat_prune_scores(prune_scores).abs()
    if torch.isnan(flat).any():
        bad = [name for name, s in prune_scores.items() if torch.isnan(s).any()]
        raise ValueError(f"prune_scores contain NaN in {bad}; edges cannot be ranked by NaN scores")
    return torch.sort(flat, descending=True).values


def _check_count(edge_count, n: int, what: str = "edge_count") -> int:
    if isinstance(edge_count, bool) or not isinstance(edge_count, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {edge_count!r} ({type(edge_count).__name__})")
    edge_count = int(edge_count)
    if edge_count < 0 or edge_count > n:
        raise ValueError(f"{what}={edge_count} is out of range: it must be in [0, {n}] (the number of scored edges)")
    return edge_count


def prune_scores_threshold(
    prune_scores: Union[Mapping[str, torch.Tensor], torch.Tensor], edge_count: int
) -> torch.Tensor:
    """The ``|score|`` of the ``edge_count``-th highest edge (a 0-d tensor).

    The circuit of size ``edge_count`` is every edge with ``|score| >= threshold``.
    ``edge_count == 0`` gives ``+inf`` (no edge with a finite score is included).

    Args:
        prune_scores: module name -> scores, or the already flattened, descending
            1-d tensor that :func:`desc_prune_scores` returns (to avoid re-sorting; it
            is trusted to be sorted).
        edge_count: in ``[0, n_scored_edges]``.
    """
    if isinstance(prune_scores, torch.Tensor):
        if prune_scores.dim() != 1:
            raise ValueError(
                "a tensor passed as prune_scores must be the 1-d descending |scores| from "
                f"desc_prune_scores, got shape {tuple(prune_scores.shape)}"
            )
        desc = prune_scores
    else:
        desc = desc_prune_scores(prune_scores)
    edge_count = _check_count(edge_count, desc.numel())
    if edge_count == 0:
        return torch.tensor(float("inf"), dtype=desc.dtype if desc.is_floating_point() else torch.float32,
                            device=desc.device)
    return desc[edge_count - 1]


def circuit_edge_masks(prune_scores: Mapping[str, torch.Tensor], edge_count: int) -> Dict[str, torch.Tensor]:
    """The circuit of (nominal) size ``edge_count``: module name -> bool tensor
    (same shape as the scores), ``True`` where ``|score| >= threshold``."""
    threshold = prune_scores_threshold(prune_scores, edge_count)
    return {name: scores.abs() >= threshold for name, scores in prune_scores.items()}


def circuit_size_at(prune_scores: Mapping[str, torch.Tensor], edge_count: int) -> int:
    """The real number of edges in the circuit of nominal size ``edge_count``.

    Equal to ``edge_count`` unless scores are tied at the threshold, in which case every
    tied edge is in the circuit and the size is larger. (``edge_count == 0`` gives 0
    unless some score is infinite.)
    """
    return int(sum(int(m.sum()) for m in circuit_edge_masks(prune_scores, edge_count).values()))


def logarithmic_edge_counts(n_edges: int) -> List[int]:
    """``[n for n in 1..n_edges-1 if n is a multiple of the largest power of 10 <= n]``,
    i.e. ``1..9, 10, 20, ..., 90, 100, 200, ...`` (without 0 and ``n_edges``)."""
    n_edges = _check_n_edges(n_edges)
    # 10 ** (len(str(n)) - 1) is the largest power of ten <= n, computed exactly.
    return [n for n in range(1, n_edges) if n % (10 ** (len(str(n)) - 1)) == 0]


def _check_n_edges(n_edges) -> int:
    if isinstance(n_edges, bool) or not isinstance(n_edges, numbers.Integral):
        raise TypeError(f"n_edges must be an int, got {n_edges!r}")
    if n_edges < 0:
        raise ValueError(f"n_edges must be >= 0, got {n_edges}")
    return int(n_edges)


def _as_edge_counts(test_counts):
    if isinstance(test_counts, str):
        try:
            return EdgeCounts[test_counts.upper()]
        except KeyError:
            pass
    return test_counts


def _group_counts(prune_scores) -> List[int]:
    desc = desc_prune_scores(prune_scores)
    _, counts = torch.unique(desc, sorted=True, return_counts=True)  # ascending values
    return torch.cumsum(counts.flip(0), dim=0).tolist()  # sizes for descending thresholds


def edge_counts_util(
    n_edges_or_edges: Union[int, Collection],
    test_counts: Optional[TestEdges] = None,
    prune_scores: Optional[Mapping[str, torch.Tensor]] = None,
    zero_edges: Optional[bool] = None,
    all_edges: Optional[bool] = None,
    true_edge_count: Optional[int] = None,
) -> List[int]:
    """The list of circuit sizes (numbers of edges) to test, sorted ascending.

    Same semantics as auto-circuit's ``edge_counts_util``:

    1. ``test_counts=None``: ``LOGARITHMIC`` if ``n_edges > 200`` else ``ALL``; but if
       ``prune_scores`` is given and it has fewer than ``min(n_edges / 2, 100)`` distinct
       ``|score|`` values, ``GROUPS``.
    2. ``ALL`` -> ``0..n_edges``; ``LOGARITHMIC`` -> :func:`logarithmic_edge_counts`;
       ``GROUPS`` -> for each distinct ``|score|`` (largest first) the number of edges
       with ``|score| >=`` it (needs ``prune_scores``); an explicit list -> ints are
       kept, floats ``f`` become ``int(n_edges * f)``.
    3. ``zero_edges`` / ``all_edges`` default to ``True`` when the list from step 2 has
       more than 2 entries, else ``False`` (a list of <= 2 is likely a binary circuit
       encoding); then 0 / ``n_edges`` is added when ``True`` and removed when ``False``.
    4. ``true_edge_count`` is added if given, and the list is sorted.

    Deviations, all in the direction of a cleaner contract: duplicates are dropped (the
    defaults in step 3 still use the length before dropping, as auto-circuit does), and
    bad values raise instead of passing through: counts outside ``[0, n_edges]``,
    fractions outside ``[0, 1]``, bools, and unknown ``test_counts``.

    Args:
        n_edges_or_edges: the number of edges in the model, or a collection of the
            edges (only its ``len()`` is used).
        test_counts: ``None``, an :class:`EdgeCounts` (or its name as a string), or a
            list/tuple of ints (counts) and floats (fractions of ``n_edges``).
        prune_scores: module name -> scores; used to infer the default and for
            ``GROUPS``.
        zero_edges: include 0 (``None``: the default of step 3).
        all_edges: include ``n_edges`` (``None``: the default of step 3).
        true_edge_count: an extra count to include (e.g. the size of a known circuit).

    Returns:
        Sorted list of distinct ints in ``[0, n_edges]``.
    """
    if isinstance(n_edges_or_edges, numbers.Integral) and not isinstance(n_edges_or_edges, bool):
        n_edges = _check_n_edges(n_edges_or_edges)
    else:
        try:
            n_edges = len(n_edges_or_edges)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(
                "n_edges_or_edges must be an int (the number of edges) or a collection of edges, "
                f"got {type(n_edges_or_edges).__name__}"
            ) from None

    test_counts = _as_edge_counts(test_counts)
    if test_counts is None:
        test_counts = EdgeCounts.LOGARITHMIC if n_edges > 200 else EdgeCounts.ALL
        if prune_scores is not None:
            n_unique = torch.unique(desc_prune_scores(prune_scores)).numel()
            if n_unique < min(n_edges / 2, 100):
                test_counts = EdgeCounts.GROUPS

    if test_counts is EdgeCounts.ALL:
        counts = list(range(n_edges + 1))
    elif test_counts is EdgeCounts.LOGARITHMIC:
        counts = logarithmic_edge_counts(n_edges)
    elif test_counts is EdgeCounts.GROUPS:
        if prune_scores is None:
            raise ValueError("test_counts=EdgeCounts.GROUPS groups edges by their scores: pass prune_scores")
        counts = _group_counts(prune_scores)
        if counts and counts[-1] > n_edges:
            raise ValueError(
                f"prune_scores hold {counts[-1]} scores but the model has only {n_edges} edges"
            )
    elif isinstance(test_counts, (list, tuple)):
        counts = []
        for i, c in enumerate(test_counts):
            if isinstance(c, bool):
                raise TypeError(f"test_counts[{i}]={c!r}: a bool is neither an edge count nor a fraction")
            if isinstance(c, numbers.Integral):
                counts.append(_check_count(c, n_edges, f"test_counts[{i}]"))
            elif isinstance(c, numbers.Real):
                if not 0.0 <= float(c) <= 1.0:
                    raise ValueError(f"test_counts[{i}]={c!r}: a float is a fraction of n_edges and must be in [0, 1]")
                counts.append(int(n_edges * float(c)))
            else:
                raise TypeError(
                    f"test_counts[{i}]={c!r}: entries must be ints (edge counts) or floats (fractions of n_edges)"
                )
    else:
        valid = ", ".join(f"EdgeCounts.{e.name}" for e in EdgeCounts)
        raise ValueError(
            f"Unknown test_counts: {test_counts!r}. Valid: None, {valid}, or a list of ints "
            "(edge counts) and floats (fractions of n_edges)"
        )

    if zero_edges is None:
        zero_edges = len(counts) > 2
    if all_edges is None:
        all_edges = len(counts) > 2

    out = set(counts)
    if zero_edges:
        out.add(0)
    else:
        out.discard(0)
    if all_edges:
        out.add(n_edges)
    else:
        out.discard(n_edges)
    if true_edge_count is not None:
        out.add(_check_count(true_edge_count, n_edges, "true_edge_count"))
    return sorted(out)
