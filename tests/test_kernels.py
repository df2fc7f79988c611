"""The compiled CPU kernels of funcpatch's own no-grad forward (funcpatch.kernels): their
values against plain torch, their use in the forward, the off switch, and the build
(cached, atomic, and a failure that falls back to the plain path)."""

import os
import subprocess

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import funcpatch as fp
from funcpatch import kernels
from conftest import has_hooked

needs_library = pytest.mark.skipif(not kernels.status().startswith("loaded"), reason=f"kernels: {kernels.status()}")


def reference(rows, mix, weight, eps):
    """The slots' inputs formed whole, RMS-normed and projected, in float64."""
    n_slots, d, d_head = weight.shape
    x = (mix.double() @ rows.double()).view(n_slots, -1, d)
    return (x @ weight.double()) * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@needs_library
@settings(max_examples=40, deadline=None)
@given(n_rows=st.integers(1, 9), n_slots=st.integers(1, 7), d=st.sampled_from([4, 8, 24, 40]),
       d_head=st.sampled_from([1, 4, 8]), tokens=st.integers(1, 150), pad=st.integers(0, 3),
       eps=st.sampled_from([1e-6, 1e-2]), seed=st.integers(0, 2 ** 16))
def test_slot_projection_equals_inputs_formed_whole(n_rows, n_slots, d, d_head, tokens, pad, eps, seed):
    """Any sizes, tokens not a multiple of the tile, rows strided (views into a wider buffer)."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(n_rows, (tokens + pad) * d, generator=g)
    rows = wide[:, :tokens * d]
    mix, weight = torch.randn(n_slots, n_rows, generator=g), torch.randn(n_slots, d, d_head, generator=g)
    out = torch.full((n_slots, tokens, d_head), float("nan"))
    assert kernels.slot_projection(rows, mix, weight, eps, out)
    want = reference(rows, mix, weight, eps)
    assert torch.allclose(out.double(), want, rtol=1e-4, atol=1e-5), (out.double() - want).abs().max()


@needs_library
def test_the_kernels_give_the_same_bits_with_any_number_of_threads():
    g = torch.Generator().manual_seed(1)
    rows, mix, weight = torch.randn(5, 300 * 32, generator=g), torch.randn(6, 5, generator=g), torch.randn(6, 32, 8, generator=g)
    # (d_model 256: tiles of 256 rows, so 700 rows make three)
    patch, z, w = torch.randn(3, 700, 256, generator=g), torch.randn(3, 700, 8, generator=g), torch.randn(256, 24, generator=g)
    outs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out, diff = torch.empty(6, 300, 8), torch.empty(3, 700, 256)
            assert kernels.slot_projection(rows, mix, weight, 1e-5, out)
            summed = kernels.head_outputs(patch, z, w.t().view(3, 8, 256), diff)
            outs.append((out, diff, summed))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for other in outs[1:] for a, b in zip(outs[0], other))


@needs_library
@settings(max_examples=40, deadline=None)
@given(heads=st.integers(1, 6), rows=st.integers(1, 300), d_head=st.sampled_from([1, 4, 8]), d=st.sampled_from([4, 24, 40]),
       transposed=st.booleans(), threads=st.integers(1, 3), seed=st.integers(0, 2 ** 16))
def test_head_outputs_equal_the_products_formed_whole(heads, rows, d_head, d, transposed, threads, seed):
    """W_O as the model holds it (a transposed view) or contiguous; rows not a multiple of the tile."""
    g = torch.Generator().manual_seed(seed)
    patch, z = torch.randn(heads, rows, d, generator=g), torch.randn(heads, rows, d_head, generator=g)
    w = (torch.randn(d, heads * d_head, generator=g).t().view(heads, d_head, d) if transposed
         else torch.randn(heads, d_head, d, generator=g))
    diff = torch.full_like(patch, float("nan"))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        summed = kernels.head_outputs(patch, z, w, diff)
    finally:
        torch.set_num_threads(before)
    products = torch.bmm(z.double(), w.double())
    assert torch.allclose(diff.double(), patch.double() - products, rtol=1e-4, atol=1e-5)
    assert torch.allclose(summed.double(), products.sum(0), rtol=1e-4, atol=1e-5)


@needs_library
def test_slot_projection_takes_one_row_whatever_its_stride():
    """A single row's stride is arbitrary (torch may give 1): BLAS is given a valid one."""
    g = torch.Generator().manual_seed(2)
    row = torch.randn(5 * 8, generator=g).as_strided((1, 5 * 8), (1, 1))
    mix, weight, out = torch.randn(3, 1, generator=g), torch.randn(3, 8, 4, generator=g), torch.empty(3, 5, 4)
    assert kernels.slot_projection(row, mix, weight, 1e-6, out)
    assert torch.allclose(out.double(), reference(row, mix, weight, 1e-6), rtol=1e-4, atol=1e-5)


def test_head_outputs_refuse_misshapen_inputs():
    patch, z, w, diff = torch.randn(2, 5, 8), torch.randn(2, 5, 4), torch.randn(2, 4, 8), torch.empty(2, 5, 8)
    with pytest.raises(ValueError, match="float32 CPU"):
        kernels.head_outputs(patch, z.double(), w, diff)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.head_outputs(patch, z[:, :4], w, diff)
    with pytest.raises(ValueError, match="unit stride"):
        kernels.head_outputs(patch, z, torch.randn(2, 8, 4, 2)[..., 0].transpose(1, 2), diff)


def test_slot_projection_refuses_misshapen_or_other_dtypes():
    rows, mix, weight, out = torch.randn(3, 5 * 8), torch.randn(2, 3), torch.randn(2, 8, 4), torch.empty(2, 5, 4)
    with pytest.raises(ValueError, match="float32 CPU"):
        kernels.slot_projection(rows.double(), mix, weight, 1e-6, out)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.slot_projection(rows, mix[:, :2], weight, 1e-6, out)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.slot_projection(rows, mix, weight.transpose(1, 2).contiguous().transpose(1, 2), 1e-6, out)
    with pytest.raises(ValueError, match="rows not overlapping"):
        kernels.slot_projection(rows.flatten()[:5 * 8 + 2].as_strided((3, 5 * 8), (1, 1)), mix, weight, 1e-6, out)


def test_too_large_a_layer_is_left_to_the_plain_path():
    """Slot weights read for every tile must stay in cache: a layer past that is refused
    before the kernel runs (False, nothing written)."""
    assert kernels.fits(24, 256, 32)
    assert not kernels.fits(96, 4096, 128)  # Llama-3.1-8B's per-query-head slots
    out = torch.full((96, 2, 128), 7.0)
    assert not kernels.slot_projection(torch.zeros(3, 2 * 4096), torch.zeros(96, 3), torch.zeros(96, 4096, 128), 1e-6, out)
    assert bool((out == 7.0).all())


def test_off_switch_skips_the_library(monkeypatch):
    monkeypatch.setenv("FUNCPATCH_KERNELS", "0")
    monkeypatch.setattr(kernels, "_load", lambda: pytest.fail("the library was asked for"))
    assert kernels.status() == "off: FUNCPATCH_KERNELS=0" and not kernels.available()
    out = torch.full((2, 5, 4), 7.0)
    assert not kernels.slot_projection(torch.randn(3, 5 * 8), torch.randn(2, 3), torch.randn(2, 8, 4), 1e-6, out)
    assert kernels.head_outputs(torch.randn(2, 5, 8), torch.randn(2, 5, 4), torch.randn(2, 4, 8), out.view(2, 5, 4)
                                .new_full((2, 5, 8), 7.0)) is None
    assert bool((out == 7.0).all())


def test_switch_values_other_than_0_or_1_are_refused(monkeypatch):
    monkeypatch.setenv("FUNCPATCH_KERNELS", "off")
    with pytest.raises(ValueError, match="FUNCPATCH_KERNELS must be 0 .off. or 1 .on, the default., got 'off'"):
        kernels.enabled()


arch_only = pytest.mark.skipif(has_hooked(), reason="architecture matrix: TransformerLens 4 environment only")


@arch_only
@needs_library
@pytest.mark.parametrize("name", ["llama3-gqa", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("grouped", [False, True])
def test_patched_forward_with_the_kernel_equals_it_without(name, grouped, monkeypatch):
    """Biases (Llama-3, Qwen2), q/k norms (Qwen3), windows (Mistral), both graph forms:
    the kernels serve every layer's Q/K/V slots and heads' outputs, and the logits stay
    those of the plain path."""
    from test_architectures import _random_masks, model, rel, toks
    hf = model(name)
    pm = fp.patchable(hf, grouped_kv=grouped)
    state = _random_masks(fp.patch_mode(pm, fp.init_state(pm), fp.src_ablations(pm, toks(9))),
                          torch.Generator().manual_seed(4))
    calls = []
    for fn in ("slot_projection", "head_outputs"):
        real = getattr(kernels, fn)
        monkeypatch.setattr(kernels, fn, lambda *a, fn=fn, real=real: calls.append(fn) or real(*a))
    with torch.no_grad():
        fused = fp.patched_forward(pm, state, toks(8))
        assert sorted(calls) == ["head_outputs", "slot_projection"] * hf.config.num_hidden_layers or (
            sorted(calls) == sorted(["head_outputs", "slot_projection"] * hf.config.num_hidden_layers)), calls
        monkeypatch.setenv("FUNCPATCH_KERNELS", "0")
        plain = fp.patched_forward(pm, state, toks(8))
    assert rel(fused, plain) <= 1e-6
    assert rel(fused, hf(toks(8)).logits) > 1e-3  # the masks matter


def _fresh_build(monkeypatch, tmp_path, cc=None):
    """The kernels as in a new process, building into ``tmp_path`` (with compiler ``cc``)."""
    monkeypatch.setattr(kernels, "_library", None)
    monkeypatch.setenv("FUNCPATCH_CACHE", str(tmp_path))
    monkeypatch.delenv("FUNCPATCH_KERNELS", raising=False)
    if cc is not None:
        monkeypatch.setenv("CC", cc)


def test_a_failed_build_is_logged_once_leaves_nothing_and_the_forward_goes_on(monkeypatch, tmp_path, caplog):
    failing = tmp_path / "cc"
    failing.write_text("#!/bin/sh\necho 'cc: no such luck' >&2\nexit 3\n")
    failing.chmod(0o755)
    _fresh_build(monkeypatch, tmp_path, str(failing))
    out = torch.full((2, 5, 4), 7.0)
    args = (torch.randn(3, 5 * 8), torch.randn(2, 3), torch.randn(2, 8, 4), 1e-6, out)
    with caplog.at_level("INFO", logger="funcpatch.kernels"):
        assert not kernels.slot_projection(*args)
        assert not kernels.slot_projection(*args)
    said = [r.getMessage() for r in caplog.records if r.name == "funcpatch.kernels"]
    assert len(said) == 1 and "exited with 3: cc: no such luck" in said[0] and "plain path" in said[0]
    assert kernels.status().startswith("unavailable:") and "exited with 3" in kernels.status()
    assert bool((out == 7.0).all())
    assert os.listdir(tmp_path / "kernels") == []  # no temporary file, no library


@needs_library
def test_an_interrupted_build_leaves_nothing_and_is_tried_again(monkeypatch, tmp_path):
    _fresh_build(monkeypatch, tmp_path)
    real = subprocess.run

    def interrupted(cmd, *a, **k):
        if "-shared" in cmd:
            raise KeyboardInterrupt
        return real(cmd, *a, **k)

    monkeypatch.setattr(kernels.subprocess, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        kernels.status()
    assert os.listdir(tmp_path / "kernels") == []
    assert kernels._library is None  # not marked unavailable: the next call builds
    monkeypatch.setattr(kernels.subprocess, "run", real)
    assert kernels.status().startswith("loaded")


@needs_library
def test_a_built_library_is_reused_by_later_processes(monkeypatch, tmp_path):
    _fresh_build(monkeypatch, tmp_path)
    assert kernels.status().startswith("loaded")
    built = os.listdir(tmp_path / "kernels")
    assert len(built) == 1 and built[0].startswith("kernels-") and built[0].endswith(".so")
    monkeypatch.setattr(kernels, "_library", None)  # a new process: only the cache is left
    compiled = []
    real = subprocess.run
    monkeypatch.setattr(kernels.subprocess, "run", lambda cmd, *a, **k: compiled.append(cmd) or real(cmd, *a, **k))
    assert kernels.status() == f"loaded: {tmp_path / 'kernels' / built[0]}"
    assert not any("-shared" in c for c in compiled)


def test_a_built_library_that_fails_its_check_is_an_error_here():
    """A kernel giving wrong values is refused at load (the forward then takes the plain
    path and the tests above skip): here that is a failure. A machine that cannot build
    the library (no compiler, no OpenMP) skips."""
    status = kernels.status()
    assert "wrong values" not in status and "failed its check" not in status, status
    if not status.startswith("loaded"):
        pytest.skip(status)
