"""funcpatch's own forward (funcpatch.decoder) on GPT-2 equals the bridge's hook path:
outputs, recorded sources, gradients w.r.t. masks and weights, under vmap, for every
graph kind, padding, batched masks and every ablation type."""

import dataclasses
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import grad, vmap

import funcpatch as fp
from conftest import has_bridge, tokens
from funcpatch.hook_forward import HookForward
from funcpatch.own_forward import OwnForward

pytestmark = pytest.mark.skipif(not has_bridge(), reason="no TransformerBridge in this TransformerLens")

GRAPHS = {"split": {}, "unsplit": {"separate_qkv": False}, "residual": {"factorized": False}, "tokens": {"seq_len": 6}}
_models = {}


def gpt2(variant="plain"):
    """Tiny GPT-2 bridges; "odd" has ReLU MLPs and inverse-layer attention scaling."""
    if variant not in _models:
        from transformers import GPT2Config, GPT2LMHeadModel
        torch.manual_seed(3)
        extra = {"activation_function": "relu", "scale_attn_by_inverse_layer_idx": True} if variant == "odd" else {}
        hf = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=24, n_head=3, vocab_size=50, n_positions=16, **extra))
        _models[variant] = fp.models.from_hf(hf.eval())
    return _models[variant]


def pair(graph="split", variant="plain", **kw):
    model = gpt2(variant)
    lean = fp.patchable(model, **GRAPHS[graph], **kw)
    hooks = fp.patchable(model, lean=False, **GRAPHS[graph], **kw)
    assert isinstance(lean.forward, OwnForward) and isinstance(hooks.forward, HookForward)
    return lean, hooks


def random_state(pm, corrupt, seed, batch=None, **ablation):
    state = fp.patch_mode(pm, fp.init_state(pm), fp.src_ablations(pm, corrupt, **ablation))
    g = torch.Generator().manual_seed(seed)
    lead = () if batch is None else (batch,)
    return dataclasses.replace(state, masks={k: torch.rand(lead + v.shape, generator=g)
                                             for k, v in state.masks.items()})


def padding(batch=3, seq=6, seed=0):
    """Left padding in row 0, right padding in row 1, none elsewhere."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :2] = 0
    mask[1, -1] = 0
    return mask


def test_own_forward_is_chosen_for_bridges_of_covered_families(transformer):
    pm = fp.patchable(transformer)
    is_bridge = getattr(transformer, "original_model", None) is not None
    assert isinstance(pm.forward, OwnForward) == is_bridge
    assert isinstance(fp.patchable(transformer, lean=False).forward, HookForward)


@settings(max_examples=25, deadline=None)
@given(graph=st.sampled_from(sorted(GRAPHS)), variant=st.sampled_from(["plain", "odd"]), seed=st.integers(0, 10_000),
       batched_masks=st.booleans(), padded=st.booleans(), keep=st.sampled_from([0, 1, 3]), no_grad=st.booleans(),
       zero_heads=st.booleans())
def test_patched_forward_equals_hook_path(graph, variant, seed, batched_masks, padded, keep, no_grad, zero_heads):
    """Also under no_grad, where differences go to one buffer written in place and head
    slots whose masks are all 0 read the residual unpatched."""
    lean, hooks = pair(graph, variant)
    clean, corrupt = tokens(seed), tokens(seed + 1)
    kwargs = {"attention_mask": padding()} if padded else {}
    state = random_state(hooks, corrupt, seed, batch=3 if batched_masks else None)
    if zero_heads:  # every V input and head 0's Q input unpatched
        masks = {k: v.clone() for k, v in state.masks.items()}
        for k, v in masks.items():
            if k.endswith("hook_v_input") or k.endswith("hook_attn_in"):
                v.zero_()
            if k.endswith("hook_q_input"):
                v[..., 0, :] = 0
        state = dataclasses.replace(state, masks=masks)
    out_l, srcs_l = fp.record_src_outs(lean, corrupt, **kwargs)
    out_h, srcs_h = fp.record_src_outs(hooks, corrupt, **kwargs)
    torch.testing.assert_close(out_l, out_h, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(srcs_l, srcs_h, atol=2e-6, rtol=1e-5)
    if keep:
        kwargs["logits_to_keep"] = keep
    with torch.set_grad_enabled(not no_grad):
        a = fp.patched_forward(lean, state, clean, **kwargs)
    b = fp.patched_forward(hooks, state, clean, **kwargs)
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)


@settings(max_examples=15, deadline=None)
@given(graph=st.sampled_from(["split", "unsplit", "residual"]), seed=st.integers(0, 10_000),
       pattern=st.sampled_from([(0, 1), (0, 0), (0, 1, 2), (0, 0, 1), (0, 1, 1, 0)]), no_grad=st.booleans())
def test_circuits_stacked_along_the_batch_equal_one_forward_each(graph, seed, pattern, no_grad):
    """Several circuits side by side along the batch (each one's masks on every row of its
    copy of the prompts, as ACDC and run_circuits stack them) give each circuit's own
    forward; ``pattern`` names the circuit of each copy (equal neighbours share rows)."""
    lean, _ = pair(graph)
    clean, corrupt = tokens(seed), tokens(seed + 1)
    circuits = [random_state(lean, corrupt, seed + c) for c in range(max(pattern) + 1)]
    rows = clean.shape[0]
    masks = {k: torch.stack([circuits[c].masks[k] for c in pattern]).repeat_interleave(rows, 0)
             for k in circuits[0].masks}
    state = dataclasses.replace(circuits[0], masks=masks,
                                patch_src_outs=circuits[0].patch_src_outs.repeat(1, len(pattern), 1, 1))
    with torch.set_grad_enabled(not no_grad):
        stacked = fp.patched_forward(lean, state, clean.repeat(len(pattern), 1))
    for i, c in enumerate(pattern):
        torch.testing.assert_close(stacked[i * rows:(i + 1) * rows], fp.patched_forward(lean, circuits[c], clean),
                                   atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("ablation", list(fp.AblationType))
def test_every_ablation_type_equals_hook_path(ablation):
    lean, hooks = pair("split")
    clean, corrupt = tokens(5), tokens(6)
    loader = fp.PromptDataLoader(fp.PromptDataset(clean, corrupt, clean[:, -1:], corrupt[:, -1:]), seq_len=None,
                                 batch_size=3)
    sample = loader if ablation.mean_over_dataset else corrupt
    patch = fp.src_ablations(hooks, sample, ablation)
    torch.testing.assert_close(fp.src_ablations(lean, sample, ablation), patch, atol=2e-6, rtol=1e-5)
    state = fp.patch_mode(hooks, fp.init_state(hooks), patch)
    state = fp.set_all_masks(state, 0.7)
    torch.testing.assert_close(fp.patched_forward(lean, state, clean), fp.patched_forward(hooks, state, clean),
                               atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("graph", sorted(GRAPHS))
def test_mask_gradients_equal_hook_path(graph):
    lean, hooks = pair(graph, slice_output="last_seq")
    clean, corrupt = tokens(7), tokens(8)
    state = random_state(hooks, corrupt, 7)

    def loss(pm):
        return lambda masks: fp.patched_forward(pm, dataclasses.replace(state, masks=masks), clean)[
            pm.out_slice].logsumexp(-1).sum()

    gl, gh = grad(loss(lean))(state.masks), grad(loss(hooks))(state.masks)
    for k in gh:
        torch.testing.assert_close(gl[k], gh[k], atol=1e-5, rtol=1e-4)
    # plain autograd (not torch.func) and the in-place no-grad path agree as well
    masks = {k: v.clone().requires_grad_() for k, v in state.masks.items()}
    loss(lean)(masks).backward()
    for k in gh:
        torch.testing.assert_close(masks[k].grad, gh[k], atol=1e-5, rtol=1e-4)


def test_weight_gradients_through_params_equal_hook_path():
    lean, hooks = pair("split", slice_output="last_seq")
    clean, corrupt = tokens(9), tokens(10)
    state = random_state(hooks, corrupt, 9)
    params = {k: v.detach() for k, v in gpt2().named_parameters()}

    def loss(pm):
        return lambda p: fp.patched_forward(pm, state, clean, params=p)[pm.out_slice].pow(2).sum()

    gl, gh = grad(loss(lean))(params), grad(loss(hooks))(params)
    assert sum(int(g.abs().sum() > 0) for g in gh.values()) > 10
    for k in gh:
        torch.testing.assert_close(gl[k], gh[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")


def test_params_override_any_alias_of_a_weight():
    """A weight reachable under several names (wrappers, tied embeddings) is replaced
    whichever name ``params`` uses: the same output as changing the weight in place."""
    lean, _ = pair("split")
    clean, corrupt = tokens(11), tokens(12)
    state = random_state(lean, corrupt, 11)
    named = dict(gpt2().named_parameters(remove_duplicate=False))
    picked = [n for n in named if any(k in n for k in ("wte", "lm_head", "h.1.ln2", "h.1._original_component.ln_2",
                                                      "h.2.attn.q.", "h.0.attn.o.", "mlp.in.", "ln_f"))]
    assert len(picked) >= 10
    for name in picked:
        weight = named[name]
        bump = 0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0))
        via_params = fp.patched_forward(lean, state, clean, params={name: weight.detach() + bump})
        with torch.no_grad():
            weight.add_(bump)
        try:
            in_place = fp.patched_forward(lean, state, clean)
        finally:
            with torch.no_grad():
                weight.sub_(bump)
        assert not torch.allclose(in_place, fp.patched_forward(lean, state, clean)), name
        torch.testing.assert_close(via_params, in_place, atol=2e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_vmap_over_masks_equals_a_loop():
    lean, _ = pair("split", slice_output="last_seq")
    clean, corrupt = tokens(13), tokens(14)
    state = random_state(lean, corrupt, 13)
    stacked = {k: torch.stack([v, v * 0.5, 1 - v]) for k, v in state.masks.items()}

    def f(masks):
        return fp.patched_forward(lean, dataclasses.replace(state, masks=masks), clean)[lean.out_slice]

    out = vmap(f)(stacked)
    for i in range(3):
        torch.testing.assert_close(out[i], f({k: v[i] for k, v in stacked.items()}), atol=1e-6, rtol=1e-5)


def test_unsupported_calls_take_the_hook_path():
    lean, hooks = pair("split")
    clean = tokens(15)
    state = fp.set_all_masks(random_state(hooks, tokens(16), 15), 0.0)
    # return_type="loss" is not something funcpatch's forward computes: the bridge runs it
    loss_l = fp.patched_forward(lean, state, clean, return_type="loss")
    torch.testing.assert_close(loss_l, gpt2()(clean, return_type="loss"))


def test_threads_run_concurrently_and_each_gets_its_own_answer():
    lean, hooks = pair("split", slice_output="last_seq")
    clean, corrupt = tokens(17), tokens(18)
    base = random_state(hooks, corrupt, 17)
    states = [fp.set_all_masks(base, v) for v in torch.linspace(0, 1, 8).tolist()]
    expected = [fp.patched_forward(hooks, s, clean) for s in states]
    got = [None] * len(states)

    def work(i):  # half the threads without autograd: they reuse per-thread scratch tensors
        with torch.set_grad_enabled(i % 2 == 0):
            for _ in range(5):
                got[i] = fp.patched_forward(lean, states[i], clean)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(states))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=2e-6, rtol=1e-5)


def test_wrong_patch_shape_is_a_clear_error_on_the_lean_path():
    lean, _ = pair("split")
    state = random_state(lean, tokens(19, seq=5), 19)
    with pytest.raises(ValueError, match="compute the patch values on inputs of the same shape"):
        fp.patched_forward(lean, state, tokens(20))


@pytest.mark.parametrize("graph", sorted(GRAPHS))
def test_outputs_do_not_share_memory_with_later_calls(graph):
    """Forwards without autograd reuse scratch tensors: what one call returned must not
    change when the next call runs."""
    lean, hooks = pair(graph)
    clean, corrupt = tokens(21), tokens(22)
    first, second = random_state(lean, corrupt, 21), random_state(lean, corrupt, 22)
    with torch.no_grad():
        a = fp.patched_forward(lean, first, clean)
        kept = a.clone()
        fp.patched_forward(lean, second, clean)
        fp.patched_forward(lean, second, tokens(23))
    assert torch.equal(a, kept)
    torch.testing.assert_close(a, fp.patched_forward(hooks, first, clean), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("point", [(0, 0), (1, 0), (1, 1), (2, 1), (3, 0)])
@pytest.mark.parametrize("keep", [0, 1])
def test_resumed_forward_equals_the_whole_forward(point, keep):
    """Starting at a checkpoint from a clean prefix is exact when nothing before it is
    patched, also for several circuits over repeats of one batch (as ACDC runs them)."""
    lean, _ = pair("split", slice_output="last_seq")
    clean, corrupt = tokens(24), tokens(25)
    kw = {"logits_to_keep": keep} if keep else {}
    _, src_outs, checkpoints = lean.forward.checkpoints(lean, (clean,), kw)
    assert sorted(checkpoints) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0)]
    resid, n_before = checkpoints[point]
    state = random_state(lean, corrupt, 24, batch=6)  # 2 circuits x 3 prompts

    def after(name):  # is this destination at or after the checkpoint?
        block, stage = int(name.split(".")[1]), int(name.endswith("hook_mlp_in"))
        return (block + 1, 0) >= point if name.endswith("hook_resid_post") else (block, stage) >= point

    masks = {k: v if after(k) else torch.zeros_like(v) for k, v in state.masks.items()}
    tiled = dataclasses.replace(state, masks=masks, patch_src_outs=state.patch_src_outs.repeat(1, 2, 1, 1))
    untiled = dataclasses.replace(state, masks=masks)
    whole = fp.patched_forward(lean, tiled, clean.repeat(2, 1), **kw)
    for grad_enabled in (True, False):
        with torch.set_grad_enabled(grad_enabled):
            got = lean.forward.resumed(lean, untiled, point, resid.repeat(2, 1, 1), src_outs[:n_before],
                                       (clean.repeat(2, 1),), kw, repeats=2)
        torch.testing.assert_close(got, whole, atol=2e-6, rtol=1e-5)


def test_scratch_is_per_thread_and_can_be_released():
    from funcpatch import scratch
    like = torch.zeros(1)

    def memory(t):
        return t.untyped_storage().data_ptr()

    a = scratch.scratch("t", (2, 3), like)
    assert a.shape == (2, 3) and a.is_contiguous()
    assert memory(scratch.scratch("t", (2, 3), like)) == memory(a)  # reused by the next request
    small = scratch.scratch("t", (4,), like)
    assert small.shape == (4,) and small.data_ptr() == a.data_ptr()  # a smaller one: the front of it
    big = scratch.scratch("t", (7,), like)
    assert memory(big) != memory(a)  # a larger one: new memory, kept from then on
    assert memory(scratch.scratch("t", (6,), like)) == memory(big)
    other = []
    t = threading.Thread(target=lambda: other.append(scratch.scratch("t", (7,), like)))
    t.start()
    t.join()
    assert memory(other[0]) != memory(scratch.scratch("t", (7,), like))  # another thread's own
    assert memory(scratch.scratch("t", (7,), torch.zeros(1, dtype=torch.float64))) != memory(big)  # per dtype
    b = scratch.scratch("t", (7,), like)
    scratch.release()
    assert memory(scratch.scratch("t", (7,), like)) != memory(b)


@settings(max_examples=16, deadline=None)
@given(graph=st.sampled_from(sorted(GRAPHS)), variant=st.sampled_from(["plain", "odd"]), seed=st.integers(0, 10_000),
       padded=st.booleans(), last=st.booleans())
def test_zero_mask_gradients_equal_torch_func_grad(graph, variant, seed, padded, last):
    """EAP's fast path (funcpatch.zero_grads: one plain forward/backward) equals
    torch.func.grad of the patched forward at masks = 0, on the hook path."""
    lean, hooks = pair(graph, variant, slice_output="last_seq" if last else None)
    clean, corrupt = tokens(seed), tokens(seed + 1)
    kwargs = {"attention_mask": padding()} if padded else {}
    state = fp.set_all_masks(random_state(hooks, corrupt, seed), 0.0)
    kw = dict(kwargs, **({"logits_to_keep": 1} if last else {}))

    def loss(out):
        return out[lean.out_slice][..., :7].logsumexp(-1).sum()

    fast = lean.forward.zero_mask_grads(lean, state, clean, kw, loss)
    assert fast is not None
    reference = grad(lambda m: loss(fp.patched_forward(hooks, dataclasses.replace(state, masks=m), clean,
                                                       **kwargs)))(state.masks)
    assert set(fast) == set(reference)
    for k in reference:
        assert fast[k].shape == reference[k].shape, k
        torch.testing.assert_close(fast[k], reference[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")


def test_zero_mask_gradients_decline_what_they_do_not_compute():
    lean, hooks = pair("split")
    state = fp.set_all_masks(random_state(lean, tokens(1), 1), 0.0)
    loss = lambda out: out.sum()  # noqa: E731
    assert hooks.forward.zero_mask_grads(hooks, state, tokens(2), {}, loss) is None  # the hook path has none
    assert lean.forward.zero_mask_grads(lean, fp.set_all_masks(state, 0.5), tokens(2), {}, loss) is None  # masks not 0
    assert lean.forward.zero_mask_grads(lean, state, tokens(2), {"return_type": "loss"}, loss) is None  # a call it cannot run


def test_layer_norm_epsilon_comes_from_the_config():
    # Every other test model has the default epsilon 1e-5, so a hard-coded 1e-5 would pass
    # them all; with 0.1 it is ~0.4 off in the logits.
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(5)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=24, n_head=3, vocab_size=50, n_positions=16,
                                    layer_norm_epsilon=0.1)).eval()
    x = tokens(7)
    with torch.no_grad():
        expected = hf(x).logits  # before wrapping: the bridge replaces the model's submodules
    pm = fp.patchable(fp.models.from_hf(hf))
    assert isinstance(pm.forward, OwnForward)
    state = fp.patch_mode(pm, fp.init_state(pm), fp.src_ablations(pm, x, fp.AblationType.ZERO))
    with torch.no_grad():
        torch.testing.assert_close(fp.patched_forward(pm, state, x), expected, atol=1e-5, rtol=1e-5)
