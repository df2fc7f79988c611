"""run_circuits: circuits read off prune scores, patched as the seed library patches them."""

import dataclasses
import math

import pytest
import torch

import funcpatch as fp
from funcpatch import algos
from funcpatch.circuits import PatchType, circuit_masks, edge_ranks, run_circuits
from funcpatch.data import PromptPairBatch
from funcpatch.edge_counts import circuit_size_at

VOCAB, SEQ = 50, 5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny tensors: extra threads only contend on a loaded machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def gpt2():
    import transformers
    from transformers import GPT2Config

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16, initializer_range=0.2,
                     bos_token_id=0, eos_token_id=0)
    return fp.patchable(fp.models.from_hf(transformers.GPT2LMHeadModel(cfg).eval()), slice_output="last_seq")


@pytest.fixture(scope="module")
def loader():
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, VOCAB, (4, SEQ), generator=g)
    corrupt = torch.randint(0, VOCAB, (4, SEQ), generator=g)
    ds = fp.PromptDataset(clean, corrupt, torch.randint(0, VOCAB, (4, 1), generator=g),
                          torch.randint(0, VOCAB, (4, 1), generator=g))
    return fp.PromptDataLoader(ds, seq_len=SEQ, batch_size=2)


@pytest.fixture(scope="module")
def micro():
    return fp.patchable(fp.MicroModel(2).double(), slice_output="last_seq")


def micro_batches(n_batches=2, batch=2, seq=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [PromptPairBatch(key=i, batch_diverge_idx=0,
                            clean=torch.randn(batch, seq, 2, generator=g, dtype=torch.float64),
                            corrupt=torch.randn(batch, seq, 2, generator=g, dtype=torch.float64),
                            answers=torch.zeros(batch, 1, dtype=torch.long),
                            wrong_answers=torch.ones(batch, 1, dtype=torch.long)) for i in range(n_batches)]


def distinct_scores(pm, seed=0):
    """Scores with distinct |values| (a strict ranking), signs mixed."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(pm.n_edges, generator=g).double() + 1
    signs = torch.where(torch.rand(pm.n_edges, generator=g) < 0.5, -1.0, 1.0).double()
    flat = perm * signs
    out, i = {}, 0
    for m in pm.graph.dest_modules:
        shape = m.mask_shape(pm.graph.seq_len)
        n = int(torch.Size(shape).numel())
        out[m.module_name] = flat[i:i + n].reshape(shape)
        i += n
    return out


def assert_outputs_equal(a, b, atol=1e-6):
    assert list(a) == list(b)
    for c in a:
        assert list(a[c]) == list(b[c])
        for k in a[c]:
            torch.testing.assert_close(a[c][k], b[c][k], rtol=1e-5, atol=atol)


def plain(pm, tokens):
    with torch.no_grad():
        return pm.model(tokens)[pm.out_slice]


# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("vmap_sizes", [False, True])

def test_endpoints_gpt2(gpt2, loader, vmap_sizes):
    scores = distinct_scores(gpt2)
    n = gpt2.n_edges
    cases = [  # (patch type, reverse) -> (input at 0 edges, input at all edges)
        (PatchType.EDGE_PATCH, False, "corrupt", "clean"),
        (PatchType.TREE_PATCH, False, "corrupt", "clean"),
        (PatchType.EDGE_PATCH, True, "clean", "corrupt"),
        ("tree_patch", True, "clean", "corrupt"),
    ]
    for patch_type, reverse, at_zero, at_all in cases:
        out = run_circuits(gpt2, loader, [0, n], scores, patch_type=patch_type, reverse_clean_corrupt=reverse,
                           progress=False, vmap_sizes=vmap_sizes)
        assert list(out) == [0, n]
        for b in loader:
            torch.testing.assert_close(out[0][b.key], plain(gpt2, getattr(b, at_zero)), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(out[n][b.key], plain(gpt2, getattr(b, at_all)), rtol=1e-4, atol=1e-5)
    # the empty and full circuits really differ here (else the test above proves nothing)
    b = next(iter(loader))
    assert (plain(gpt2, b.clean) - plain(gpt2, b.corrupt)).abs().max() > 1e-2


def test_intermediate_circuits_equal_manual_patching(micro):
    batches = micro_batches()
    scores = distinct_scores(micro, seed=3)
    order = sorted(micro.graph.edges, key=lambda e: -abs(float(e.prune_score(scores))))
    for patch_type in (PatchType.EDGE_PATCH, PatchType.TREE_PATCH):
        out = run_circuits(micro, batches, [3, 7], scores, patch_type=patch_type, progress=False)
        for k in (3, 7):
            circuit = order[:k]
            for b in batches:
                torch.testing.assert_close(out[k][b.key], _circuit_by_hand(micro, b, circuit, patch_type),
                                           rtol=1e-12, atol=1e-12)


def test_ties_are_all_included_and_keyed_by_real_size(micro):
    batches = micro_batches(n_batches=1)
    # 13 edges; |scores| in groups: 3 edges at 5, 4 at 2 (one of them negative), the rest 0
    assert micro.n_edges == 13
    flat = torch.zeros(micro.n_edges, dtype=torch.float64)
    flat[[0, 5, 9]] = 5.0
    flat[[1, 2, 11]] = 2.0
    flat[12] = -2.0
    scores, i = {}, 0
    for m in micro.graph.dest_modules:
        shape = m.mask_shape(None)
        n = int(torch.Size(shape).numel())
        scores[m.module_name] = flat[i:i + n].reshape(shape)
        i += n
    requested = [0, 1, 3, 4, 6, 8, micro.n_edges]
    real = [circuit_size_at(scores, c) for c in requested]
    assert real == [0, 3, 3, 7, 7, 13, 13]
    for patch_type in PatchType:
        out = run_circuits(micro, batches, requested, scores, patch_type=patch_type, progress=False)
        assert list(out) == [0, 3, 7, 13]
        for c in requested:
            masks, size = circuit_masks(micro, scores, c, patch_type)
            n_ones = int(sum(float(v.sum()) for v in masks.values()))
            assert size == circuit_size_at(scores, c)
            assert n_ones == (size if patch_type == PatchType.EDGE_PATCH else micro.n_edges - size)
        vm = run_circuits(micro, batches, requested, scores, patch_type=patch_type, progress=False,
                          vmap_sizes=True, vmap_chunk_size=2)
        assert_outputs_equal(out, vm, atol=1e-12)


def scores_in_graph_order(pm, values):
    """PruneScores whose ``i``-th graph edge (``pm.graph.edges[i]``) scores ``values[i]``."""
    out = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in fp.init_state(pm).masks.items()}
    for e, v in zip(pm.graph.edges, values):
        out[e.dest.module_name][e.patch_idx] = v
    return out


@pytest.mark.parametrize("seq_len", [None, 3])
def test_exact_sizes_break_ties_in_graph_order(micro, seq_len):
    """exact_sizes=True: the circuit of k edges is the top k by |score|, ties in the order of
    pm.graph.edges; infinite scores (ACDC's kept edges) first; outputs keyed by k."""
    pm = fp.patchable(micro.model, seq_len=seq_len, slice_output="last_seq")
    n = pm.n_edges
    g = torch.Generator().manual_seed(5)
    pool = torch.tensor([float("inf"), -float("inf"), 3.0, -3.0, 1.0, 0.0], dtype=torch.float64)
    values = pool[torch.randint(0, len(pool), (n,), generator=g)].tolist()
    scores = scores_in_graph_order(pm, values)
    order = sorted(range(n), key=lambda i: -abs(values[i]))  # Python's sort is stable
    ranks = edge_ranks(pm, scores)
    assert [int(ranks[e.dest.module_name][e.patch_idx]) for e in pm.graph.edges] == \
        [order.index(i) for i in range(n)]
    batches = micro_batches(n_batches=1)
    requested = [0, 1, 2, 5, n // 2, n - 1, n]
    for patch_type in PatchType:
        for c in requested:
            masks, size = circuit_masks(pm, scores, c, patch_type, ranks=ranks)
            on = {e for e in pm.graph.edges if float(e.prune_score(masks)) == 1.0}
            circuit = {pm.graph.edges[i] for i in order[:c]}
            assert size == c
            assert on == (circuit if patch_type == PatchType.EDGE_PATCH else set(pm.graph.edges) - circuit)
        out = run_circuits(pm, batches, requested, scores, patch_type=patch_type, progress=False, exact_sizes=True)
        assert list(out) == requested
        vm = run_circuits(pm, batches, requested, scores, patch_type=patch_type, progress=False, exact_sizes=True,
                          vmap_sizes=True)
        assert_outputs_equal(out, vm, atol=1e-12)
        b = batches[0]
        for c in (1, n // 2):  # the same output as patching those edges by hand
            circuit = [pm.graph.edges[i] for i in order[:c]]
            torch.testing.assert_close(out[c][b.key], _circuit_by_hand(pm, b, circuit, patch_type),
                                       rtol=1e-12, atol=1e-12)
    # the default keeps the tie rule: every infinite score is in the "1-edge" circuit
    n_inf = sum(math.isinf(v) for v in values)
    assert n_inf > 1
    assert list(run_circuits(pm, batches, [1], scores, progress=False)) == [n_inf]
    with pytest.raises(ValueError, match="NaN"):
        edge_ranks(pm, {**scores, pm.graph.dest_modules[0].module_name: torch.full_like(
            scores[pm.graph.dest_modules[0].module_name], float("nan"))})


def test_vmapped_equals_sequential_token_graph_and_mean_ablation(micro):
    batches = micro_batches()
    tok = fp.patchable(micro.model, seq_len=3, slice_output="last_seq")
    scores = algos.eap(tok, batches, progress=False)
    counts = [0, 5, 17, tok.n_edges]
    for patch_type in PatchType:
        seq = run_circuits(tok, batches, counts, scores, patch_type=patch_type, progress=False)
        vm = run_circuits(tok, batches, counts, scores, patch_type=patch_type, progress=False, vmap_sizes=True)
        assert_outputs_equal(seq, vm, atol=1e-12)
    b = batches[0]
    torch.testing.assert_close(seq[tok.n_edges][b.key], plain(tok, b.clean))  # TREE_PATCH, all edges


def test_dataset_mean_and_zero_ablations_gpt2(gpt2, loader):
    """Also resample: sizes stacked along the batch share one batch's patch values."""
    scores = distinct_scores(gpt2, seed=1)
    for ablation in ("resample", fp.AblationType.TOKENWISE_MEAN_CLEAN_AND_CORRUPT, "zero"):
        seq = run_circuits(gpt2, loader, [0, 10, gpt2.n_edges], scores, ablation_type=ablation, progress=False)
        vm = run_circuits(gpt2, loader, [0, 10, gpt2.n_edges], scores, ablation_type=ablation, progress=False,
                          vmap_sizes=True)
        assert_outputs_equal(seq, vm, atol=1e-5)
        for b in loader:  # no edge patched: the corrupt prompts' own run
            torch.testing.assert_close(seq[0][b.key], plain(gpt2, b.corrupt), rtol=1e-4, atol=1e-5)
    # with zero ablation every edge is patched to zero at the full circuit: differs from clean
    b = next(iter(loader))
    assert (seq[gpt2.n_edges][b.key] - plain(gpt2, b.clean)).abs().max() > 1e-3


def test_bad_arguments(micro):
    batches = micro_batches(n_batches=1)
    scores = distinct_scores(micro)
    with pytest.raises(ValueError, match="patch_type"):
        run_circuits(micro, batches, [1], scores, patch_type="node_patch")
    with pytest.raises(ValueError, match="missing"):
        run_circuits(micro, batches, [1], {k: v for k, v in list(scores.items())[1:]})
    bad = dict(scores)
    k0 = next(iter(bad))
    bad[k0] = bad[k0].flatten()
    with pytest.raises(ValueError, match="shape"):
        run_circuits(micro, batches, [1], bad)
    with pytest.raises(ValueError, match="out of range"):
        run_circuits(micro, batches, [micro.n_edges + 1], scores)
    with pytest.raises(ValueError, match="no batches"):
        run_circuits(micro, [], [1], scores)
    with pytest.raises(NotImplementedError, match="render"):
        run_circuits(micro, batches, [1], scores, render_graph=True)
    with pytest.raises(ValueError, match="NaN"):
        run_circuits(micro, batches, [1], {**scores, k0: torch.full_like(scores[k0], float("nan"))})
    other = dataclasses.replace(batches[0], corrupt=batches[0].corrupt[:, :2])
    with pytest.raises(ValueError, match="same shape"):
        run_circuits(micro, [other], [1], scores)


def _circuit_by_hand(pm, b, circuit, patch_type):
    """The last-position output of ``circuit`` on batch ``b``, built edge by edge with
    patch_mode: EDGE_PATCH runs the corrupt prompts with the circuit's edges carrying
    clean values; TREE_PATCH runs the clean prompts with every other edge corrupt."""
    if patch_type == PatchType.EDGE_PATCH:
        state = fp.patch_mode(pm, fp.init_state(pm), fp.src_ablations(pm, b.clean), circuit)
        x = b.corrupt
    else:
        rest = [e for e in pm.graph.edges if e not in circuit]
        state = fp.patch_mode(pm, fp.init_state(pm), fp.src_ablations(pm, b.corrupt), rest)
        x = b.clean
    with torch.no_grad():
        return fp.patched_forward(pm, state, x)[:, -1]
