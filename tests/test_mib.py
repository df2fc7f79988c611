"""fp.mib against EAP-IG's and MIB's own code.

tests/data/mib/ was produced by scripts/mib_fixtures.py: ``eapig.json``/``eapig.pt``/
``eap_scores.pt`` written by EAP-IG's ``Graph.to_json``/``to_pt``; ``theirs.json`` holds
what EAP-IG/MIB computed and read (their evaluation numbers, their reading of
funcpatch's ``ours.json``/``ours.pt``). Same weights (the zoo's ioi model) and prompts.
"""

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import funcpatch as fp
from funcpatch import zoo
from funcpatch.datasets import load_datasets_from_json
from funcpatch.mib import MibGraphError, from_mib_name, to_mib_name

DATA = Path(__file__).parent / "data" / "mib"
THEIRS = json.loads((DATA / "theirs.json").read_text())


@pytest.fixture(scope="module")
def ioi():
    hf, tok = zoo.load_hf("ioi")
    pm = fp.patchable(fp.models.from_hf(hf), slice_output="last_seq")
    (a, b), (c, d) = THEIRS["prompts"]["eval"], THEIRS["prompts"]["mean"]
    evals, means = load_datasets_from_json(tok, zoo.dataset_path("ioi"), batch_size=THEIRS["prompts"]["batch_size"],
                                           train_test_size=(b - a, d - c), shuffle=False)
    return pm, evals, means


def _edge_values(pm, scores, flags):
    """MIB edge name -> (score, in_graph) from funcpatch's dicts."""
    out = {}
    for e in pm.graph.edges:
        out[to_mib_name(e.name)] = (float(e.prune_score(scores)), None if flags is None else bool(e.prune_score(flags)))
    return out


# ----------------------------------------------------------------------------- names


@pytest.mark.parametrize("ours, theirs", [
    ("Resid Start->A0.1.Q", "input->a0.h1<q>"),
    ("A0.1->MLP 2", "a0.h1->m2"),
    ("MLP 1->Resid End", "m1->logits"),
    ("A3.11->A4.0.K", "a3.h11->a4.h0<k>"),
    ("MLP 0->A1.7.V", "m0->a1.h7<v>"),
    ("A1.2", "a1.h2"),
])
def test_names_map_both_ways(ours, theirs):
    assert to_mib_name(ours) == theirs
    assert from_mib_name(theirs) == ours


@given(st.integers(0, 99), st.integers(0, 99), st.integers(0, 99), st.integers(0, 99), st.sampled_from("QKV"))
def test_edge_names_round_trip(l1, h1, l2, h2, x):
    for name in (f"A{l1}.{h1}->A{l2}.{h2}.{x}", f"MLP {l1}->A{l2}.{h2}.{x}", f"Resid Start->MLP {l2}",
                 f"A{l1}.{h1}->Resid End"):
        assert from_mib_name(to_mib_name(name)) == name
    assert to_mib_name(f"A{l1}.{h1}->A{l2}.{h2}.{x}") == f"a{l1}.h{h1}->a{l2}.h{h2}<{x.lower()}>"


@pytest.mark.parametrize("bad", ["Resid Post 0", "A0.kv1.K", "B0.1", "A0.1.X"])
def test_unknown_names_are_refused(bad):
    with pytest.raises(MibGraphError, match="node name"):
        to_mib_name(bad)


def test_every_edge_name_of_the_zoo_graph_is_theirs(ioi):
    pm = ioi[0]
    ours = {to_mib_name(e.name) for e in pm.graph.edges}
    assert ours == set(THEIRS["eapig_edges"])  # EAP-IG's own edge names, all 310 of them
    assert {from_mib_name(n) for n in ours} == {e.name for e in pm.graph.edges}


# ----------------------------------------------------------------------------- files


def test_eapig_written_files_load(ioi):
    """Graph.to_json / to_pt files of EAP-IG load with the scores and flags EAP-IG held."""
    pm = ioi[0]
    for name in ("eapig.json", "eapig.pt"):
        scores, flags = fp.mib.load(pm, DATA / name)
        got = _edge_values(pm, scores, flags)
        for edge, (score, in_graph) in THEIRS["eapig_edges"].items():
            assert got[edge][0] == pytest.approx(score, rel=1e-6, abs=1e-12), (name, edge)
            assert got[edge][1] == in_graph, (name, edge)
    assert sum(int(v.sum()) for v in flags.values()) == THEIRS["eapig_n_in_graph"]


def _ours_circuit(pm):
    """The circuit scripts/mib_fixtures.py's stage 'ours' wrote."""
    scores = {k: v - 0.5 for k, v in fp.algos.random_scores(pm, seed=0).items()}
    masks, _ = fp.circuit_masks(pm, scores, 30)
    return scores, {k: v.bool() for k, v in masks.items()}


def test_our_files_read_by_eapig_and_mib(ioi, tmp_path):
    """EAP-IG's Graph.from_json/from_pt and MIB's load_graph_from_json/pt read funcpatch's
    files with our scores and flags; and save still writes those files."""
    pm = ioi[0]
    scores, flags = _ours_circuit(pm)
    want = _edge_values(pm, scores, flags)
    assert len(THEIRS["ours_read"]) == 4
    for loader, read in THEIRS["ours_read"].items():
        assert set(read["edges"]) == set(want), loader
        for edge, (score, in_graph) in read["edges"].items():
            assert score == want[edge][0] and in_graph == want[edge][1], (loader, edge)
    fp.mib.save(pm, scores, tmp_path / "ours.json", in_graph=flags)
    assert json.loads((tmp_path / "ours.json").read_text()) == json.loads((DATA / "ours.json").read_text())
    fp.mib.save(pm, scores, tmp_path / "ours.pt", in_graph=flags)
    now, then = torch.load(tmp_path / "ours.pt"), torch.load(DATA / "ours.pt")
    assert now.keys() == then.keys()
    for k in now:
        assert torch.equal(now[k], then[k]) if isinstance(now[k], torch.Tensor) else now[k] == then[k], k


@pytest.mark.parametrize("fmt, suffix", [("json", ".json"), ("pt", ".pt"), ("autocircuit", ".pt")])
def test_round_trip(ioi, tmp_path, fmt, suffix):
    pm = ioi[0]
    g = torch.Generator().manual_seed(1)
    scores = {k: torch.randn(v.shape, generator=g) for k, v in fp.init_state(pm).masks.items()}
    flags = {k: torch.rand(v.shape, generator=g) < 0.3 for k, v in scores.items()}
    path = tmp_path / f"c{suffix}"
    fp.mib.save(pm, scores, path, in_graph=None if fmt == "autocircuit" else flags, format=fmt)
    got, got_flags = fp.mib.load(pm, path)
    for k in scores:
        assert torch.equal(got[k], scores[k]), k
        if fmt == "autocircuit":
            assert got_flags is None
        else:
            assert torch.equal(got_flags[k], flags[k]), k


def test_in_graph_given_as_edge_names(ioi, tmp_path):
    pm = ioi[0]
    scores = fp.init_state(pm).masks
    fp.mib.save(pm, scores, tmp_path / "c.json", in_graph=["A0.1->MLP 1", "Resid Start->A1.3.K"])
    d = json.loads((tmp_path / "c.json").read_text())
    assert sorted(n for n, v in d["edges"].items() if v["in_graph"]) == ["a0.h1->m1", "input->a1.h3<k>"]
    assert d["nodes"]["a0.h1"]["in_graph"] is False  # no incoming edge: EAP-IG's rule
    assert d["nodes"]["input"]["in_graph"] is True


def test_autocircuit_prune_scores_file_loads(ioi, tmp_path):
    """A torch.save of a PruneScores dict, as auto-circuit writes one."""
    pm = ioi[0]
    scores = fp.algos.random_scores(pm, seed=3)
    torch.save(scores, tmp_path / "ac.pt")
    got, flags = fp.mib.load(pm, tmp_path / "ac.pt")
    assert flags is None and all(torch.equal(got[k], scores[k]) for k in scores)


def test_bad_files_are_refused(ioi, tmp_path):
    pm = ioi[0]
    with pytest.raises(ValueError, match="suffix"):
        fp.mib.save(pm, fp.init_state(pm).masks, tmp_path / "c.txt")
    with pytest.raises(ValueError, match="unknown format"):
        fp.mib.save(pm, fp.init_state(pm).masks, tmp_path / "c.json", format="yaml")
    d = json.loads((DATA / "eapig.json").read_text())
    d["cfg"]["n_heads"] = 4
    (tmp_path / "h.json").write_text(json.dumps(d))
    with pytest.raises(MibGraphError, match="n_heads=4"):
        fp.mib.load(pm, tmp_path / "h.json")
    d = json.loads((DATA / "eapig.json").read_text())
    del d["edges"]["a0.h1->m1"]
    (tmp_path / "m.json").write_text(json.dumps(d))
    with pytest.raises(MibGraphError, match="1 missing"):
        fp.mib.load(pm, tmp_path / "m.json")
    torch.save({"x": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(MibGraphError, match="neither"):
        fp.mib.load(pm, tmp_path / "x.pt")


# ----------------------------------------------------------------------------- unsupported graphs


def _unsupported():
    from conftest import has_hooked, tiny_gpt2_bridge, tiny_hooked
    cases = [
        ("MicroModel", lambda: fp.patchable(fp.MicroModel(n_layers=2))),
        ("residual", lambda: fp.patchable(tiny_gpt2_bridge(), factorized=False)),
        ("token-specific", lambda: fp.patchable(tiny_gpt2_bridge(), seq_len=4)),
        ("Q/K/V split", lambda: fp.patchable(tiny_gpt2_bridge(), separate_qkv=False)),
    ]
    if has_hooked():
        cases.append(("attention-only", lambda: fp.patchable(tiny_hooked(attn_only=True))))
    return cases


@pytest.mark.parametrize("what, build", _unsupported(), ids=[c[0] for c in _unsupported()])
def test_unsupported_graphs_are_refused(what, build, tmp_path):
    pm = build()
    with pytest.raises(MibGraphError, match=what):
        fp.mib.save(pm, fp.init_state(pm).masks, tmp_path / "c.json")
    with pytest.raises(MibGraphError, match=what):
        fp.mib.evaluate(pm, [], fp.init_state(pm).masks)


def test_grouped_kv_graph_is_refused(tmp_path):
    import inspect
    if "grouped_kv" not in inspect.signature(fp.patchable).parameters:
        pytest.skip("this funcpatch has no grouped K/V graphs yet")
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                                      max_position_embeddings=32)).eval()
    pm = fp.patchable(fp.models.from_hf(hf), grouped_kv=True)
    with pytest.raises(MibGraphError, match="grouped K/V"):
        fp.mib.save(pm, fp.init_state(pm).masks, tmp_path / "c.json")


# ----------------------------------------------------------------------------- circuits (apply_topn + prune)


def _scores(pm, values):
    scores = {k: torch.zeros_like(v) for k, v in fp.init_state(pm).masks.items()}
    for name, v in values.items():
        e = pm.graph.edge(name)
        scores[e.dest.module_name][e.patch_idx] = v
    return scores


def _circuit_names(pm, masks):
    return sorted(e.name for e in pm.graph.edges if bool(e.prune_score(masks)))


def test_dangling_edges_are_pruned(ioi):
    """Hand-checked: only the chain input -> A0.0 -> MLP 0 -> logits survives."""
    pm = ioi[0]
    scores = _scores(pm, {
        "Resid Start->A0.0.Q": 5, "A0.0->MLP 0": -4, "MLP 0->Resid End": 3,  # connected
        "Resid Start->A1.2.V": 2.5,  # A1.2 has no outgoing edge
        "A0.3->A1.0.K": 2,  # A0.3 has no incoming edge
        "Resid Start->A0.5.V": 1.2, "A0.5->A1.5.Q": 1.1,  # two steps from nowhere: A1.5 feeds nothing
    })
    got = _circuit_names(pm, fp.mib.mib_circuit(pm, scores, 7))
    assert got == sorted(["Resid Start->A0.0.Q", "A0.0->MLP 0", "MLP 0->Resid End"])
    # by signed score the negative A0.0->MLP 0 falls out of the top 7 (a zero-score edge takes its place)
    assert _circuit_names(pm, fp.mib.mib_circuit(pm, scores, 7, absolute=False)) == []


def test_dangling_chain_matches_eapig_prune(ioi):
    """The same hand-made case run through EAP-IG's own apply_topn + prune (theirs.json):
    the circuit its evaluation runs. (Its apply_topn, at the commit MIB pins, prunes one
    pass only: the edge counts it reports may include edges its evaluation drops.)"""
    pm = ioi[0]
    case = THEIRS["prune_case"]
    scores = _scores(pm, {from_mib_name(k): v for k, v in case["scores"].items()})
    got = {to_mib_name(n) for n in _circuit_names(pm, fp.mib.mib_circuit(pm, scores, case["n"]))}
    assert got == set(case["evaluated"])
    assert set(case["evaluated"]) <= set(case["after_topn"])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(0, 310), absolute=st.booleans())
def test_mib_circuit_is_a_connected_subset_of_the_top_n(ioi, seed, n, absolute):
    """Invariants of apply_topn + prune: at most n edges, all among the top n, and closed:
    every source in it but the input is fed by an edge in it, every destination but the
    logits feeds one."""
    pm = ioi[0]
    g = torch.Generator().manual_seed(seed)
    scores = {k: torch.randn(v.shape, generator=g) for k, v in fp.init_state(pm).masks.items()}
    masks = fp.mib.mib_circuit(pm, scores, n, absolute)
    circuit = {e for e in pm.graph.edges if bool(e.prune_score(masks))}
    key = (lambda e: abs(float(e.prune_score(scores)))) if absolute else (lambda e: float(e.prune_score(scores)))
    top = set(sorted(pm.graph.edges, key=key, reverse=True)[:n])
    assert circuit <= top
    node = lambda d: d.name.rsplit(".", 1)[0] if d.name[-2:] in (".Q", ".K", ".V") else d.name  # noqa: E731
    fed = {node(e.dest) for e in circuit}
    feeding = {e.src.name for e in circuit}
    for e in circuit:
        assert e.src.name == "Resid Start" or e.src.name in fed, e
        assert e.dest.name == "Resid End" or node(e.dest) in feeding, e


def test_ties_are_broken_by_eapig_matrix_order(ioi):
    """Hand-checked: four edges tie in |score|; the first in EAP-IG's matrix order win
    (source's forward index, then destination's backward index), then the prune."""
    pm = ioi[0]
    scores = _scores(pm, {"Resid Start->A0.2.Q": 2.0, "MLP 0->Resid End": 1.0, "Resid Start->Resid End": -1.0,
                          "A0.2->Resid End": 1.0, "Resid Start->MLP 0": 1.0})
    circuit = lambda n: _circuit_names(pm, fp.mib.mib_circuit(pm, scores, n))  # noqa: E731
    # n=3: input->m0 and input->logits (row 0) win the tie; m0 then has no outgoing edge
    # and a0.h2 none either: both pruned
    assert circuit(3) == ["Resid Start->Resid End"]
    assert circuit(4) == sorted(["Resid Start->A0.2.Q", "A0.2->Resid End", "Resid Start->Resid End"])
    assert circuit(5) == sorted(["Resid Start->A0.2.Q", "A0.2->Resid End", "Resid Start->Resid End",
                                 "Resid Start->MLP 0", "MLP 0->Resid End"])


# ----------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("run", THEIRS["evaluate"], ids=lambda r: ",".join(f"{k}={v}" for k, v in r["kwargs"].items()))
def test_evaluate_equals_mib(ioi, run):
    """MIB's evaluate_area_under_curve on the same weights, scores and prompts, to 1e-4."""
    pm, evals, means = ioi
    scores, _ = fp.mib.load(pm, DATA / "eapig.json")
    kw = run["kwargs"]
    res = fp.mib.evaluate(pm, evals, scores, intervention_dataloader=means if "mean" in kw["intervention"] else None,
                          **kw)
    counts, under, from_1, average, faith = res
    assert counts == run["weighted_edge_counts"]
    assert faith == pytest.approx(run["faithfulnesses"], abs=1e-4)
    assert under == pytest.approx(run["area_under"], abs=1e-4)
    assert from_1 == pytest.approx(run["area_from_1"], abs=1e-4)
    assert average == pytest.approx(run["average"], abs=1e-4)


def test_evaluate_refuses_bad_arguments(ioi):
    pm, evals, means = ioi
    scores = fp.init_state(pm).masks
    with pytest.raises(ValueError, match="unknown intervention"):
        fp.mib.evaluate(pm, evals, scores, intervention="resample")
    with pytest.raises(ValueError, match="needs intervention_dataloader"):
        fp.mib.evaluate(pm, evals, scores, intervention="mean")
    with pytest.raises(ValueError, match="mean interventions only"):
        fp.mib.evaluate(pm, evals, scores, intervention_dataloader=means)
    with pytest.raises(ValueError, match="unknown metric"):
        fp.mib.evaluate(pm, evals, scores, metric="kl")


# ----------------------------------------------------------------------------- attribution


@pytest.mark.parametrize("method", ["eap", "eap_ig"])
def test_scores_equal_eapig_after_the_uniform_factor(ioi, method):
    """funcpatch's EAP and EAP-IG-inputs (endpoint="corrupt") equal EAP-IG's own scores
    times the number of prompts (EAP-IG averages over prompts; both use -logit_diff)."""
    pm, evals, _ = ioi
    if method == "eap":
        ours = fp.algos.eap(pm, evals, progress=False)
        theirs, _ = fp.mib.load(pm, DATA / "eap_scores.pt")
    else:
        ours = fp.algos.eap_ig(pm, evals, samples=THEIRS["ig_steps"], variant="inputs", endpoint="corrupt",
                               progress=False)
        theirs, _ = fp.mib.load(pm, DATA / "eapig.pt")
    n = THEIRS["prompts"]["eval"][1] - THEIRS["prompts"]["eval"][0]
    o = torch.cat([ours[k].flatten() for k in ours])
    t = torch.cat([theirs[k].flatten() for k in ours]) * n
    assert (o - t).abs().max() <= 1e-4 * t.abs().max()


def test_eap_ig_clean_endpoint_differs_from_eapig_code(ioi):
    """The paper's points (k = 1..m) are not EAP-IG's code's (k = 0..m-1) at 5 steps."""
    pm, evals, _ = ioi
    ours = fp.algos.eap_ig(pm, evals, samples=THEIRS["ig_steps"], variant="inputs", progress=False)
    theirs, _ = fp.mib.load(pm, DATA / "eapig.pt")
    o = torch.cat([ours[k].flatten() for k in ours])
    t = torch.cat([theirs[k].flatten() for k in ours]) * 16
    assert (o - t).abs().max() > 1e-2 * t.abs().max()


def test_eap_ig_endpoint_is_checked(ioi):
    pm, evals, _ = ioi
    with pytest.raises(ValueError, match="unknown endpoint"):
        fp.algos.eap_ig(pm, evals, samples=2, variant="inputs", endpoint="middle", progress=False)
    with pytest.raises(ValueError, match="endpoint applies to variant='inputs'"):
        fp.algos.eap_ig(pm, evals, samples=2, variant="mask", endpoint="corrupt", progress=False)


def test_evaluate_circuits_of_given_binary_circuits(ioi):
    """MIB's circuits given as binary masks (a submission of circuits) score as MIB scored them."""
    pm, evals, _ = ioi
    scores, _ = fp.mib.load(pm, DATA / "eapig.json")
    run = THEIRS["evaluate"][0]
    assert run["kwargs"] == {"intervention": "patching"}
    circuits = [fp.mib.mib_circuit(pm, scores, int(p * pm.graph.n_edges)) for p in fp.mib.FRACTIONS]
    res = fp.mib.evaluate_circuits(pm, evals, circuits[::-1])  # any order
    assert res.weighted_edge_counts == run["weighted_edge_counts"]
    assert res.faithfulnesses == pytest.approx(run["faithfulnesses"], abs=1e-4)
    assert res.fractions == tuple(c / pm.graph.n_edges for c in run["weighted_edge_counts"])


def test_evaluate_on_a_hooked_transformer_equals_mib():
    """The same weights as a TransformerLens 3.x HookedTransformer (funcpatch's hook path):
    the zero ablation, which depends on MIB's input node being hook_embed alone."""
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:
        pytest.skip("TransformerLens >= 4 has no HookedTransformer")
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    hf, tok = zoo.load_hf("ioi")
    c = hf.config
    cfg = HookedTransformerConfig(n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
                                  d_mlp=c.n_inner, d_vocab=c.vocab_size, n_ctx=c.n_positions, act_fn="gelu_new",
                                  normalization_type="LN", tokenizer_name=None, default_prepend_bos=False)
    ht = HookedTransformer(cfg)
    ht.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                   center_unembed=False, fold_value_biases=False)
    pm = fp.patchable(ht.eval())
    (a, b), (c0, d) = THEIRS["prompts"]["eval"], THEIRS["prompts"]["mean"]
    evals, _ = load_datasets_from_json(tok, zoo.dataset_path("ioi"), batch_size=THEIRS["prompts"]["batch_size"],
                                       train_test_size=(b - a, d - c0), shuffle=False)
    scores, _ = fp.mib.load(pm, DATA / "eapig.json")
    run = next(r for r in THEIRS["evaluate"] if r["kwargs"] == {"intervention": "zero"})
    res = fp.mib.evaluate(pm, evals, scores, intervention="zero")
    assert res.faithfulnesses == pytest.approx(run["faithfulnesses"], abs=1e-4)
    assert res.area_under == pytest.approx(run["area_under"], abs=1e-4)


def test_evaluate_on_a_bare_transformers_model_equals_mib(ioi):
    """A transformers model patched directly (funcpatch's own forward, no hooks)."""
    hf, _ = zoo.load_hf("ioi")
    try:
        pm = fp.patchable(hf)
    except TypeError:
        pytest.skip("this funcpatch patches transformers models only through a bridge")
    evals = ioi[1]
    scores, _ = fp.mib.load(pm, DATA / "eapig.json")
    run = next(r for r in THEIRS["evaluate"] if r["kwargs"] == {"intervention": "zero"})
    res = fp.mib.evaluate(pm, evals, scores, intervention="zero")
    assert res.faithfulnesses == pytest.approx(run["faithfulnesses"], abs=1e-4)
