"""Tests for funcpatch.edge_counts. Expected values are worked out by hand."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from funcpatch.edge_counts import (
    EdgeCounts,
    circuit_edge_masks,
    circuit_size_at,
    desc_prune_scores,
    edge_counts_util,
    flat_prune_scores,
    logarithmic_edge_counts,
    prune_scores_threshold,
)

PS = {"a": torch.tensor([[1.0, -3.0]]), "b": torch.tensor([2.0, -0.5])}
TIED = {"x": torch.tensor([3.0, 2.0]), "y": torch.tensor([[-2.0], [1.0]])}  # |s| = 3, 2, 2, 1


# ----------------------------------------------------------------------------- scores


def test_flat_prune_scores_keeps_order_and_sign():
    assert flat_prune_scores(PS).tolist() == [1.0, -3.0, 2.0, -0.5]


def test_desc_prune_scores():
    assert desc_prune_scores(PS).tolist() == [3.0, 2.0, 1.0, 0.5]
    # inputs untouched
    assert PS["a"].tolist() == [[1.0, -3.0]]


def test_desc_prune_scores_errors():
    with pytest.raises(ValueError, match="empty"):
        desc_prune_scores({})
    with pytest.raises(TypeError, match="dict"):
        desc_prune_scores([torch.ones(2)])
    with pytest.raises(ValueError, match="NaN"):
        desc_prune_scores({"m": torch.tensor([1.0, float("nan")])})
    with pytest.raises(TypeError, match="real numbers"):
        desc_prune_scores({"m": torch.tensor([True])})


def test_prune_scores_threshold():
    assert prune_scores_threshold(PS, 0).item() == math.inf
    assert prune_scores_threshold(PS, 1).item() == 3.0
    assert prune_scores_threshold(PS, 2).item() == 2.0
    assert prune_scores_threshold(PS, 4).item() == 0.5
    # pre-sorted tensor accepted
    assert prune_scores_threshold(torch.tensor([3.0, 2.0, 1.0]), 3).item() == 1.0


def test_prune_scores_threshold_errors():
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        prune_scores_threshold(PS, 5)
    with pytest.raises(ValueError, match="out of range"):
        prune_scores_threshold(PS, -1)
    with pytest.raises(TypeError, match="int"):
        prune_scores_threshold(PS, 1.5)
    with pytest.raises(ValueError, match="1-d"):
        prune_scores_threshold(torch.ones(2, 2), 1)


def test_tie_rule_circuit_can_exceed_edge_count():
    assert prune_scores_threshold(TIED, 2).item() == 2.0
    assert [circuit_size_at(TIED, k) for k in range(5)] == [0, 1, 3, 3, 4]
    masks = circuit_edge_masks(TIED, 2)
    assert masks["x"].tolist() == [True, True]
    assert masks["y"].tolist() == [[True], [False]]
    assert masks["y"].dtype == torch.bool


def test_logarithmic_counts_by_hand():
    assert logarithmic_edge_counts(25) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 20]
    assert logarithmic_edge_counts(1) == []
    assert logarithmic_edge_counts(0) == []


# ----------------------------------------------------------------------------- edge_counts_util

LOG_1000 = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9,
            10, 20, 30, 40, 50, 60, 70, 80, 90,
            100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]


def test_logarithmic_default_for_1000_edges():
    assert edge_counts_util(1000) == LOG_1000
    assert edge_counts_util(1000, EdgeCounts.LOGARITHMIC) == LOG_1000
    assert edge_counts_util(1000, "logarithmic") == LOG_1000


def test_default_switches_at_200():
    assert edge_counts_util(200) == list(range(201))  # ALL (not > 200)
    assert edge_counts_util(201) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 20, 30, 40, 50, 60, 70, 80, 90,
                                     100, 200, 201]


def test_all_small():
    assert edge_counts_util(5) == [0, 1, 2, 3, 4, 5]
    assert edge_counts_util(5, EdgeCounts.ALL) == [0, 1, 2, 3, 4, 5]


def test_accepts_a_collection_of_edges():
    assert edge_counts_util({"e1", "e2", "e3"}) == [0, 1, 2, 3]
    assert edge_counts_util(["e1", "e2"], [1]) == [1]


def test_groups_inferred_from_few_unique_scores():
    ps = {"m": torch.tensor([1.0, 1.0, 2.0, -2.0, 3.0])}
    # 3 unique |scores| < min(10 / 2, 100) = 5 -> GROUPS: sizes at thresholds 3, 2, 1 = 1, 3, 5
    assert edge_counts_util(10, prune_scores=ps) == [0, 1, 3, 5, 10]
    assert edge_counts_util(5, EdgeCounts.GROUPS, prune_scores=ps) == [0, 1, 3, 5]


def test_groups_not_inferred_with_many_unique_scores():
    ps = {"m": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    # 4 unique >= min(4 / 2, 100) = 2 -> ALL
    assert edge_counts_util(4, prune_scores=ps) == [0, 1, 2, 3, 4]


def test_groups_of_two_is_a_binary_circuit():
    # two groups: len <= 2, so neither 0 nor n_edges is added by default
    ps = {"m": torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0])}
    assert edge_counts_util(6, EdgeCounts.GROUPS, prune_scores=ps) == [2]  # 6 == n_edges removed


def test_groups_needs_prune_scores():
    with pytest.raises(ValueError, match="prune_scores"):
        edge_counts_util(10, EdgeCounts.GROUPS)


def test_explicit_list():
    assert edge_counts_util(10, [0.5, 3]) == [3, 5]
    assert edge_counts_util(10, [0.25]) == [2]  # int(2.5)
    assert edge_counts_util(10, [1, 0.5, 9]) == [0, 1, 5, 9, 10]  # > 2 entries: 0 and n added
    # <= 2 entries: 0 and n_edges are *removed* by default (auto-circuit semantics)
    assert edge_counts_util(10, [0, 10]) == []
    assert edge_counts_util(10, (0.0, 1.0)) == []


def test_zero_all_overrides_and_true_count():
    assert edge_counts_util(10, [5], zero_edges=True) == [0, 5]
    assert edge_counts_util(10, [5], all_edges=True) == [5, 10]
    assert edge_counts_util(5, zero_edges=False, all_edges=False) == [1, 2, 3, 4]
    assert edge_counts_util(10, [5], true_edge_count=7) == [5, 7]
    assert edge_counts_util(10, [5], true_edge_count=5) == [5]
    # true_edge_count is inserted after the zero/all removal
    assert edge_counts_util(10, [5], true_edge_count=0) == [0, 5]


def test_duplicates_dropped_defaults_use_raw_length():
    assert edge_counts_util(10, [3, 3, 3]) == [0, 3, 10]
    assert edge_counts_util(10, [0.31, 0.35]) == [3]


def test_edge_counts_util_errors():
    with pytest.raises(ValueError, match="Unknown test_counts"):
        edge_counts_util(10, "bogus")
    with pytest.raises(ValueError, match="Unknown test_counts"):
        edge_counts_util(10, 5)
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        edge_counts_util(10, [11])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        edge_counts_util(10, [1.5])
    with pytest.raises(TypeError, match="bool"):
        edge_counts_util(10, [True])
    with pytest.raises(TypeError, match="ints"):
        edge_counts_util(10, ["3"])
    with pytest.raises(ValueError, match="true_edge_count"):
        edge_counts_util(10, [5], true_edge_count=11)
    with pytest.raises(ValueError, match=">= 0"):
        edge_counts_util(-1)
    with pytest.raises(TypeError, match="collection"):
        edge_counts_util(3.0)
    with pytest.raises(ValueError, match="only 3 edges"):
        edge_counts_util(3, EdgeCounts.GROUPS, prune_scores={"m": torch.arange(5.0)})


# ----------------------------------------------------------------------------- properties


@st.composite
def prune_scores_st(draw):
    n_mods = draw(st.integers(1, 3))
    out = {}
    for i in range(n_mods):
        n = draw(st.integers(1, 8))
        vals = draw(st.lists(st.integers(-4, 4), min_size=n, max_size=n))
        out[f"m{i}"] = torch.tensor(vals, dtype=torch.float32) / 2
    return out


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 3000),
    mode=st.sampled_from([None, EdgeCounts.ALL, EdgeCounts.LOGARITHMIC, "list"]),
    fracs=st.lists(st.floats(0, 1), max_size=5),
    zero=st.sampled_from([None, True, False]),
    allx=st.sampled_from([None, True, False]),
)
def test_edge_counts_util_sorted_unique_in_range(n, mode, fracs, zero, allx):
    tc = fracs if mode == "list" else mode
    out = edge_counts_util(n, tc, zero_edges=zero, all_edges=allx)
    assert out == sorted(set(out))
    assert all(isinstance(c, int) and 0 <= c <= n for c in out)
    if zero is True and n > 0:  # with n == 0, "0" is also "n_edges" and all_edges may remove it
        assert 0 in out
    if allx is True:
        assert n in out
    if allx is False and n > 0:
        assert n not in out


@settings(max_examples=60, deadline=None)
@given(ps=prune_scores_st(), extra=st.integers(0, 5))
def test_groups_are_the_tie_rule_circuit_sizes(ps, extra):
    n_scored = sum(s.numel() for s in ps.values())
    n = n_scored + extra
    groups = edge_counts_util(n, EdgeCounts.GROUPS, prune_scores=ps, zero_edges=False, all_edges=False)
    sizes = {circuit_size_at(ps, k) for k in range(1, n_scored + 1)} - {n}
    assert set(groups) == sizes
    out = edge_counts_util(n, prune_scores=ps)
    assert out == sorted(set(out)) and all(0 <= c <= n for c in out)


@settings(max_examples=60, deadline=None)
@given(ps=prune_scores_st(), data=st.data())
def test_circuit_size_at_least_edge_count(ps, data):
    n = sum(s.numel() for s in ps.values())
    k = data.draw(st.integers(0, n))
    size = circuit_size_at(ps, k)
    assert size >= k
    desc = desc_prune_scores(ps)
    if len(set(desc.tolist())) == n:  # all distinct: exact
        assert size == k
    assert size == sum(int((s.abs() >= prune_scores_threshold(ps, k)).sum()) for s in ps.values())
