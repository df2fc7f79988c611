"""Subnetwork probing and circuit probing: the seed's numbers, reproducibility, training."""

import pytest
import torch

import funcpatch as fp
from conftest import tokens
from funcpatch.algos.probing import (SP_INIT_VAL, circuit_probing, subnetwork_probing, subnetwork_probing_run)

CLEAN = torch.tensor([[[1.0, 2.0], [0.5, -1.0], [2.0, 1.0]],
                      [[-1.0, 0.5], [1.5, 0.25], [0.0, 1.0]],
                      [[0.3, -0.7], [1.0, 1.0], [-0.5, 2.0]]])
CORRUPT = torch.tensor([[[0.0, 1.0], [1.0, -0.5], [1.0, 2.0]],
                        [[-0.5, 0.0], [1.0, 1.0], [0.5, 0.5]],
                        [[1.0, -1.0], [0.0, 2.0], [0.5, 1.0]]])

# auto-circuit 1.0.1 on its MicroModel(2) (slice_output="last_seq", one batch of the prompts
# above, answers [0], wrong answers [1], epochs=4), with its edges and masks in funcpatch's order.
SEED_SP_SIGMOID = {  # subnetwork_probing_prune_scores(mask_fn="sigmoid")
    "Resid Start->B0.0": 0.80041, "Resid Start->B0.1": 0.800334, "Resid Start->B1.0": 0.001586,
    "B0.0->B1.0": 0.0, "B0.1->B1.0": 0.79292, "Resid Start->B1.1": 0.000978, "B0.0->B1.1": 0.79292,
    "B0.1->B1.1": 0.799711, "Resid Start->Resid End": 0.001936, "B0.0->Resid End": 0.001586,
    "B0.1->Resid End": 0.000978, "B1.0->Resid End": 0.80041, "B1.1->Resid End": 0.800334}
SEED_SP_TREE = {  # (mask_fn=None, tree_optimisation=True, faithfulness_target="logit_diff_percent")
    "Resid Start->B0.0": 0.678859, "Resid Start->B0.1": 0.675547, "Resid Start->B1.0": 0.0,
    "B0.0->B1.0": 0.770758, "B0.1->B1.0": 0.771727, "Resid Start->B1.1": 0.000144, "B0.0->B1.1": 0.771727,
    "B0.1->B1.1": 0.772108, "Resid Start->Resid End": 0.79269, "B0.0->Resid End": 0.0,
    "B0.1->Resid End": 0.000144, "B1.0->Resid End": 0.678859, "B1.1->Resid End": 0.675547}
SEED_CP = {  # circuit_probing_prune_scores(mask_fn="sigmoid", circuit_sizes=[3, 7])
    "Resid Start->B0.0": 2.0, "Resid Start->B0.1": 2.0, "Resid Start->B1.0": 0.0, "B0.0->B1.0": 0.0,
    "B0.1->B1.0": 0.0, "Resid Start->B1.1": 1.0, "B0.0->B1.1": 0.0, "B0.1->B1.1": 1.0,
    "Resid Start->Resid End": 0.0, "B0.0->Resid End": 0.0, "B0.1->Resid End": 1.0, "B1.0->Resid End": 2.0,
    "B1.1->Resid End": 2.0}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one intra-op thread is as fast, and does not stall when
    the (shared, 2-core) machine is busy, as OpenMP's spinning threads do."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def batches(n=1):
    answers = torch.zeros(3, 1, dtype=torch.long)
    return [fp.PromptPairBatch(i, 0, CLEAN * (1 + 0.1 * i), CORRUPT * (1 - 0.1 * i), answers, answers + 1)
            for i in range(n)]


@pytest.fixture(scope="module")
def micro():
    return fp.patchable(fp.MicroModel(2), slice_output="last_seq")


def by_name(pm, scores):
    return {e.name: e.prune_score(scores).item() for e in pm.graph.edges}


def test_deterministic_modes_match_the_seed_library(micro):
    sp = subnetwork_probing(micro, batches(), epochs=4, mask_fn="sigmoid", progress=False)
    assert by_name(micro, sp) == pytest.approx(SEED_SP_SIGMOID, abs=2e-6)
    tree = subnetwork_probing(micro, batches(), epochs=4, mask_fn=None, tree_optimisation=True,
                              faithfulness_target="logit_diff_percent", progress=False)
    assert by_name(micro, tree) == pytest.approx(SEED_SP_TREE, abs=2e-6)
    cp = circuit_probing(micro, batches(), circuit_sizes=[7, 3], epochs=4, mask_fn="sigmoid", progress=False)
    assert by_name(micro, cp) == SEED_CP


def test_hard_concrete_is_reproducible_and_learns(micro):
    runs = [subnetwork_probing_run(micro, batches(2), epochs=15, seed=s, progress=False) for s in (0, 0, 1)]
    a, b, c = runs
    assert a.losses == b.losses
    assert all(torch.equal(a.prune_scores[k], b.prune_scores[k]) for k in a.prune_scores)
    assert a.losses != c.losses
    first, last = sum(a.losses[:6]) / 6, sum(a.losses[-6:]) / 6
    assert last < first
    assert all(bool((s >= 0).all()) for s in a.prune_scores.values())
    # the masks start at -init_val and the loss pulls them apart
    assert any(bool((m != -SP_INIT_VAL).any()) for m in a.masks.values())
    assert len(a.losses) == len(a.faithfulness) == len(a.regularization) == 15 * 2


def test_dropout_validation_avoid_edges(micro):
    avoid = ["B1.0->Resid End"]
    kw = dict(epochs=6, mask_fn="sigmoid", dropout_p=0.3, validation_dataloader=batches(1), progress=False)
    r1 = subnetwork_probing_run(micro, batches(2), avoid_edges=avoid, avoid_lambda=50.0, **kw)
    r2 = subnetwork_probing_run(micro, batches(2), avoid_edges=avoid, avoid_lambda=50.0, **kw)
    free = subnetwork_probing_run(micro, batches(2), **kw)
    assert r1.losses == r2.losses and len(r1.val_faithfulness) == len(r1.val_stds) == 12
    edge = micro.graph.edge(avoid[0])
    # without tree optimisation a high mask means "in the circuit": the penalty pushes it down
    assert edge.prune_score(r1.masks) < edge.prune_score(free.masks) - 1.0
    assert edge.prune_score(r1.prune_scores) < edge.prune_score(free.prune_scores)


def test_transformer_masks_train_and_model_untouched(any_lm):
    pm = fp.patchable(any_lm, slice_output="last_seq")
    ds = fp.PromptDataset(tokens(5, batch=4, seq=5), tokens(6, batch=4, seq=5), torch.zeros(4, 1, dtype=torch.long),
                          torch.ones(4, 1, dtype=torch.long))
    dl = fp.PromptDataLoader(ds, seq_len=5, diverge_idx=0, batch_size=2)
    before = {k: v.clone() for k, v in any_lm.state_dict().items()}
    r = subnetwork_probing_run(pm, dl, epochs=2, progress=False, circuit_size=10)
    assert {k: v.shape for k, v in r.prune_scores.items()} == {k: v.shape for k, v in fp.init_state(pm).masks.items()}
    assert all(torch.isfinite(v).all() for v in r.prune_scores.values())
    after = any_lm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in any_lm.parameters())


def test_circuit_probing_true_size_and_errors(micro):
    official = ["B1.0->Resid End", "B1.1->Resid End", "Resid Start->B0.0"]
    cp = circuit_probing(micro, batches(), circuit_sizes=["true_size", 6], official_edges=official, epochs=2,
                         progress=False)
    vals = torch.cat([v.flatten() for v in cp.values()])
    assert set(vals.tolist()) <= {0.0, 1.0, 2.0}
    assert (vals == 2).sum() >= 3 and (vals >= 1).sum() >= 6
    with pytest.raises(ValueError, match="official_edges is None"):
        circuit_probing(micro, batches(), circuit_sizes=["true_size"], progress=False)
    with pytest.raises(ValueError, match="duplicates"):
        circuit_probing(micro, batches(), circuit_sizes=[2, 2], progress=False)
    with pytest.raises(ValueError, match=r"int in \[1, 13\]"):
        circuit_probing(micro, batches(), circuit_sizes=[14], progress=False)
    with pytest.raises(TypeError, match="circuit_sizes must be a sequence"):
        circuit_probing(micro, batches(), circuit_sizes=5, progress=False)


def test_bad_arguments(micro):
    b = batches()
    with pytest.raises(ValueError, match=r"unknown faithfulness_target 'kl'.*'kl_div'.*'logit_diff_percent'"):
        subnetwork_probing(micro, b, faithfulness_target="kl", progress=False)
    with pytest.raises(ValueError, match=r"unknown mask_fn 'relu'.*'hard_concrete'"):
        subnetwork_probing(micro, b, mask_fn="relu", progress=False)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        subnetwork_probing(micro, b, dropout_p=1.0, progress=False)
    with pytest.raises(ValueError, match="epochs must be an int >= 0"):
        subnetwork_probing(micro, b, epochs=-1, progress=False)
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        subnetwork_probing(micro, b, learning_rate=0.0, progress=False)
    with pytest.raises(ValueError, match="unknown ablation type"):
        subnetwork_probing(micro, b, ablation_type="SOMETIMES", progress=False)
    with pytest.raises(ValueError, match="clean_corrupt"):
        subnetwork_probing(micro, b, ablation_type="RESAMPLE", clean_corrupt="both", progress=False)
    with pytest.raises(ValueError, match="does not depend on the batch"):
        subnetwork_probing(micro, b, clean_corrupt="clean", progress=False)
    with pytest.raises(KeyError, match="no edge named"):
        subnetwork_probing(micro, b, avoid_edges=["B9.9->Resid End"], progress=False)
    with pytest.raises(ValueError, match="yielded no batches"):
        subnetwork_probing(micro, [], progress=False)
    odd = [fp.PromptPairBatch(0, 0, CLEAN, CORRUPT, torch.zeros(3, 5), torch.zeros(3, 5))]
    with pytest.raises(ValueError, match="regression target"):
        subnetwork_probing(micro, odd, faithfulness_target="mse", epochs=1, progress=False)
    fits = [fp.PromptPairBatch(0, 0, CLEAN, CORRUPT, torch.zeros(3, 2), torch.zeros(3, 2))]
    assert subnetwork_probing(micro, fits, faithfulness_target="mse", epochs=1, progress=False)
