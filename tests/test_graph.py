"""Graph shape: node names, edge counts against closed-form formulas and the seed's numbers."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import funcpatch as fp
from funcpatch.graph import build_graph, transformer_nodes


def n_edges(L, H, *, factorized=True, split=True, attn_only=False, parallel=False):
    """Closed form: count, for each destination, the sources in earlier layers."""
    k = 3 if split else 1
    if not factorized:
        return L * (H + 1) if attn_only else L * (H + 3)
    per_block = H if attn_only else H + 1           # sources one block adds
    n_src = 1 + L * per_block
    total = n_src                                    # Resid End reads every source
    for layer in range(L):
        before = 1 + layer * per_block               # sources of earlier blocks
        total += k * H * before                      # Q/K/V (or one) input per head
        if not attn_only:
            total += before if parallel else before + H
    return total


def graph(L, H, **kw):
    factorized = kw.pop("factorized", True)
    srcs, dests = transformer_nodes(L, H, factorized=factorized, **kw)
    return build_graph(srcs, dests, factorized, None)


def test_seed_counts():
    assert fp.patchable(fp.MicroModel(2)).graph.n_edges == 13
    assert fp.patchable(fp.MicroModel(2), factorized=False).graph.n_edges == 6
    assert graph(2, 2).n_edges == 46
    assert graph(2, 2, separate_qkv=False).n_edges == 26
    assert graph(12, 12).n_edges == 32491
    assert graph(12, 12, separate_qkv=False).n_edges == 11611
    assert graph(12, 12, factorized=False).n_edges == 12 * (12 + 3)


@settings(max_examples=40, deadline=None)
@given(L=st.integers(1, 6), H=st.integers(1, 6), split=st.booleans(), attn_only=st.booleans(),
       parallel=st.booleans(), factorized=st.booleans())
def test_counts_match_closed_form(L, H, split, attn_only, parallel, factorized):
    if parallel and (attn_only or not factorized):
        return  # parallel blocks only exist with MLPs; the residual graph refuses them
    g = graph(L, H, factorized=factorized, separate_qkv=split, attn_only=attn_only, parallel_attn_mlp=parallel)
    assert g.n_edges == n_edges(L, H, factorized=factorized, split=split, attn_only=attn_only, parallel=parallel)
    assert len(set(g.edges)) == g.n_edges
    assert [s.src_idx for s in g.srcs] == list(range(len(g.srcs)))


@settings(max_examples=15, deadline=None)
@given(L=st.integers(1, 4), seq_len=st.integers(1, 5))
def test_token_graph_repeats_every_edge_per_position(L, seq_len):
    srcs, dests = transformer_nodes(L, 2, factorized=True)
    g = build_graph(srcs, dests, True, seq_len)
    base = build_graph(srcs, dests, True, None)
    assert g.n_edges == base.n_edges * seq_len
    assert sorted(g.edge_dict) == list(range(seq_len))
    e = g.edge("Resid Start->Resid End", seq_len - 1)
    assert e.patch_idx == (seq_len - 1, 0)


def test_micro_names_and_patch_idx():
    g = fp.patchable(fp.MicroModel(2)).graph
    assert [s.name for s in g.srcs] == ["Resid Start", "B0.0", "B0.1", "B1.0", "B1.1"]
    e = g.edge("B0.1->B1.0")
    assert (e.src.src_idx, e.dest.head_idx, e.patch_idx) == (2, 0, (0, 2))
    assert g.edge("B1.1->Resid End").patch_idx == (4,)
    r = fp.patchable(fp.MicroModel(2), factorized=False).graph
    assert [d.name for d in r.dests] == ["Resid Post 0", "Resid End"]
    assert r.edge("Resid Post 0->Resid End").patch_idx == (0,)


def test_transformer_names():
    g = graph(2, 2)
    names = {e.name for e in g.edges}
    assert {"Resid Start->A0.0.Q", "A0.1->MLP 0", "MLP 0->A1.1.V", "MLP 1->Resid End"} <= names
    r = graph(2, 2, factorized=False)
    assert {s.name for s in r.srcs} == {"Resid Start", "A0.0", "A0.1", "Resid Mid 0", "MLP 0", "Resid Post 0",
                                        "A1.0", "A1.1", "Resid Mid 1", "MLP 1"}
    assert {d.name for d in r.dests} == {"Resid Mid 0", "Resid Post 0", "Resid Mid 1", "Resid End"}


def test_unknown_edge_names_close_matches():
    g = graph(2, 2)
    with pytest.raises(KeyError, match=r"A0\.1->MLP 0"):
        g.edge("A0.1->MLP0")
    with pytest.raises(KeyError, match="not token-specific"):
        g.edge("A0.1->MLP 0", seq_idx=2)
    pm = fp.patchable(fp.MicroModel(2))
    with pytest.raises(KeyError, match="close matches"):
        fp.patch_mode(pm, fp.init_state(pm), fp.src_ablations(pm, __import__("torch").ones(1, 1, 2)),
                      edges=["B0.0->B1.O"])


def test_bad_patchable_arguments():
    m = fp.MicroModel(2)
    with pytest.raises(ValueError, match="slice_output"):
        fp.patchable(m, slice_output="last")
    with pytest.raises(ValueError, match="seq_len"):
        fp.patchable(m, seq_len=0)
    with pytest.raises(TypeError, match="supported"):
        fp.patchable(__import__("torch").nn.Linear(2, 2))
    with pytest.raises(ValueError, match="factorized=True"):
        graph(2, 2, factorized=False, parallel_attn_mlp=True)
