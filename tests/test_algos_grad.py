"""Gradient-based prune algorithms (mask_gradient, eap, eap_ig), exact patching and baselines.

The reference numbers are computed independently of funcpatch's masks wherever possible:
gradients at the destination hook points with plain ``torch.autograd`` through forward
hooks written here, finite differences, and the completeness of integrated gradients.
"""

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch

import funcpatch as fp
from conftest import DEVICE
from funcpatch import algos
from funcpatch.data import PromptPairBatch

VOCAB, SEQ = 50, 5


# --------------------------------------------------------------------------------------
# Models and data


def tiny_gpt2():
    import transformers
    from transformers import GPT2Config

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16, initializer_range=0.2,
                     bos_token_id=0, eos_token_id=0)
    return fp.models.from_hf(transformers.GPT2LMHeadModel(cfg).eval().to(DEVICE))


def tiny_hooked():
    tl = pytest.importorskip("transformer_lens")
    try:
        tl.HookedTransformer
    except (ImportError, AttributeError):
        pytest.skip("TransformerLens >= 4 has no HookedTransformer")
    cfg = tl.HookedTransformerConfig(n_layers=2, d_model=32, n_heads=2, d_head=16, n_ctx=16, d_vocab=VOCAB,
                                     act_fn="gelu_new", normalization_type="LN", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = tl.HookedTransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    return model


def token_loader(n=4, batch_size=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    corrupt = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    ans = torch.randint(0, VOCAB, (n, 1), generator=g)
    wrong = torch.randint(0, VOCAB, (n, 1), generator=g)
    clean, corrupt, ans, wrong = (t.to(DEVICE) for t in (clean, corrupt, ans, wrong))
    return fp.PromptDataLoader(fp.PromptDataset(clean, corrupt, ans, wrong), seq_len=SEQ, batch_size=batch_size)


def micro_batches(n_batches=2, batch=2, seq=3, dtype=torch.float64, seed=2, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        clean = scale * torch.randn(batch, seq, 2, generator=g, dtype=dtype)
        corrupt = scale * torch.randn(batch, seq, 2, generator=g, dtype=dtype)
        out.append(PromptPairBatch(key=i, batch_diverge_idx=0, clean=clean, corrupt=corrupt,
                                   answers=torch.zeros(batch, 1, dtype=torch.long),
                                   wrong_answers=torch.ones(batch, 1, dtype=torch.long)))
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny tensors: extra threads only contend (measured 20x slower on a loaded 2-core machine)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def gpt2():
    return fp.patchable(tiny_gpt2(), slice_output="last_seq")


@pytest.fixture(scope="module")
def loader():
    return token_loader(n=4, batch_size=2)


@pytest.fixture(scope="module")
def gpt2_eap(gpt2, loader):
    return algos.eap(gpt2, loader, progress=False)


@pytest.fixture(scope="module")
def micro():
    return fp.patchable(fp.MicroModel(2).double(), slice_output="last_seq")


def close(a, b, rtol=1e-4, atol=1e-6):
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


def flat(scores):
    return torch.cat([v.flatten() for v in scores.values()])


# --------------------------------------------------------------------------------------
# Independent reference: gradients at the dest hook points via plain autograd


def hook_module(pm, name):
    return pm.model.get_submodule(name) if not pm.is_transformer else pm.model.hook_dict[name]


def set_flags(pm, on: bool):
    if pm.is_transformer:
        pm.model.set_use_attn_result(on)
        pm.model.set_use_split_qkv_input(on)
        pm.model.set_use_hook_mlp_in(on)


def hand_loss(out, batch):
    """-(answer logit - wrong logit), mean over the batch, single answers."""
    last = out[:, -1]
    a = last.gather(-1, batch.answers).squeeze(-1)
    w = last.gather(-1, batch.wrong_answers).squeeze(-1)
    return -(a - w).mean()


def dest_input_grads(pm, tokens, batch, interpolate=None, **model_kwargs):
    """dL/d(dest input) for every dest module, from a plain forward with hooks written here.

    ``interpolate``: optional new output for ``blocks.0.hook_resid_pre`` / ``input``.
    """
    captured, handles = {}, []

    def capture(name):
        def hook(_module, _args, output):
            # a fresh tensor: a hook point is an identity, and its input may also flow on
            # elsewhere (the bridge's hook_mlp_in sees the residual itself)
            new = output.clone()
            captured[name] = new if new.requires_grad else new.requires_grad_()
            return new
        return hook

    set_flags(pm, True)
    try:
        for m in pm.graph.dest_modules:
            handles.append(hook_module(pm, m.module_name).register_forward_hook(capture(m.module_name)))
        if interpolate is not None:
            start = pm.graph.srcs[0].module_name
            handles.append(hook_module(pm, start).register_forward_hook(lambda _m, _a, _o: interpolate))
        loss = hand_loss(pm.model(tokens, **model_kwargs), batch)
        names = [m.module_name for m in pm.graph.dest_modules]
        grads = torch.autograd.grad(loss, [captured[n] for n in names])
    finally:
        for h in handles:
            h.remove()
        set_flags(pm, False)
    return dict(zip(names, grads))


def contract(pm, diff, grads):
    """scores[dest][head?, src] = sum (diff[src] * grad[dest(, head)]) over batch, pos, d."""
    out = {}
    for m in pm.graph.dest_modules:
        a, b = m.in_srcs
        d, g = diff[a:b], grads[m.module_name]
        if m.n_heads is None:
            out[m.module_name] = torch.einsum("sbpd,bpd->s", d, g)
        else:
            out[m.module_name] = torch.einsum("sbpd,bphd->hs", d, g)
    return out


def independent_eap(pm, batches, ablation=None):
    total = None
    for batch in batches:
        with torch.no_grad():
            clean = fp.record_src_outs(pm, batch.clean)[1]
            patch = fp.record_src_outs(pm, batch.corrupt)[1] if ablation is None else ablation(clean)
        s = contract(pm, patch - clean, dest_input_grads(pm, batch.clean, batch))
        total = s if total is None else {k: total[k] + s[k] for k in s}
    return total


# --------------------------------------------------------------------------------------
# EAP


def test_eap_equals_independent_autograd_gpt2(gpt2, loader, gpt2_eap):
    ref = independent_eap(gpt2, list(loader))
    assert flat(ref).abs().max() > 1e-2  # the test model gives non-trivial scores
    close(gpt2_eap, ref)
    close(algos.mask_gradient(gpt2, loader, mask_val=0.0, progress=False), ref)


def test_eap_equals_independent_autograd_hooked_transformer():
    pm = fp.patchable(tiny_hooked(), slice_output="last_seq")
    batches = list(token_loader(n=2, batch_size=2))
    close(algos.eap(pm, batches, progress=False), independent_eap(pm, batches))


def test_eap_micro_zero_ablation_and_token_graph(micro):
    batches = micro_batches()
    ref = independent_eap(micro, batches, ablation=torch.zeros_like)
    got = algos.eap(micro, batches, ablation_type="zero", clean_corrupt=None, progress=False)
    close(got, ref, rtol=1e-9, atol=1e-12)
    # a token-specific graph splits the same numbers over positions
    tok = fp.patchable(micro.model, seq_len=3, slice_output="last_seq")
    per_pos = algos.eap(tok, batches, progress=False)
    close({k: v.sum(0) for k, v in per_pos.items()}, algos.eap(micro, batches, progress=False), rtol=1e-9,
          atol=1e-12)


# --------------------------------------------------------------------------------------
# Loss definitions: grad_function / answer_function


def directional_fd(pm, batch, mask_value, direction, loss, eps=1e-5):
    """(L(m + eps d) - L(m - eps d)) / 2 eps, with plain patched forwards."""
    state = fp.patch_mode(pm, fp.init_state(pm, mask_value), fp.src_ablations(pm, batch.corrupt))

    def value(t):
        masks = {k: v + t * direction[k] for k, v in state.masks.items()}
        return loss(fp.patched_forward(pm, dataclasses.replace(state, masks=masks), batch.clean)[:, -1])

    with torch.no_grad():
        return float((value(eps) - value(-eps)) / (2 * eps))


@pytest.mark.parametrize("grad_function,answer_function", [("prob", "avg_val"), ("logprob", "avg_val"),
                                                           ("prob", "avg_diff"), ("logit", "mse")])
def test_loss_definitions_match_finite_differences(micro, grad_function, answer_function):
    batch = micro_batches(n_batches=1, scale=0.05)[0]  # small inputs: softmax not saturated
    if answer_function == "mse":
        batch = dataclasses.replace(batch, answers=torch.tensor([[0.5, -1.0], [2.0, 0.0]], dtype=torch.float64))
    a, w = batch.answers, batch.wrong_answers

    def loss(logits):  # written out by hand
        if grad_function == "prob":
            vals = torch.softmax(logits, -1)
        elif grad_function == "logprob":
            vals = torch.log_softmax(logits, -1)
        else:
            vals = logits
        if answer_function == "mse":
            return ((vals - a) ** 2).mean()
        ans = vals.gather(-1, a).mean(-1)
        if answer_function == "avg_val":
            return -ans.mean()
        return -(ans - vals.gather(-1, w).mean(-1)).mean()

    g = algos.mask_gradient(micro, [batch], grad_function, answer_function, mask_val=0.3, progress=False)
    gen = torch.Generator().manual_seed(0)
    direction = {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in g.items()}
    fd = directional_fd(micro, batch, 0.3, direction, loss)
    analytic = sum((g[k] * direction[k]).sum() for k in g)
    assert abs(float(fd) - float(analytic)) < 1e-6 * max(1.0, abs(float(fd)))
    assert abs(float(analytic)) > 1e-3


def test_logit_exp_is_prob_weighted_logit_gradient(micro):
    # d/dm [exp(x_a) / Z.detach()] = p_a dx_a/dm: for one prompt and one answer the
    # logit_exp gradient is the "logit" gradient scaled by the answer's probability.
    batch = micro_batches(n_batches=1, batch=1, scale=0.05)[0]
    p_a = torch.softmax(micro.model(batch.clean)[:, -1], -1)[0, 0]
    g_exp = algos.mask_gradient(micro, [batch], "logit_exp", "avg_val", mask_val=0.0, progress=False)
    g_logit = algos.mask_gradient(micro, [batch], "logit", "avg_val", mask_val=0.0, progress=False)
    close(g_exp, {k: p_a * v for k, v in g_logit.items()}, rtol=1e-9, atol=1e-12)
    # and logprob differences equal logit differences (the normaliser cancels)
    close(algos.mask_gradient(micro, [batch], "logprob", "avg_diff", mask_val=0.0, progress=False),
          algos.mask_gradient(micro, [batch], "logit", "avg_diff", mask_val=0.0, progress=False),
          rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------
# Integrated gradients


def test_mask_ig_approaches_the_integral(micro):
    batches = micro_batches()

    def loss_at(value):
        total = 0.0
        for b in batches:
            st = fp.patch_mode(micro, fp.init_state(micro, value), fp.src_ablations(micro, b.corrupt))
            with torch.no_grad():
                total += float(hand_loss(fp.patched_forward(micro, st, b.clean), b))
        return total

    # completeness: sum over edges of the path integral = L(all patched) - L(clean)
    target = loss_at(1.0) - loss_at(0.0)
    assert abs(target) > 0.1
    # per edge: Gauss-Legendre quadrature (exact for this polynomial loss) of the gradient
    nodes, weights = np.polynomial.legendre.leggauss(8)
    quad = None
    for x, w in zip((nodes + 1) / 2, weights / 2):
        g = algos.mask_gradient(micro, batches, mask_val=float(x), progress=False)
        quad = {k: w * v for k, v in g.items()} if quad is None else {k: quad[k] + w * g[k] for k in g}
    assert math.isclose(float(flat(quad).sum()), target, rel_tol=1e-9)

    errors = []
    for n in (4, 64):
        ig = algos.mask_gradient(micro, batches, integrated_grad_samples=n, progress=False)
        mean = {k: v / (n + 1) for k, v in ig.items()}  # the seed sums the n + 1 sample points
        errors.append(float((flat(mean) - flat(quad)).abs().max()))
        assert algos.eap_ig(micro, batches, samples=n, variant="mask", progress=False).keys() == ig.keys()
    assert errors[1] < errors[0] / 8
    assert errors[1] < 0.02 * float(flat(quad).abs().max())


@pytest.mark.parametrize("n", [1, 3])
def test_mask_ig_is_the_sum_of_mask_gradients_at_s_over_n(micro, gpt2, loader, n):
    # N + 1 points s / N, s = 0..N, both ends included, summed: a sum of N points (or a
    # mean) is a different number, which a convergence test alone does not see.
    for pm, batches, rtol in ((micro, micro_batches(), 1e-12), (gpt2, loader, 1e-5)):
        ig = algos.mask_gradient(pm, batches, integrated_grad_samples=n, progress=False)
        total = None
        for s in range(n + 1):
            g = algos.mask_gradient(pm, batches, mask_val=s / n, progress=False)
            total = g if total is None else {k: total[k] + g[k] for k in g}
        assert ig.keys() == total.keys()
        for k in ig:
            torch.testing.assert_close(ig[k], total[k], rtol=rtol, atol=rtol * float(flat(total).abs().max()))


def test_eap_ig_inputs_one_step_is_eap(gpt2, loader, gpt2_eap):
    close(algos.eap_ig(gpt2, loader, samples=1, variant="inputs", progress=False), gpt2_eap)


def test_eap_ig_inputs_equals_independent_interpolation(gpt2, loader, gpt2_eap):
    steps = 2
    ref = None
    for batch in loader:
        with torch.no_grad():
            clean = fp.record_src_outs(gpt2, batch.clean)[1]
            corrupt = fp.record_src_outs(gpt2, batch.corrupt)[1]
        grads = None
        for k in range(1, steps + 1):
            # the input embedding itself, interpolated from corrupt (k=0) to clean (k=steps)
            emb = corrupt[0] + (k / steps) * (clean[0] - corrupt[0])
            g = dest_input_grads(gpt2, batch.clean, batch, interpolate=emb)
            grads = g if grads is None else {n: grads[n] + g[n] for n in g}
        s = contract(gpt2, corrupt - clean, {n: v / steps for n, v in grads.items()})
        ref = s if ref is None else {n: ref[n] + s[n] for n in s}
    got = algos.eap_ig(gpt2, loader, samples=steps, variant="inputs", progress=False)
    close(got, ref)
    assert float((flat(got) - flat(gpt2_eap)).abs().max()) > 1e-3


# --------------------------------------------------------------------------------------
# Per-prompt scores (vmap) equal a loop over single prompts


def single_prompt_batches(batches):
    out = []
    for b in batches:
        for j in range(b.clean.shape[0]):
            out.append(PromptPairBatch(
                key=(b.key, j), batch_diverge_idx=0, clean=b.clean[j:j + 1], corrupt=b.corrupt[j:j + 1],
                answers=b.answers[j:j + 1] if isinstance(b.answers, torch.Tensor) else [b.answers[j]],
                wrong_answers=(b.wrong_answers[j:j + 1] if isinstance(b.wrong_answers, torch.Tensor)
                               else [b.wrong_answers[j]])))
    return out


def loop_reference(fn, batches):
    rows = [fn([b]) for b in single_prompt_batches(batches)]
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def test_per_prompt_vmap_equals_loop_gpt2(gpt2, loader, gpt2_eap):
    batches = list(loader)
    got = algos.eap(gpt2, batches, per_prompt=True, progress=False)
    close(got, loop_reference(lambda bs: algos.eap(gpt2, bs, progress=False), batches))
    # the batch-summed scores are the per-prompt ones averaged within each batch
    assert all(v.shape[0] == 4 for v in got.values())
    close({k: v[:2].mean(0) + v[2:].mean(0) for k, v in got.items()}, gpt2_eap)


def test_padded_prompts_use_their_attention_masks(gpt2, loader):
    b = next(iter(loader))
    mask, cmask = torch.ones_like(b.clean), torch.ones_like(b.clean)
    mask[0, :2] = 0
    cmask[1, :1] = 0
    padded = dataclasses.replace(b, attention_mask=mask, corrupt_attention_mask=cmask)
    got = algos.eap(gpt2, [padded], per_prompt=True, progress=False)  # one prompt at a time
    batch = algos.eap(gpt2, [padded], progress=False)
    close({k: v.mean(0) for k, v in got.items()}, batch)
    # independent: clean and corrupt runs with their own masks
    with torch.no_grad():
        clean = fp.record_src_outs(gpt2, b.clean, attention_mask=mask)[1]
        corrupt = fp.record_src_outs(gpt2, b.corrupt, attention_mask=cmask)[1]
    for j in range(2):
        one = dataclasses.replace(padded, answers=b.answers[j:j + 1], wrong_answers=b.wrong_answers[j:j + 1])
        grads = dest_input_grads(gpt2, b.clean[j:j + 1], one, attention_mask=mask[j:j + 1])
        close({k: v[j] for k, v in got.items()}, contract(gpt2, (corrupt - clean)[:, j:j + 1], grads))
    unpadded = algos.eap(gpt2, [b], progress=False)
    assert float((flat(batch) - flat(unpadded)).abs().max()) > 1e-2  # the masks matter


def test_per_prompt_ig_and_ragged_answers_micro(micro):
    batches = micro_batches()
    for variant_kwargs in ({"integrated_grad_samples": 3}, {"mask_val": 0.5}):
        got = algos.mask_gradient(micro, batches, per_prompt=True, progress=False, **variant_kwargs)
        ref = loop_reference(lambda bs: algos.mask_gradient(micro, bs, progress=False, **variant_kwargs), batches)
        close(got, ref, rtol=1e-9, atol=1e-12)
    got = algos.eap_ig(micro, batches, samples=2, variant="inputs", per_prompt=True, progress=False)
    close(got, loop_reference(lambda bs: algos.eap_ig(micro, bs, samples=2, variant="inputs", progress=False),
                              batches), rtol=1e-9, atol=1e-12)
    # ragged answers (lists) go one prompt at a time and agree with the tensor path
    ragged = [dataclasses.replace(b, answers=list(b.answers), wrong_answers=list(b.wrong_answers)) for b in batches]
    close(algos.eap(micro, ragged, per_prompt=True, progress=False),
          algos.eap(micro, batches, per_prompt=True, progress=False), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------
# Exact patching


def naive_exact(pm, batches, edges):
    out = {}
    for e in edges:
        total = 0.0
        for b in batches:
            patch = fp.src_ablations(pm, b.corrupt)
            with torch.no_grad():
                base = hand_loss(pm.model(b.clean), b)
                one = fp.patch_mode(pm, fp.init_state(pm), patch, edges=[e])
                total += float(hand_loss(fp.patched_forward(pm, one, b.clean), b) - base)
        out[e] = total
    return out


def test_exact_patching_micro_equals_naive(micro):
    batches = micro_batches()
    got = algos.exact_patching(micro, batches, batch_edges=5, progress=False)
    ref = naive_exact(micro, batches, micro.graph.edges)
    for e, v in ref.items():
        assert math.isclose(float(e.prune_score(got)), v, rel_tol=1e-9, abs_tol=1e-12), e
    # exact effects are what EAP approximates to first order: for this model's loss, which
    # is polynomial in the masks, they differ but are correlated
    eap = algos.eap(micro, batches, progress=False)
    assert torch.corrcoef(torch.stack([flat(got), flat(eap)]))[0, 1] > 0.5


def test_exact_patching_gpt2_subset_and_custom_metric(gpt2, loader):
    batches = list(loader)
    got = algos.exact_patching(gpt2, batches, batch_edges=7, progress=False)
    edges = [gpt2.graph.edges[i] for i in (0, 6, 7, 20, 33, 45)]
    for e, v in naive_exact(gpt2, batches, edges).items():
        assert math.isclose(float(e.prune_score(got)), v, rel_tol=1e-4, abs_tol=1e-5), e
    doubled = algos.exact_patching(gpt2, batches, metric=lambda out, b: 2 * hand_loss(out.unsqueeze(1), b),
                                   batch_edges=64, progress=False)
    close(doubled, {k: 2 * v for k, v in got.items()})


# --------------------------------------------------------------------------------------
# Baselines


def test_activation_magnitude_random_ground_truth(micro):
    batches = micro_batches()
    am = algos.activation_magnitude(micro, batches, progress=False)
    with torch.no_grad():
        means = torch.stack([fp.record_src_outs(micro, b.clean)[1].mean(dim=(1, 2, 3)).abs() for b in batches])
    means = means.mean(0)
    for e in micro.graph.edges:
        assert math.isclose(float(e.prune_score(am)), float(means[e.src.src_idx]), rel_tol=1e-12)

    r1, r2 = algos.random_scores(micro, seed=3), algos.random_scores(micro, seed=3)
    close(r1, r2, rtol=0, atol=0)
    assert all(((v >= 0) & (v < 1)).all() for v in r1.values())
    assert not torch.equal(flat(r1), flat(algos.random_scores(micro, seed=4)))
    assert {k: v.shape for k, v in r1.items()} == {k: v.shape for k, v in fp.init_state(micro).masks.items()}

    names = ["Resid Start->B1.0", "B0.1->Resid End"]
    gt = algos.ground_truth(micro, names)
    assert float(flat(gt).sum()) == 2
    assert all(float(e.prune_score(gt)) == (1.0 if e.name in names else 0.0) for e in micro.graph.edges)
    with pytest.raises(KeyError, match="close matches"):
        algos.ground_truth(micro, ["Resid Start->B1.9"])


# --------------------------------------------------------------------------------------
# Errors


def test_bad_arguments_raise_clear_errors(micro):
    batches = micro_batches(n_batches=1)
    with pytest.raises(ValueError, match="grad_function.*valid"):
        algos.mask_gradient(micro, batches, grad_function="logits2", mask_val=0.0)
    with pytest.raises(ValueError, match="answer_function.*valid"):
        algos.mask_gradient(micro, batches, answer_function="kl", mask_val=0.0)
    with pytest.raises(ValueError, match="exactly one"):
        algos.mask_gradient(micro, batches, mask_val=0.0, integrated_grad_samples=4)
    with pytest.raises(ValueError, match="exactly one"):
        algos.mask_gradient(micro, batches)
    with pytest.raises(ValueError, match=">= 1"):
        algos.mask_gradient(micro, batches, integrated_grad_samples=0)
    with pytest.raises(ValueError, match="no batches"):
        algos.eap(micro, [])
    with pytest.raises(ValueError, match="no batches"):
        algos.exact_patching(micro, [])
    bad = dataclasses.replace(batches[0], answers=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"answers has shape \(2,\)"):
        algos.eap(micro, [bad], progress=False)
    bad = dataclasses.replace(batches[0], wrong_answers=torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="wrong_answers"):
        algos.eap(micro, [bad], progress=False)
    with pytest.raises(ValueError, match="mse"):
        algos.mask_gradient(micro, batches, answer_function="mse", mask_val=0.0, progress=False)
    with pytest.raises(ValueError, match="variant.*valid"):
        algos.eap_ig(micro, batches, variant="weights")
    with pytest.raises(ValueError, match="factorized"):
        algos.eap_ig(fp.patchable(micro.model, factorized=False, slice_output="last_seq"), batches,
                     variant="inputs", progress=False)
    with pytest.raises(ValueError, match="clean_corrupt"):
        algos.eap(micro, batches, ablation_type="zero", clean_corrupt="clean")
    with pytest.raises(ValueError, match="clean_corrupt"):
        algos.eap(micro, batches, clean_corrupt=None)
    with pytest.raises(ValueError, match="batch_edges"):
        algos.exact_patching(micro, batches, batch_edges=0)
    with pytest.raises(TypeError, match="PromptPairBatch"):
        algos.eap(micro, [1, 2])


# --------------------------------------------------------------------------------------
# Memory budget: sub-batches of prompts give the whole batch's scores


@pytest.mark.parametrize("call", [
    lambda pm, dl, **kw: algos.eap(pm, dl, progress=False, **kw),
    lambda pm, dl, **kw: algos.eap(pm, dl, ablation_type="batch_tokenwise_mean", progress=False, **kw),
    lambda pm, dl, **kw: algos.eap(pm, dl, ablation_type="tokenwise_mean_corrupt", clean_corrupt=None,
                                   progress=False, **kw),
    lambda pm, dl, **kw: algos.eap(pm, dl, per_prompt=True, progress=False, **kw),
    lambda pm, dl, **kw: algos.eap_ig(pm, dl, samples=2, variant="mask", progress=False, **kw),
    lambda pm, dl, **kw: algos.eap_ig(pm, dl, samples=2, variant="inputs", progress=False, **kw),
], ids=["eap", "batch_mean", "dataset_mean", "per_prompt", "ig_mask", "ig_inputs"])
def test_max_memory_splits_batches_into_sub_batches_with_the_same_scores(call, monkeypatch):
    import importlib
    mg = importlib.import_module("funcpatch.algos.mask_gradient")  # the module, not the function
    pm = fp.patchable(tiny_gpt2(), slice_output="last_seq")
    dl = token_loader(n=6, batch_size=3)
    want = call(pm, dl)
    rows = []
    real = mg._shares

    def spy(*a, **k):  # the prompts of each sub-batch
        for share, patch_values in real(*a, **k):
            rows.append(share.clean.shape[0])
            yield share, patch_values
    monkeypatch.setattr(mg, "_shares", spy)
    got = call(pm, dl, max_memory=1)  # one prompt per sub-batch
    assert set(rows) == {1}, rows
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-6 * float(want[k].abs().max())), k
    rows.clear()
    assert call(pm, dl, max_memory=2 ** 40).keys() == want.keys()  # everything fits: whole batches
    assert set(rows) == {3}


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "1GB"])
def test_max_memory_must_be_a_positive_int(bad):
    pm = fp.patchable(tiny_gpt2(), slice_output="last_seq")
    with pytest.raises(ValueError, match="max_memory"):
        algos.eap(pm, token_loader(), max_memory=bad, progress=False)
