"""Tests for funcpatch.intervene: node patches, run purely.

Every expectation is computed independently: with a hand-written forward hook on a
plain module, or with TransformerLens's own ``run_with_hooks`` on its models.
"""

from __future__ import annotations

import os
import threading
import time
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from funcpatch.intervene import TargetError, intervene, targets  # noqa: E402
from funcpatch.patches import (  # noqa: E402
    AddPatch,
    CustomPatch,
    PatchError,
    ProbePatch,
    RecordPatch,
    ReplacePatch,
    ZeroPatch,
)

# ------------------------------------------------------------------------ models


class Pair(nn.Module):
    """Returns a tuple whose second element is a dict."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        return h, {"act": torch.tanh(h), "aux": 2 * h}


class Net(nn.Module):
    """Not a transformer: a tuple-returning submodule and a layer called twice."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.pair = Pair()
        self.shared = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x, scale=1.0):
        a, d = self.pair(self.inp(x))
        h = self.shared(a + d["act"])
        h = self.shared(torch.relu(h)) * scale
        return self.out(h)


class Sleep(nn.Module):
    def forward(self, x):
        time.sleep(0.002)  # lets threads interleave inside one forward
        return x


class SlowNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.sleep = Sleep()
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(self.sleep(torch.relu(self.a(x))))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.randn(5, 3)


def with_hook(model, module, fn, *args, kind="output", **kwargs):
    """Reference: run ``model`` with one hand-written hook replacing a value by ``fn(value)``."""
    if kind == "output":
        handle = module.register_forward_hook(lambda m, a, o: fn(o))
    else:
        handle = module.register_forward_pre_hook(lambda m, a: (fn(a[0]),) + a[1:])
    try:
        return model(*args, **kwargs)
    finally:
        handle.remove()


def _hooks(model):
    return {
        name: (tuple(m._forward_hooks.values()), tuple(m._forward_pre_hooks.values()))
        for name, m in model.named_modules()
    }


def snapshot(model):
    """Weights and registered hooks (TransformerBridge wires hooks of its own on first use)."""
    return {k: v.clone() for k, v in model.state_dict().items()}, _hooks(model)


def assert_pure(model, before, empty=True):
    """Weights unchanged and no hooks left; ``empty``: no module has any hook at all."""
    import importlib
    iv = importlib.import_module("funcpatch.intervene")  # the module: fp.intervene is the function

    state, hooks = before
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], state[k]) for k in after)
    assert _hooks(model) == hooks
    for name, m in model.named_modules():
        if empty:
            assert not m._forward_hooks and not m._forward_pre_hooks, f"hook left on {name!r}"
        for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()):
            assert h not in (iv._output_hook, iv._input_hook), f"funcpatch hook left on {name!r}"
    assert not iv._REGISTERED


# ------------------------------------------------------- each patch kind, plain module


def _ops(v):
    """(patch, reference in-place op on a clone) pairs for one value ``v``."""

    def add(t):
        t = t.clone()
        t[:, 1] += v
        return t

    def rep(t):
        t = t.clone()
        t[1:, [0, 1]] = v
        return t

    def zero(t):
        t = t.clone()
        t[0] = 0
        return t

    return [
        (AddPatch(value=v, slice=(slice(None), 1)), add),
        (ReplacePatch(value=v, slice=[slice(1, None), [0, 1]]), rep),
        (ZeroPatch(slice=0), zero),
        (ZeroPatch(), torch.zeros_like),
        (AddPatch(value=v), lambda t: t + v),
        (ReplacePatch(value=v), lambda t: torch.full_like(t, v)),
        (CustomPatch(custom_op=lambda t: t * 3 - 1), lambda t: t * 3 - 1),
    ]


@pytest.mark.parametrize("i", range(7))
def test_each_modifying_patch_on_plain_module(net, x, i):
    patch, ref = _ops(0.7)[i]
    cases = [  # target, module, how the reference reaches the value
        ("inp.output", net.inp, "output", lambda o: ref(o)),
        ("pair.output.0", net.pair, "output", lambda o: (ref(o[0]), o[1])),
        ("pair.output.1.act", net.pair, "output", lambda o: (o[0], {**o[1], "act": ref(o[1]["act"])})),
        ("out.input", net.out, "input", ref),
        ("input", net, "input", ref),
        ("output", net, "output", ref),
    ]
    for target, module, kind, fn in cases:
        out, records = intervene(net, {target: patch}, x)
        expected = with_hook(net, module, fn, x, kind=kind)
        torch.testing.assert_close(out, expected, msg=target)
        assert not torch.allclose(out, net(x)), target
        assert records == {}


def test_probe_and_record_on_plain_module(net, x):
    seen = []
    expected_out = with_hook(net, net.pair, lambda o: seen.append(o) or None, x)
    out, records = intervene(
        net, {"pair.output.1.act": ProbePatch(), "pair.output.0": RecordPatch(), "pair.output": ProbePatch()}, x
    )
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(records["pair.output.1.act"], seen[0][1]["act"])
    assert len(records["pair.output.0"]) == 1
    torch.testing.assert_close(records["pair.output.0"][0], seen[0][0])
    torch.testing.assert_close(records["pair.output"][1]["aux"], seen[0][1]["aux"])


def test_keyword_and_named_inputs():
    class Two(nn.Module):
        def forward(self, a, b):
            return a * b

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.two = Two()

        def forward(self, x):
            return self.two(x, b=x + 1)

    m, x = Outer(), torch.arange(4.0)
    for target in ("two.input.0", "two.input.a"):
        out, _ = intervene(m, {target: ZeroPatch(slice=1)}, x)
        torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 6.0, 12.0]))
    out, _ = intervene(m, {"two.input.b": AddPatch(value=10.0)}, x)
    torch.testing.assert_close(out, x * (x + 11))
    with pytest.raises(TargetError, match=r"called with 2 arguments.*\['a', 'b'\]"):
        intervene(m, {"two.input": ZeroPatch()}, x)
    with pytest.raises(TargetError, match="'c'"):
        intervene(m, {"two.input.c": ZeroPatch()}, x)


# -------------------------------------------------------- slices (hypothesis vs torch)

_elem = st.one_of(
    st.integers(-4, 3),
    st.builds(slice, st.sampled_from([None, 0, 1, -2]), st.sampled_from([None, 3, 4, -1])),
    st.lists(st.integers(-4, 3), min_size=1, max_size=3),
)


@settings(max_examples=40, deadline=None)
@given(
    sl=st.lists(_elem, min_size=1, max_size=2),
    kind=st.sampled_from(["add", "rep", "zero"]),
    as_list=st.booleans(),
)
def test_slices_match_hand_written_indexing(sl, kind, as_list):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    x = torch.randn(4, 3)
    h = model[0](x)
    index = tuple(torch.tensor(e) if isinstance(e, list) else e for e in sl)
    given = list(sl) if as_list else tuple(sl)
    try:
        region = h[index]
    except IndexError:  # torch refuses this index: so must the patch, naming the target
        with pytest.raises(PatchError, match="'0.output'"):
            intervene(model, {"0.output": ZeroPatch(slice=given)}, x)
        return
    if region.numel() == 0:
        return  # empty python slices are rejected; covered in test_errors
    value = torch.randn(region.shape)
    patch = {"add": AddPatch(value=value, slice=given),
             "rep": ReplacePatch(value=value, slice=given),
             "zero": ZeroPatch(slice=given)}[kind]

    def ref(t):
        t = t.clone()
        if kind == "add":
            t[index] = t[index] + value
        else:
            t[index] = value if kind == "rep" else 0.0
        return t

    out, _ = intervene(model, {"0.output": patch}, x)
    torch.testing.assert_close(out, with_hook(model, model[0], ref, x))


# ------------------------------------------------------------- order and repetition


def test_list_order(net, x):
    patches = [ProbePatch(), ZeroPatch(slice=(slice(None), 0)), RecordPatch()]
    out, records = intervene(net, {"inp.output": patches}, x)
    clean = net.inp(x)
    torch.testing.assert_close(records["inp.output#0"], clean)
    zeroed = clean.clone()
    zeroed[:, 0] = 0
    torch.testing.assert_close(records["inp.output#2"][0], zeroed)
    torch.testing.assert_close(out, with_hook(net, net.inp, lambda o: o * torch.tensor([0.0, 1, 1, 1]), x))
    # add then replace != replace then add
    a, _ = intervene(net, {"inp.output": [AddPatch(value=1.0), ReplacePatch(value=2.0, slice=(0, 0))]}, x)
    b, _ = intervene(net, {"inp.output": [ReplacePatch(value=2.0, slice=(0, 0)), AddPatch(value=1.0)]}, x)

    def add_rep(o):
        o = o + 1
        o[0, 0] = 2
        return o

    torch.testing.assert_close(a, with_hook(net, net.inp, add_rep, x))
    assert not torch.allclose(a, b)


def test_repeated_module_records_every_call(net, x):
    seen = []
    with_hook(net, net.shared, lambda o: seen.append(o.clone()) or None, x)
    out, records = intervene(net, {"shared.output": RecordPatch(), "shared.input": ProbePatch()}, x)
    assert len(records["shared.output"]) == 2
    for got, want in zip(records["shared.output"], seen):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(records["shared.input"], torch.relu(seen[0]))  # the last input
    out, _ = intervene(net, {"shared.output": AddPatch(value=1.0)}, x)
    torch.testing.assert_close(out, with_hook(net, net.shared, lambda o: o + 1, x))


# --------------------------------------------------------------- torch.func transforms


def test_grad_wrt_add_value(net, x):
    v0 = torch.randn(4)

    def loss(v):
        out, _ = intervene(net, {"pair.output.0": AddPatch(value=v)}, x)
        return out.pow(2).sum()

    g = torch.func.grad(loss)(v0)
    v = v0.clone().requires_grad_()
    ref = with_hook(net, net.pair, lambda o: (o[0] + v, o[1]), x).pow(2).sum()
    (g_ref,) = torch.autograd.grad(ref, v)
    torch.testing.assert_close(g, g_ref)


def test_vmap_over_values_and_records(net, x):
    vs = torch.randn(6, 4)

    def run(v):
        out, rec = intervene(net, {"inp.output": [AddPatch(value=v, slice=(slice(1, None),)), ProbePatch()]}, x)
        return out, rec["inp.output"]

    outs, probes = torch.func.vmap(run)(vs)
    for i in range(6):

        def ref(o):
            o = o.clone()
            o[1:] += vs[i]
            return o

        torch.testing.assert_close(outs[i], with_hook(net, net.inp, ref, x))
        torch.testing.assert_close(probes[i], ref(net.inp(x)))


def test_vmap_over_inputs_with_batched_replace(net):
    xs = torch.randn(3, 5, 3)
    vs = torch.randn(3, 5)
    run = lambda xx, v: intervene(net, {"inp.output": ReplacePatch(value=v, slice=(slice(None), 2))}, xx)  # noqa: E731
    outs, _ = torch.func.vmap(run)(xs, vs)
    for i in range(3):

        def ref(o):
            o = o.clone()
            o[:, 2] = vs[i]
            return o

        torch.testing.assert_close(outs[i], with_hook(net, net.inp, ref, xs[i]))


def test_forward_functional_call(net, x):
    params = {k: p.detach() * 0.5 for k, p in net.named_parameters()}
    fwd = lambda xx: torch.func.functional_call(net, params, (xx,))  # noqa: E731
    out, rec = intervene(net, {"pair.output.0": [ZeroPatch(slice=(slice(None), 3)), ProbePatch()]}, x, forward=fwd)

    def ref(o):
        a = o[0].clone()
        a[:, 3] = 0
        return a, o[1]

    handle = net.pair.register_forward_hook(lambda m, a, o: ref(o))
    try:
        expected = fwd(x)
    finally:
        handle.remove()
    torch.testing.assert_close(out, expected)
    assert torch.all(rec["pair.output.0"][:, 3] == 0)


# ------------------------------------------------------------------- purity, threads


def test_purity_after_success_and_failure(net, x):
    before = snapshot(net)
    intervene(net, {"inp.output": AddPatch(value=1.0), "shared.output": RecordPatch()}, x)
    assert_pure(net, before)
    with pytest.raises(PatchError, match="'inp.output'"):
        intervene(net, {"shared.output": ProbePatch(), "inp.output": AddPatch(value=torch.ones(7))}, x)
    assert_pure(net, before)

    def boom(t):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        intervene(net, {"out.input": CustomPatch(custom_op=boom)}, x)
    assert_pure(net, before)


def test_thread_safety():
    torch.manual_seed(0)
    model = SlowNet().eval()
    x = torch.randn(2, 4)
    n = 8
    values = [torch.full((4,), float(i)) for i in range(n)]
    expected = [with_hook(model, model.a, lambda o, v=v: o + v, x) for v in values]
    clean = model(x)
    before = snapshot(model)
    barrier = threading.Barrier(n + 1)
    results, errors = {}, []

    def patched(i):
        try:
            barrier.wait()
            results[i] = [intervene(model, {"a.output": AddPatch(value=values[i])}, x)[0] for _ in range(3)]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def unpatched():
        barrier.wait()
        results["clean"] = [model(x) for _ in range(3)]

    threads = [threading.Thread(target=patched, args=(i,)) for i in range(n)]
    threads.append(threading.Thread(target=unpatched))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(n):
        for out in results[i]:
            torch.testing.assert_close(out, expected[i])
    for out in results["clean"]:
        torch.testing.assert_close(out, clean)
    assert_pure(model, before)


# ---------------------------------------------------------------------------- errors


def test_errors(net, x):
    calls = []

    def fwd(*a):
        calls.append(1)
        return net(*a)

    with pytest.raises(TargetError, match="Did you mean: 'pair.output'"):
        intervene(net, {"pair.outptu": ZeroPatch()}, x, forward=fwd)
    with pytest.raises(TargetError, match="'inp.output'"):
        intervene(net, {"inpp.output": ZeroPatch()}, x, forward=fwd)
    with pytest.raises(TypeError, match="must be a Patch"):
        intervene(net, {"inp.output": "zero"}, x, forward=fwd)
    assert not calls  # all of the above raise before the model runs
    # invalid slices raise when the patch is built
    for bad in [(0.5,), (True,), (slice(None, None, -1),), (torch.tensor([0.5]),), ("a",)]:
        with pytest.raises(PatchError):
            ZeroPatch(slice=bad)
    with pytest.raises(PatchError, match="value must be"):
        AddPatch(value="1")
    # known only once the value is seen: raise naming the target
    cases = [
        ({"inp.output": ZeroPatch(slice=(0, 0, 0))}, PatchError, r"'inp.output' has 3 elements.*2 dims"),
        ({"inp.output": ZeroPatch(slice=(9,))}, PatchError, r"'inp.output': index 9 is out of range on dim 0 of size"),
        ({"inp.output": ZeroPatch(slice=(slice(7, 9),))}, PatchError, r"selects nothing.*size 5"),
        ({"inp.output": ReplacePatch(value=torch.ones(3))}, PatchError, r"shape \[3\].*\[5, 4\].*'inp.output'"),
        ({"inp.output": CustomPatch(custom_op=lambda t: t[0])}, PatchError, r"custom_op returned shape"),
        ({"pair.output": ZeroPatch()}, PatchError, r"'pair.output' needs a tensor.*tuple"),
        ({"pair.output.2": ZeroPatch()}, TargetError, r"tuple of length 2"),
        ({"pair.output.1.nope": ZeroPatch()}, TargetError, r"no key 'nope'.*\['act', 'aux'\]"),
    ]
    before = snapshot(net)
    for spec, err, msg in cases:
        with pytest.raises(err, match=msg):
            intervene(net, spec, x)
        assert_pure(net, before)
    with pytest.raises(TargetError, match="never reached"):
        intervene(net, {"out.output": ZeroPatch()}, x, forward=lambda xx: net.inp(xx))
    # probes of unreached targets are None / empty instead
    _, rec = intervene(net, {"out.output": ProbePatch(), "pair.output": RecordPatch()}, x, forward=net.inp)
    assert rec == {"out.output": None, "pair.output": []}
    assert_pure(net, before)


def test_targets_plain_module(net, x):
    before = snapshot(net)
    t = targets(net, x)
    assert t["input"] == (5, 3) and t["output"] == (5, 2)
    assert t["pair.output"] is None and t["pair.output.0"] == (5, 4) and t["pair.output.1.act"] == (5, 4)
    assert t["shared.input"] == (5, 4) and t["inp.output"] == (5, 4)
    # every listed target is accepted and has the listed shape
    _, rec = intervene(net, {name: ProbePatch() for name in t}, x)
    for name, shape in t.items():
        assert (rec[name].shape if shape is not None else None) == shape, name
    assert_pure(net, before)


# ------------------------------------------------------------------ TransformerLens


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def bridge():
    try:
        from transformer_lens.model_bridge import TransformerBridge  # noqa: F401
    except ImportError:
        pytest.skip("this TransformerLens has no TransformerBridge")
    try:
        from transformer_lens.model_bridge.sources import build_bridge_from_module
    except ImportError:
        pytest.skip("this TransformerLens cannot build a bridge from an in-memory model")
    hf = _tiny_gpt2()
    bridge = build_bridge_from_module(hf, "GPT2LMHeadModel", hf_config=hf.config)
    bridge(torch.zeros(1, 2, dtype=torch.long))  # the bridge wires its own hooks on first use
    return bridge


@pytest.fixture(scope="module")
def hooked():
    tl = pytest.importorskip("transformer_lens")
    try:
        tl.HookedTransformer  # noqa: B018 - TransformerLens 4 raises ImportError here
    except (ImportError, AttributeError):
        pytest.skip("this TransformerLens has no HookedTransformer")
    cfg = tl.HookedTransformerConfig(
        n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, n_ctx=32, d_vocab=100,
        act_fn="gelu_new", tokenizer_name=None, seed=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tl.HookedTransformer(cfg).eval()


@pytest.fixture(scope="module")
def toks():
    torch.manual_seed(2)
    return torch.randint(0, 100, (2, 5))


def _tl_cases():
    """(target, patch, reference hook on the TransformerLens value) for GPT-2 shaped models."""
    steer = torch.linspace(-1, 1, 64)

    def add_pos(t):
        t = t.clone()
        t[:, 1:] += steer
        return t

    def zero_head(t):
        t = t.clone()
        t[:, :, 2] = 0
        return t

    def rep(t):
        t = t.clone()
        t[0, -1, 1, 3] = 5.0
        return t

    return [
        ("blocks.0.hook_resid_pre", AddPatch(value=steer, slice=(slice(None), slice(1, None))), add_pos),
        ("blocks.0.attn.hook_z", ZeroPatch(slice=(slice(None), slice(None), 2)), zero_head),
        ("blocks.1.attn.hook_q", ReplacePatch(value=5.0, slice=[0, -1, 1, 3]), rep),
        ("blocks.1.hook_mlp_out", ZeroPatch(), torch.zeros_like),
        ("blocks.0.attn.hook_pattern", CustomPatch(custom_op=lambda p: p.flip(-1)), lambda p: p.flip(-1)),
    ]


def _check_tl_model(model, toks):
    cases = _tl_cases()
    expected = [model.run_with_hooks(toks, fwd_hooks=[(t, lambda a, hook, f=f: f(a))]) for t, _, f in cases]
    clean = model(toks)
    before = snapshot(model)
    for (target, patch, _), want in zip(cases, expected):
        out, _ = intervene(model, {target: patch}, toks)
        torch.testing.assert_close(out, want, msg=target)
        assert not torch.allclose(out, clean), target
    assert_pure(model, before, empty=False)
    names = ["blocks.0.attn.hook_z", "blocks.1.hook_resid_post"]
    seen = {n: [] for n in names}
    model.run_with_hooks(toks, fwd_hooks=[(n, lambda t, hook, n=n: seen[n].append(t.clone())) for n in names])
    _, rec = intervene(model, {names[0]: ProbePatch(), names[1]: RecordPatch()}, toks)
    assert rec[names[0]].shape == (2, 5, 4, 16)
    torch.testing.assert_close(rec[names[0]], seen[names[0]][-1])
    assert len(rec[names[1]]) == len(seen[names[1]]) == 1
    torch.testing.assert_close(rec[names[1]][0], seen[names[1]][0])
    with pytest.raises(TargetError, match="blocks.0.hook_resid_pre"):
        intervene(model, {"blocks.0.hook_resid_pr": ZeroPatch()}, toks)
    with pytest.raises(PatchError, match=r"'blocks.0.attn.hook_z'"):
        intervene(model, {"blocks.0.attn.hook_z": AddPatch(value=torch.ones(64))}, toks)
    assert_pure(model, before, empty=False)


def test_bridge_patch_kinds(bridge, toks):
    _check_tl_model(bridge, toks)


def test_hooked_transformer_patch_kinds(hooked, toks):
    _check_tl_model(hooked, toks)


def test_bridge_grad_and_vmap_steering(bridge, toks):
    target = "blocks.1.hook_resid_pre"

    def logit(v):
        out, _ = intervene(bridge, {target: AddPatch(value=v, slice=(slice(None), -1))}, toks)
        return out[:, -1, 7].sum()

    v0 = torch.zeros(64)
    g = torch.func.grad(logit)(v0)
    v = v0.clone().requires_grad_()

    def ref(t, hook):
        t = t.clone()
        t[:, -1] += v
        return t

    (g_ref,) = torch.autograd.grad(bridge.run_with_hooks(toks, fwd_hooks=[(target, ref)])[:, -1, 7].sum(), v)
    torch.testing.assert_close(g, g_ref)
    vs = torch.randn(3, 64)
    batched = torch.func.vmap(logit)(vs)
    for i in range(3):
        v = vs[i]
        want = bridge.run_with_hooks(toks, fwd_hooks=[(target, ref)])[:, -1, 7].sum()
        torch.testing.assert_close(batched[i], want)


def test_bridge_targets(bridge, toks):
    before = snapshot(bridge)
    t = targets(bridge, toks)
    assert t["blocks.0.attn.hook_z"] == (2, 5, 4, 16)
    assert t["blocks.0.hook_resid_pre"] == (2, 5, 64)
    assert t["blocks.0.attn.output"] is None and t["blocks.0.attn.output.1"] == (2, 4, 5, 5)
    _, rec = intervene(bridge, {name: ProbePatch() for name in t}, toks)
    for name, shape in t.items():
        assert (rec[name].shape if shape is not None else None) == shape, name
    # module targets on the bridge: the attention weights inside a tuple output
    out, _ = intervene(bridge, {"blocks.0.attn.output.0": ZeroPatch()}, toks)
    zero_attn = [("blocks.0.hook_attn_out", lambda a, hook: torch.zeros_like(a))]
    torch.testing.assert_close(out, bridge.run_with_hooks(toks, fwd_hooks=zero_attn))
    assert_pure(bridge, before, empty=False)
