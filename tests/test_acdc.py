"""ACDC: the seed's numbers, self-check, determinism, extremes, batched == sequential."""

import importlib
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import funcpatch as fp
from conftest import TRANSFORMERS, tokens
from funcpatch.algos.acdc import AcdcSelfCheckError, acdc, acdc_edge_order, acdc_runs, acdc_taus

acdc_mod = importlib.import_module("funcpatch.algos.acdc")  # the module, even if a package attribute shadows it

CLEAN = torch.tensor([[[1.0, 2.0], [0.5, -1.0], [2.0, 1.0]],
                      [[-1.0, 0.5], [1.5, 0.25], [0.0, 1.0]],
                      [[0.3, -0.7], [1.0, 1.0], [-0.5, 2.0]]])
CORRUPT = torch.tensor([[[0.0, 1.0], [1.0, -0.5], [1.0, 2.0]],
                        [[-0.5, 0.0], [1.0, 1.0], [0.5, 0.5]],
                        [[1.0, -1.0], [0.0, 2.0], [0.5, 1.0]]])
INF = math.inf

# auto-circuit 1.0.1's acdc_prune_scores on its MicroModel(2), slice_output="last_seq",
# prompts CLEAN * 0.05 / CORRUPT * 0.05, default τ grid, its edges put in funcpatch's order.
SEED_SCORES = {
    "kl_div": {"Resid Start->B0.0": INF, "Resid Start->B0.1": INF, "Resid Start->B1.0": 0.005,
               "B0.0->B1.0": 0.03, "B0.1->B1.0": 0.07, "Resid Start->B1.1": 0.05, "B0.0->B1.1": INF,
               "B0.1->B1.1": INF, "Resid Start->Resid End": 0.0005, "B0.0->Resid End": 0.003,
               "B0.1->Resid End": 0.03, "B1.0->Resid End": 0.09, "B1.1->Resid End": INF},
    "mse": {"Resid Start->B0.0": INF, "Resid Start->B0.1": INF, "Resid Start->B1.0": 0.03, "B0.0->B1.0": INF,
            "B0.1->B1.0": INF, "Resid Start->B1.1": INF, "B0.0->B1.1": INF, "B0.1->B1.1": INF,
            "Resid Start->Resid End": 0.003, "B0.0->Resid End": 0.03, "B0.1->Resid End": 0.07,
            "B1.0->Resid End": INF, "B1.1->Resid End": INF},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one intra-op thread is as fast, and does not stall when
    the (shared, 2-core) machine is busy, as OpenMP's spinning threads do."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def micro_batch(scale=0.05):
    answers = torch.zeros(3, 1, dtype=torch.long)
    return fp.PromptPairBatch(0, 0, CLEAN * scale, CORRUPT * scale, answers, answers + 1)


@pytest.fixture(scope="module")
def micro():
    return fp.patchable(fp.MicroModel(2), slice_output="last_seq")


def by_name(pm, scores):
    return {e.name: e.prune_score(scores).item() for e in pm.graph.edges}


def by_name_pos(pm, scores):
    return {(e.name, e.seq_idx): e.prune_score(scores).item() for e in pm.graph.edges}


def sequential_acdc(pm, batch, taus, target, by_pos=False):
    """A plain one-circuit-at-a-time ACDC written from the paper's description."""
    patch = fp.src_ablations(pm, batch.corrupt)
    with torch.no_grad():
        clean = pm.model(batch.clean)[pm.out_slice]
    order = sorted(pm.graph.edges, key=lambda e: -e.dest.layer)
    best = {e: INF for e in pm.graph.edges}
    for tau in taus:
        removed, prev = [], 0.0
        for e in order:
            state = fp.patch_mode(pm, fp.init_state(pm), patch, edges=removed + [e])
            with torch.no_grad():
                out = fp.patched_forward(pm, state, batch.clean)[pm.out_slice]
            if target == "kl_div":
                kl = torch.nn.functional.kl_div(out.log_softmax(-1), clean.log_softmax(-1), reduction="sum",
                                                log_target=True)
                faith = kl.item() / math.prod(out.shape[:-1])
            else:
                faith = torch.nn.functional.mse_loss(out, clean).item()
            if faith - prev < tau:
                removed.append(e)
                prev = faith
                best[e] = min(best[e], tau)
    return {((e.name, e.seq_idx) if by_pos else e.name): float(torch.tensor(v, dtype=torch.float32))
            for e, v in best.items()}


@pytest.mark.parametrize("target", ["kl_div", "mse"])
def test_matches_the_seed_library_on_micro_model(micro, target):
    got = by_name(micro, acdc(micro, [micro_batch()], faithfulness_target=target, progress=False))
    assert got == pytest.approx(SEED_SCORES[target], rel=1e-6)


@pytest.mark.parametrize("target", ["kl_div", "mse"])
def test_batched_equals_sequential(micro, target):
    taus = acdc_taus()
    want = sequential_acdc(micro, micro_batch(), taus, target)
    for lookahead, rows in [(1, 3), (1, None), (3, None), (16, 6)]:  # rows=3: one circuit per forward
        got = acdc(micro, [micro_batch()], faithfulness_target=target, progress=False, lookahead=lookahead,
                   max_batch_rows=rows)
        assert by_name(micro, got) == pytest.approx(want, rel=1e-6), (lookahead, rows)


def test_self_check_micro(micro):
    scores = acdc(micro, [micro_batch()], test_mode=True, progress=False)
    assert {k: v.shape for k, v in scores.items()} == {k: v.shape for k, v in fp.init_state(micro).masks.items()}


@pytest.mark.parametrize("kw", [dict(seq_len=3), dict(factorized=False), dict(seq_len=3, factorized=False)])
def test_token_and_residual_graphs(kw):
    pm = fp.patchable(fp.MicroModel(2), slice_output="last_seq", **kw)
    taus = [3e-4, 3e-3, 3e-2]
    got = acdc(pm, [micro_batch()], taus=taus, test_mode=True, progress=False)
    assert by_name_pos(pm, got) == pytest.approx(sequential_acdc(pm, micro_batch(), taus, "kl_div", by_pos=True),
                                                 rel=1e-6)
    assert any(math.isfinite(v) for v in by_name_pos(pm, got).values())


def test_self_check_catches_a_wrong_evaluation(micro, monkeypatch):
    honest = acdc_mod._Evaluator.masks
    first = micro.graph.edges.index(acdc_edge_order(micro)[0])

    def never_removes_the_first_edge(self, removed):
        removed = removed.clone()
        removed[:, first] = False
        return honest(self, removed)

    monkeypatch.setattr(acdc_mod._Evaluator, "masks", never_removes_the_first_edge)
    with pytest.raises(AcdcSelfCheckError, match="differs from the independent recomputation"):
        acdc(micro, [micro_batch()], taus=[1.0], test_mode=True, progress=False)


@pytest.mark.parametrize("name", ["gpt2-bridge", "hooked"])
def test_self_check_transformer(name):
    available, build = TRANSFORMERS[name]
    if not available():
        pytest.skip(f"{name}: not in this TransformerLens")
    if name == "gpt2-bridge":
        from transformers import GPT2Config, GPT2LMHeadModel
        torch.manual_seed(0)
        hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)).eval()
        model = fp.models.from_hf(hf)
    else:
        model = build()
    pm = fp.patchable(model, slice_output="last_seq")
    batch = fp.PromptPairBatch(0, 0, tokens(1, batch=2, seq=5), tokens(2, batch=2, seq=5),
                               torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1, dtype=torch.long))
    runs = acdc_runs(pm, [batch], [1e-3, INF], test_mode=True, progress=False)
    assert 0 < len(runs[0].removed) < pm.graph.n_edges
    assert len(runs[1].removed) == pm.graph.n_edges  # τ = inf removes everything
    # one candidate per forward (the sequential algorithm) gives the same run
    [seq] = acdc_runs(pm, [batch], [1e-3], progress=False, lookahead=1, max_batch_rows=2)
    assert seq.removed == runs[0].removed


def test_extremes(micro):
    batch = micro_batch()
    # mse >= 0 and prev starts at 0: with τ = 0 no edge can be removed
    kept = acdc(micro, [batch], taus=[0.0], faithfulness_target="mse", progress=False)
    assert all(torch.isinf(v).all() for v in kept.values())
    # a huge τ removes every edge, in the documented order
    [run] = acdc_runs(micro, [batch], [1e9], progress=False)
    assert run.removed == acdc_edge_order(micro)
    gone = acdc(micro, [batch], taus=[1e9, 5.0], progress=False)
    assert all((v == 5.0).all() for v in gone.values())


@pytest.mark.parametrize("target", ["kl_div", "mse"])
def test_a_tie_with_tau_keeps_the_edge(micro, target):
    # clean == corrupt: removing any edge changes nothing, faith - prev = 0 exactly, and
    # the accept test is strict (< τ): with τ = 0 every edge stays (an edge is removed only
    # when it costs less than τ).
    b = micro_batch()
    same = fp.PromptPairBatch(0, 0, b.clean, b.clean.clone(), b.answers, b.wrong_answers)
    [run] = acdc_runs(micro, [same], [0.0], faithfulness_target=target, progress=False)
    assert run.removed == ()
    kept = acdc(micro, [same], taus=[0.0], faithfulness_target=target, progress=False)
    assert all(torch.isinf(v).all() for v in kept.values())


def test_edge_order_is_reverse_topological_and_stable(micro):
    order = acdc_edge_order(micro)
    assert sorted(order, key=lambda e: e.name) == sorted(micro.graph.edges, key=lambda e: e.name)
    layers = [e.dest.layer for e in order]
    assert layers == sorted(layers, reverse=True)
    pos = {e: i for i, e in enumerate(micro.graph.edges)}
    for a, b in zip(order, order[1:]):
        if a.dest.layer == b.dest.layer:
            assert pos[a] < pos[b]


def test_taus_grid():
    assert acdc_taus([-1, -2], [1, 3]) == [1 * 10 ** -1, 1 * 10 ** -2, 3 * 10 ** -1, 3 * 10 ** -2]
    assert len(acdc_taus()) == 20


def test_independent_of_python_hash_seed():
    code = textwrap.dedent("""
        import torch, funcpatch as fp
        from funcpatch.algos.acdc import acdc
        torch.manual_seed(0)
        for factorized in (True, False):
            pm = fp.patchable(fp.MicroModel(3), factorized=factorized, slice_output="last_seq")
            b = fp.PromptPairBatch(0, 0, torch.randn(3, 4, 2) * 0.05, torch.randn(3, 4, 2) * 0.05, None, None)
            s = acdc(pm, [b], progress=False)
            print([(e.name, e.prune_score(s).item()) for e in pm.graph.edges])
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outs = []
    for hash_seed in ("1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=root, OMP_NUM_THREADS="1")
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        outs.append(res.stdout)
    assert outs[0] == outs[1]
    assert "inf" in outs[0] and "0.0" in outs[0]  # some edges pruned, some kept


def test_other_ablation_types_and_dataloader(any_lm):
    pm = fp.patchable(any_lm, slice_output="last_seq")
    ds = fp.PromptDataset(tokens(3, batch=4, seq=5), tokens(4, batch=4, seq=5), torch.zeros(4, 1, dtype=torch.long),
                          torch.ones(4, 1, dtype=torch.long))
    dl = fp.PromptDataLoader(ds, seq_len=5, diverge_idx=0, batch_size=2)
    for ablation in ("ZERO", fp.AblationType.TOKENWISE_MEAN_CORRUPT):
        [run] = acdc_runs(pm, dl, [0.05], ablation_type=ablation, progress=False)
        assert 0 < len(run.removed) <= pm.graph.n_edges


def test_bad_arguments(micro):
    b = [micro_batch()]
    with pytest.raises(ValueError, match=r"unknown faithfulness_target 'kl'.*'kl_div', 'mse'"):
        acdc(micro, b, faithfulness_target="kl", progress=False)
    with pytest.raises(ValueError, match="unknown ablation type"):
        acdc(micro, b, ablation_type="SOMETIMES", progress=False)
    with pytest.raises(ValueError, match="tao_exps is empty"):
        acdc(micro, b, tao_exps=[], progress=False)
    with pytest.raises(TypeError, match="tao_bases must hold real numbers"):
        acdc(micro, b, tao_bases=["1"], progress=False)
    with pytest.raises(ValueError, match="lookahead must be an int >= 1"):
        acdc(micro, b, lookahead=0, progress=False)
    with pytest.raises(ValueError, match="max_batch_rows"):
        acdc(micro, b, max_batch_rows=0, progress=False)
    with pytest.raises(ValueError, match="yielded no batches"):
        acdc(micro, [], progress=False)
    with pytest.raises(TypeError, match="PatchableModel"):
        acdc(fp.MicroModel(2), b, progress=False)
    with pytest.raises(TypeError, match="PromptPairBatch"):
        acdc(micro, [CLEAN], progress=False)
    with pytest.raises(TypeError, match="taus must be real numbers"):
        acdc(micro, b, taus=[float("nan")], progress=False)
