"""torch.func composition, the state pytree, purity, thread safety, and bad input."""

import dataclasses
import threading

import optree
import pytest
import torch
import torch.utils._pytree as torch_pytree
from torch.func import functional_call, grad, jacrev, jvp, vmap

import funcpatch as fp
from conftest import TRANSFORMERS, has_bridge, tokens


def setup(model, seed=0, batch=3):
    pm = fp.patchable(model, slice_output="last_seq")
    clean, corrupt = tokens(seed, batch=batch), tokens(seed + 100, batch=batch)
    state = fp.patch_mode(pm, fp.init_state(pm), fp.src_ablations(pm, corrupt))
    g = torch.Generator().manual_seed(seed)
    masks = {k: torch.rand(v.shape, generator=g) for k, v in state.masks.items()}
    return pm, clean, dataclasses.replace(state, masks=masks)


def loss_fn(pm, state):
    def loss(masks, x, patch):
        s = dataclasses.replace(state, masks=masks, patch_src_outs=patch)
        return fp.patched_forward(pm, s, x)[pm.out_slice][..., :5].sum()
    return loss


def test_vmap_per_prompt_grads_equal_a_loop(any_lm):
    pm, clean, state = setup(any_lm)
    loss = loss_fn(pm, state)
    per_prompt = vmap(grad(loss), in_dims=(None, 0, 1))(state.masks, clean[:, None], state.patch_src_outs[:, :, None])
    for i in range(clean.shape[0]):
        single = grad(loss)(state.masks, clean[i:i + 1], state.patch_src_outs[:, i:i + 1])
        for k in single:
            torch.testing.assert_close(per_prompt[k][i], single[k], atol=1e-5, rtol=1e-4)
    assert any(v.abs().sum() > 0 for v in per_prompt.values())


def test_vmap_over_masks_equals_a_loop(any_lm):
    pm, clean, state = setup(any_lm)
    stacked = {k: torch.stack([v, 1 - v, v * 0]) for k, v in state.masks.items()}
    run = lambda masks: fp.patched_forward(pm, dataclasses.replace(state, masks=masks), clean)
    out = vmap(run)(stacked)
    for i in range(3):
        torch.testing.assert_close(out[i], run({k: v[i] for k, v in stacked.items()}), atol=1e-5, rtol=1e-5)


def test_jvp_along_a_mask_direction_equals_finite_difference(any_lm):
    pm, clean, state = setup(any_lm)
    loss = loss_fn(pm, state)
    f = lambda masks: loss(masks, clean, state.patch_src_outs)
    g = torch.Generator().manual_seed(1)
    direction = {k: torch.randn(v.shape, generator=g) for k, v in state.masks.items()}
    _, tangent = jvp(f, (dict(state.masks),), (direction,))  # tangents must match the primals: plain dicts
    eps = 1e-3
    with torch.no_grad():
        plus = f({k: v + eps * direction[k] for k, v in state.masks.items()})
        minus = f({k: v - eps * direction[k] for k, v in state.masks.items()})
    torch.testing.assert_close(tangent, (plus - minus) / (2 * eps), rtol=2e-2, atol=2e-3)
    flat_grad = grad(f)(state.masks)
    assert torch.isclose(tangent, sum((flat_grad[k] * direction[k]).sum() for k in direction), rtol=1e-4)


def test_jacrev_matches_grad_per_output(any_lm):
    pm, clean, state = setup(any_lm, batch=2)
    def f(masks):
        return fp.patched_forward(pm, dataclasses.replace(state, masks=masks), clean)[pm.out_slice][:, :3]
    jac = jacrev(f)(state.masks)
    key = next(iter(state.masks))
    for b in range(2):
        for j in range(3):
            g = grad(lambda m: f(m)[b, j])(state.masks)
            torch.testing.assert_close(jac[key][b, j], g[key], atol=1e-5, rtol=1e-4)


def test_grad_wrt_model_parameters_through_params(any_lm):
    pm, clean, state = setup(any_lm)
    params = {k: v.detach() for k, v in any_lm.named_parameters()}
    zero = fp.set_all_masks(state, 0.0)  # clean run: gradients must equal the plain model's

    def patched(p):
        return fp.patched_forward(pm, zero, clean, params=p)[pm.out_slice].pow(2).mean()

    def plain(p):
        return functional_call(any_lm, p, (clean,))[:, -1].pow(2).mean()

    gp, g0 = grad(patched)(params), grad(plain)(params)
    nonzero = [k for k in g0 if g0[k].abs().sum() > 0]
    assert nonzero
    for k in nonzero:
        torch.testing.assert_close(gp[k], g0[k], atol=1e-5, rtol=1e-4)
    # and params really are used: scaling a weight changes the output
    k = nonzero[0]
    bumped = dict(params, **{k: params[k] * 1.5})
    assert not torch.allclose(fp.patched_forward(pm, state, clean, params=bumped),
                              fp.patched_forward(pm, state, clean))


def test_state_is_a_pytree_for_torch_and_optree(any_lm):
    pm, clean, state = setup(any_lm)
    noise = fp.sample_mask_noise(state, batch_size=3, generator=torch.Generator().manual_seed(0))
    state = fp.mask_fn_mode(state, "hard_concrete", noise=noise)
    leaves, spec = torch_pytree.tree_flatten(state)
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    assert len(tensors) == 2 * len(state.masks) + 1  # masks, concrete noise, patch values
    back = torch_pytree.tree_unflatten([x * 1 if isinstance(x, torch.Tensor) else x for x in leaves], spec)
    assert isinstance(back, fp.PatchState) and back.mask_fn == "hard_concrete"
    oleaves, ospec = optree.tree_flatten(state, namespace="funcpatch")
    assert len(oleaves) == len(tensors)
    doubled = optree.tree_map(lambda t: t * 2, state, namespace="funcpatch")
    assert torch.equal(doubled.patch_src_outs, state.patch_src_outs * 2)
    # vmap over a whole state: masks batched, patch values shared
    plain = fp.mask_fn_mode(fp.set_all_masks(state, 0.0))
    stacked = dataclasses.replace(plain, masks={k: torch.stack([v, v + 1]) for k, v in plain.masks.items()})
    in_dims = dataclasses.replace(plain, masks={k: 0 for k in plain.masks}, patch_src_outs=None)
    out = vmap(lambda s: fp.patched_forward(pm, s, clean), in_dims=(in_dims,))(stacked)
    torch.testing.assert_close(out[0], pm.model(clean), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], fp.patched_forward(pm, fp.set_all_masks(plain, 1.0), clean))


def test_pure_functions_do_not_change_their_inputs():
    pm = fp.patchable(fp.MicroModel(2))
    s0 = fp.init_state(pm)
    before = {k: v.clone() for k, v in s0.masks.items()}
    s1 = fp.set_all_masks(s0, 1.0)
    s2 = fp.patch_mode(pm, s1, fp.src_ablations(pm, torch.ones(1, 1, 2)), edges=["B0.0->B1.1"])
    assert all(torch.equal(before[k], s0.masks[k]) for k in before)
    assert all(bool((v == 1).all()) for v in s1.masks.values())
    assert sum(int(v.sum()) for v in s2.masks.values()) == 1 and s1.patch_src_outs is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        s0.mask_fn = "sigmoid"


def test_hard_concrete_noise_is_explicit_and_per_example():
    pm = fp.patchable(fp.MicroModel(2))
    x = torch.randn(4, 1, 2)
    state = fp.patch_mode(pm, fp.init_state(pm, 0.5), fp.src_ablations(pm, torch.randn(4, 1, 2)))
    with pytest.raises(ValueError, match="noise"):
        fp.mask_fn_mode(state, "hard_concrete")
    noise = lambda seed: fp.sample_mask_noise(state, batch_size=4, generator=torch.Generator().manual_seed(seed))
    a = fp.patched_forward(pm, fp.mask_fn_mode(state, "hard_concrete", noise=noise(0)), x)
    b = fp.patched_forward(pm, fp.mask_fn_mode(state, "hard_concrete", noise=noise(0)), x)
    c = fp.patched_forward(pm, fp.mask_fn_mode(state, "hard_concrete", noise=noise(1)), x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # example i uses noise[i]: recompute example 2 alone with its own noise slice
    n = noise(0)
    single_noise = fp.MaskNoise(concrete={k: v[2:3] for k, v in n.concrete.items()})
    single = dataclasses.replace(state, patch_src_outs=state.patch_src_outs[:, 2:3])
    one = fp.patched_forward(pm, fp.mask_fn_mode(single, "hard_concrete", noise=single_noise), x[2:3])
    torch.testing.assert_close(one[0], a[2])
    s = fp.effective_mask(fp.mask_fn_mode(state, "sigmoid"), "output")
    torch.testing.assert_close(s, torch.sigmoid(state.masks["output"]))
    with pytest.raises(ValueError, match="unknown mask_fn"):
        fp.mask_fn_mode(state, "relu")
    drop = fp.sample_mask_noise(state, mask_fn=None, dropout=True, generator=torch.Generator().manual_seed(0))
    dm = fp.effective_mask(fp.mask_fn_mode(state, dropout_p=0.5, noise=drop), "output")
    assert set(dm.unique().tolist()) <= {0.0, 1.0}  # 0.5 / (1 - 0.5) where kept


def _hooks(model):
    """funcpatch's hooks left on the model (a bridge wires hooks of its own on first use)."""
    from funcpatch.runtime import _node_hook
    return sum(h is _node_hook for m in model.modules()
               for h in list(m._forward_hooks.values()) + list(m._forward_pre_hooks.values()))


def _flags(model):
    return {k: v for k, v in vars(model.cfg).items() if k.startswith("use_")}


def test_model_unchanged_after_success_and_failure(any_lm):
    # Compared with a freshly built twin, not with a snapshot: the model is cached across
    # tests, and a snapshot taken after an earlier test left it changed would miss that.
    fresh = TRANSFORMERS["gpt2-bridge" if has_bridge() else "hooked"][1]()
    pm, clean, state = setup(any_lm)
    fp.patched_forward(pm, state, clean)
    bad = dataclasses.replace(state, patch_src_outs=state.patch_src_outs[..., :5, :])  # wrong seq length
    with pytest.raises(ValueError, match="patch_src_outs"):
        fp.patched_forward(pm, bad, clean)
    hooked = fp.patchable(any_lm, slice_output="last_seq", lean=False)
    batch7 = dataclasses.replace(state, masks={k: v.expand(7, *v.shape) for k, v in state.masks.items()})
    with pytest.raises(RuntimeError):
        fp.patched_forward(hooked, batch7, clean)  # fails mid-call, with the per-head hooks switched on
    assert _hooks(any_lm) == 0
    assert _flags(any_lm) == _flags(fresh) and not any(_flags(fresh)[f] for f in hooked.hook_flags)
    before, after = fresh.state_dict(), any_lm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_threads_get_their_own_circuits(any_lm):
    pm, clean, state = setup(any_lm)
    edges = list(pm.graph.edges)
    circuits = [edges[i::7] for i in range(7)] + [[]]
    states = [fp.patch_mode(pm, state, state.patch_src_outs, edges=c) for c in circuits]
    with torch.no_grad():
        expected = [fp.patched_forward(pm, s, clean) for s in states]
    results, errors = [None] * len(states), []
    barrier = threading.Barrier(len(states))

    def work(i):
        try:
            barrier.wait()
            with torch.no_grad():
                for _ in range(3):
                    results[i] = fp.patched_forward(pm, states[i], clean)
                    torch.testing.assert_close(results[i], expected[i], atol=1e-6, rtol=1e-6)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(states))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors[0]
    assert len({round(float(r.sum()), 3) for r in results}) > 1
    assert _hooks(any_lm) == 0


def test_bad_input_errors(any_lm):
    pm, clean, state = setup(any_lm)
    with pytest.raises(ValueError, match="n_srcs"):
        fp.patch_mode(pm, state, state.patch_src_outs[1:])
    with pytest.raises(TypeError, match="tensor"):
        fp.patch_mode(pm, state, [1, 2])
    with pytest.raises(ValueError, match="patch_mode"):
        fp.patched_forward(pm, fp.init_state(pm), clean)
    with pytest.raises(ValueError, match="missing"):
        fp.patched_forward(pm, dataclasses.replace(state, masks={}), clean)
    key = next(iter(state.masks))
    wrong = dict(state.masks, **{key: state.masks[key][:1]})
    with pytest.raises(ValueError, match="needs"):
        fp.patched_forward(pm, dataclasses.replace(state, masks=wrong), clean)
    with pytest.raises(ValueError, match="same length"):
        fp.PromptDataset([torch.arange(4)], [torch.arange(5)], [1], [2])
    with pytest.raises(ValueError, match="must match"):
        fp.PromptDataset([torch.arange(4)], [], [1], [2])
    assert _hooks(any_lm) == 0


def test_model_without_per_head_hooks_is_refused():
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        pytest.skip("no TransformerBridge")
    if not hasattr(TransformerBridge, "boot_native"):
        pytest.skip("no native bridge in this TransformerLens")
    native = TransformerBridge.boot_native(dict(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, n_ctx=8,
                                                d_vocab=20, act_fn="gelu"))
    flags = {k: v for k, v in vars(native.cfg).items() if k.startswith("use_")}
    with pytest.raises(fp.MissingHooksError, match="use_attn_result"):
        fp.patchable(native)
    assert {k: v for k, v in vars(native.cfg).items() if k.startswith("use_")} == flags
    assert _hooks(native) == 0
