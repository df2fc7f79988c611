"""The patched forward: exact invariants, hand-computed MicroModel values, bad input."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import funcpatch as fp
from conftest import tokens

X = torch.tensor([[[1.0, 2.0]]])  # [batch, seq, resid]
Y = torch.tensor([[[3.0, 5.0]]])


def micro_run(edges, x=X, y=Y, factorized=True, mask_value=1.0):
    pm = fp.patchable(fp.MicroModel(2), factorized=factorized)
    state = fp.patch_mode(pm, fp.init_state(pm), fp.src_ablations(pm, y), edges=edges)
    masks = {k: v * mask_value for k, v in state.masks.items()}
    return fp.patched_forward(pm, dataclasses.replace(state, masks=masks), x)


# Hand computation (each layer multiplies the residual by 1 + w0 + w1 = [5, 7]):
# clean x0=[1,2]: B0.0=[1,4] B0.1=[3,8] x1=[5,14] B1.0=[5,28] B1.1=[15,56] out=[25,98]
# corrupt y0=[3,5]: B0.0=[3,10] B0.1=[9,20] y1=[15,35] out=[75,245]
@pytest.mark.parametrize("edges, expected", [
    ([], [25, 98]),
    (["Resid Start->B1.0"], [27, 104]),         # B1.0 in = x1 + (y0 - x0) = [7,17] -> [7,34]
    (["B0.1->Resid End"], [31, 110]),           # out + (B0.1 corrupt - clean) = + [6,12]
    (["B0.0->B1.1"], [31, 122]),                # B1.1 in = x1 + [2,6] = [7,20] -> [21,80]
    # x1 = x0 + corrupt heads = [1,2] + [3,10] + [9,20] = [13,32]; layer 1: * [5,7]
    (["Resid Start->B0.0", "Resid Start->B0.1"], [65, 224]),
])
def test_micro_hand_computed(edges, expected):
    assert micro_run(edges).flatten().tolist() == expected


def test_micro_half_mask_interpolates_linearly():
    # The model is linear in each head input, so a 0.5 mask lands halfway.
    assert micro_run(["Resid Start->B1.0"], mask_value=0.5).flatten().tolist() == [26, 101]


def test_micro_residual_graph_hand_computed():
    # resids.0 in = x1 + (B0.0 corrupt - clean) = [5,14] + [2,6] = [7,20]; layer 1: * [5,7]
    assert micro_run(["B0.0->Resid Post 0"], factorized=False).flatten().tolist() == [35, 140]


def _state(pm, clean, corrupt, value):
    st0 = fp.patch_mode(pm, fp.init_state(pm), fp.src_ablations(pm, corrupt))
    return fp.set_all_masks(st0, value)


@pytest.mark.parametrize("factorized, split, seq", [(True, True, None), (True, False, None), (False, None, None),
                                                    (True, True, 6)])
def test_no_edge_is_clean_all_edges_is_corrupt(transformer, factorized, split, seq):
    cfg = transformer.cfg
    if not factorized and cfg.parallel_attn_mlp:
        pytest.skip("residual graph needs sequential blocks")
    pm = fp.patchable(transformer, factorized=factorized, separate_qkv=split, seq_len=seq)
    clean, corrupt = tokens(1), tokens(2)
    with torch.no_grad():
        out0 = fp.patched_forward(pm, _state(pm, clean, corrupt, 0.0), clean)
        out1 = fp.patched_forward(pm, _state(pm, clean, corrupt, 1.0), clean)
        torch.testing.assert_close(out0, transformer(clean), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out1, transformer(corrupt), atol=1e-5, rtol=1e-5)


def test_token_specific_mask_patches_only_its_position(any_lm):
    pm = fp.patchable(any_lm, seq_len=6)
    clean, corrupt = tokens(1), tokens(2)
    st = fp.patch_mode(pm, fp.init_state(pm), fp.src_ablations(pm, corrupt),
                       edges=[pm.graph.edge("Resid Start->Resid End", 4)])
    with torch.no_grad():
        diff = (fp.patched_forward(pm, st, clean) - any_lm(clean)).abs().amax(dim=(0, 2))
    assert diff[4] > 1e-3 and torch.all(diff[[0, 1, 2, 3, 5]] < 1e-5)


def test_edge_names_and_objects_agree(any_lm):
    pm = fp.patchable(any_lm)
    names = ["A0.1->MLP 1", "Resid Start->A1.0.K"] if not pm.backend.name.startswith("Hooked") else \
        ["A0.1->MLP 1", "Resid Start->A1.0.K"]
    a = fp.patch_mode(pm, fp.init_state(pm), fp.src_ablations(pm, tokens(2)), edges=names)
    b = fp.patch_mode(pm, fp.init_state(pm), fp.src_ablations(pm, tokens(2)),
                      edges=[pm.graph.edge(n) for n in names])
    assert sum(int(v.sum()) for v in a.masks.values()) == 2
    for k in a.masks:
        assert torch.equal(a.masks[k], b.masks[k])


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.floats(0, 1))
def test_single_edge_mask_is_affine_on_micro(seed, m):
    # MicroModel is linear in every head input, so the output is affine in one edge's mask.
    g = torch.Generator().manual_seed(seed)
    pm = fp.patchable(fp.MicroModel(3))
    x, y = torch.randn(2, 3, 2, generator=g), torch.randn(2, 3, 2, generator=g)
    base = fp.patch_mode(pm, fp.init_state(pm), fp.src_ablations(pm, y))
    edge = pm.graph.edges[int(torch.randint(pm.graph.n_edges, (1,), generator=g))]
    run = lambda v: fp.patched_forward(pm, dataclasses.replace(base, masks=fp.edge_masks(pm, [edge], v)), x)
    torch.testing.assert_close(run(m), run(0.0) + m * (run(1.0) - run(0.0)), rtol=1e-4, atol=1e-4)
    assert not torch.equal(run(1.0), run(0.0)) or edge.src.name == "Resid Start"


def test_ablation_types_match_definitions(any_lm):
    pm = fp.patchable(any_lm)
    clean, corrupt = tokens(1, batch=4), tokens(2, batch=4)
    _, outs = fp.record_src_outs(pm, corrupt)
    A = fp.AblationType
    torch.testing.assert_close(fp.src_ablations(pm, corrupt, A.RESAMPLE), outs.detach())
    assert torch.count_nonzero(fp.src_ablations(pm, corrupt, A.ZERO)) == 0
    btm = fp.src_ablations(pm, corrupt, A.BATCH_TOKENWISE_MEAN)
    torch.testing.assert_close(btm[:, 2], outs.detach().mean(1))
    bam = fp.src_ablations(pm, corrupt, A.BATCH_ALL_TOK_MEAN)
    torch.testing.assert_close(bam[:, 1, 3], outs.detach().mean((1, 2)))
    ds = fp.PromptDataset(torch.cat([clean, corrupt]), torch.cat([corrupt, clean]), torch.zeros(8, 1),
                          torch.ones(8, 1))
    loader = fp.PromptDataLoader(ds, seq_len=6, batch_size=4)
    _, all_clean = fp.record_src_outs(pm, torch.cat([clean, corrupt]))
    mean = fp.src_ablations(pm, loader, A.TOKENWISE_MEAN_CLEAN)
    assert mean.shape == (len(pm.graph.srcs), 4, 6, outs.shape[-1])
    torch.testing.assert_close(mean[:, 0], all_clean.detach().mean(1), atol=1e-5, rtol=1e-5)
    both = fp.src_ablations(pm, loader, A.TOKENWISE_MEAN_CLEAN_AND_CORRUPT)
    torch.testing.assert_close(both, mean, atol=1e-5, rtol=1e-5)  # corrupt set = clean set here
    per_batch = fp.batch_src_ablations(pm, loader, A.RESAMPLE, clean_corrupt="corrupt")
    first = next(iter(loader))
    torch.testing.assert_close(per_batch[first.key], fp.src_ablations(pm, first.corrupt))
    with pytest.raises(ValueError, match="clean_corrupt"):
        fp.batch_src_ablations(pm, loader, A.RESAMPLE)
    with pytest.raises(ValueError, match="does not use clean_corrupt"):
        fp.batch_src_ablations(pm, loader, A.ZERO, clean_corrupt="clean")
    with pytest.raises(TypeError, match="PromptDataLoader"):
        fp.src_ablations(pm, corrupt, A.TOKENWISE_MEAN_CLEAN)
    with pytest.raises(ValueError, match="RESAMPLE"):
        fp.src_ablations(pm, corrupt, "resample_all")


@pytest.mark.parametrize("which", ["clean", "corrupt"])
def test_batch_means_of_a_padded_batch(gpt2, which):
    # A padded batch takes its own code path (with the attention mask): its batch means
    # are per position for BATCH_TOKENWISE_MEAN and over positions for BATCH_ALL_TOK_MEAN.
    from funcpatch.circuits import batch_patch_values
    pm = fp.patchable(gpt2)
    lengths = [6, 4, 5]
    prompts = [tokens(10 + i, batch=1, seq=n)[0] for i, n in enumerate(lengths)]
    padded = torch.stack([torch.cat([torch.zeros(6 - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.cat([torch.zeros(6 - len(p)), torch.ones(len(p))]).long() for p in prompts])
    batch = fp.PromptPairBatch(0, 0, padded, padded.flip(0), torch.zeros(3, 1), torch.ones(3, 1),
                               attention_mask=mask, corrupt_attention_mask=mask.flip(0))
    A = fp.AblationType
    outs = batch_patch_values(pm, batch, which, A.RESAMPLE)  # [n_srcs, 3, 6, d]
    order = [0, 1, 2] if which == "clean" else [2, 1, 0]
    for row, k in enumerate(order):  # each row's real positions equal the prompt run alone, unpadded
        alone = fp.record_src_outs(pm, prompts[k][None])[1][:, 0]
        torch.testing.assert_close(outs[:, row, 6 - lengths[k]:], alone, atol=1e-5, rtol=1e-5)
    tokenwise = batch_patch_values(pm, batch, which, A.BATCH_TOKENWISE_MEAN)
    assert tokenwise.shape == outs.shape
    for row in range(3):
        torch.testing.assert_close(tokenwise[:, row], outs.mean(1), atol=1e-6, rtol=1e-6)
    last = torch.stack([fp.record_src_outs(pm, p[None])[1][:, 0, -1] for p in prompts]).mean(0)
    torch.testing.assert_close(tokenwise[:, 0, -1], last, atol=1e-5, rtol=1e-5)
    all_tok = batch_patch_values(pm, batch, which, A.BATCH_ALL_TOK_MEAN)
    torch.testing.assert_close(all_tok[:, 1, 2], outs.mean((1, 2)), atol=1e-6, rtol=1e-6)
