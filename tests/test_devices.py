"""Devices: the tests' device switch, no CPU-only calls on tensors that may live on a GPU, and
models whose blocks lie on several devices (funcpatch.devices)."""

import copy
import dataclasses
import os
import re
from pathlib import Path

import pytest
import torch

import funcpatch as fp
from conftest import DEVICE

PACKAGE = Path(__file__).resolve().parent.parent / "funcpatch"


def test_the_switch_defaults_to_the_cpu():
    want = os.environ.get("FUNCPATCH_TEST_DEVICE", "cpu")
    assert DEVICE == torch.device(want)


def test_numpy_only_after_cpu():
    """``Tensor.numpy()`` fails on CUDA tensors: every call in the package must come right
    after ``.cpu()`` (prompt hashing, ACDC's circuit keys and the like)."""
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            for m in re.finditer(r"\.numpy\(\)", line):
                if not re.search(r"\.cpu\(\)(\.contiguous\(\))?$", line[:m.start()]):
                    bad.append(f"{path.relative_to(PACKAGE.parent)}:{i}: {line.strip()}")
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------------------
# A model over several devices (funcpatch.devices). No GPU here: the later blocks, the
# final norm and the unembedding go to the ``meta`` device. Any op mixing it with a real
# device raises, and nothing can be copied out of it, so a run that completes with its
# outputs on ``meta`` ran every block on its own device and never went back. Backward
# passes do go back (gradients flow to earlier blocks), so they are checked with the
# split at block 0 (only the embedding on the real device, and nothing it needs back).
# Values: on one CPU with blocks told apart by device index
# (test_moves_between_devices_keep_the_values), and on a GPU
# (test_split_over_cuda_and_cpu_equals_one_device, with FUNCPATCH_TEST_DEVICE=cuda).

META = torch.device("meta")
SPLIT_MODELS = ["llama3-gqa", "gpt2"]


def _parts(hf):
    """``(blocks, final norm)`` of a transformers causal LM of the families used here."""
    body = getattr(hf, "model", None) or hf.transformer
    return (getattr(body, "layers", None) or body.h), (getattr(body, "norm", None) or body.ln_f)


def split(name: str, at: int, first=DEVICE, rest=META):
    """``(the model on first, a copy with blocks at.. and the output side on rest)``: a
    hand-made device_map without accelerate's hooks."""
    from test_architectures import model
    one = copy.deepcopy(model(name)).to(first)
    hf = copy.deepcopy(one)
    tied = hf.config.tie_word_embeddings
    if tied and rest == META:  # meta cannot hand the unembedding's input back to the embedding's device
        hf.lm_head.weight = torch.nn.Parameter(hf.lm_head.weight.detach().clone())
    blocks, final = _parts(hf)
    for b in blocks[at:]:
        b.to(rest)
    final.to(rest)
    if rest == META or not tied:  # tied weights stay with the embedding, as accelerate's device_map keeps them
        hf.lm_head.to(rest)
    return one, hf


def _task(pm, seed=0):
    from test_architectures import ANSWERS, SEQ, toks
    clean, corrupt = toks(seed, batch=4).to(DEVICE), toks(seed + 1, batch=4).to(DEVICE)
    loader = fp.PromptDataLoader(fp.PromptDataset(clean, corrupt, ANSWERS, ANSWERS + 4), seq_len=SEQ,
                                 diverge_idx=0, batch_size=4)
    return clean, corrupt, loader


def _masks(pm, seed, rows=None):
    """Random masks with a zero in every third entry (the patcher skips head slots whose
    masks are all 0), per batch row when ``rows``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in fp.init_state(pm).masks.items():
        shape = v.shape if rows is None else (rows,) + v.shape
        m = torch.rand(shape, generator=g)
        m.view(-1)[::3] = 0
        out[k] = m.to(v.device)
    return out


@pytest.mark.parametrize("name", SPLIT_MODELS)
def test_record_runs_each_block_on_its_device(name):
    one, hf = split(name, 1)
    pm, pm1 = fp.patchable(hf), fp.patchable(one)
    clean, _, _ = _task(pm)
    with torch.no_grad():
        out, src_outs = fp.record_src_outs(pm, clean)
        want = fp.record_src_outs(pm1, clean)[1]
    assert out.device == src_outs.device == META  # the sources are gathered on the last block's device
    assert src_outs.shape == want.shape and out.shape == (4, clean.shape[1], hf.config.vocab_size)


@pytest.mark.parametrize("name", SPLIT_MODELS)
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "autograd"])
@pytest.mark.parametrize("rows", [None, 4], ids=["shared_masks", "per_row_masks"])
def test_patched_forward_runs_each_block_on_its_device(name, grad, rows):
    """The in-place no-grad path and the autograd path, masks shared or per row: the
    differences, patch values and masks follow the stream from the first device to meta."""
    one, hf = split(name, 1)
    pm, pm1 = fp.patchable(hf), fp.patchable(one)
    clean, corrupt, _ = _task(pm)
    with torch.no_grad():
        patch = fp.src_ablations(pm1, corrupt)  # real values on the first device (meta cannot give them back)
    masks = _masks(pm, 3, rows)
    if grad:
        masks = {k: v.requires_grad_() for k, v in masks.items()}
    state = dataclasses.replace(fp.patch_mode(pm, fp.init_state(pm), patch), masks=masks)
    with torch.set_grad_enabled(grad):
        out = fp.patched_forward(pm, state, clean)
    assert out.device == META and out.shape == (4, clean.shape[1], hf.config.vocab_size)
    assert out.requires_grad == grad


@pytest.mark.parametrize("name", SPLIT_MODELS)
def test_run_circuits_runs_each_block_on_its_device(name, monkeypatch):
    one, hf = split(name, 1)
    pm, pm1 = fp.patchable(hf, slice_output="last_seq"), fp.patchable(one, slice_output="last_seq")
    clean, _, loader = _task(pm)
    import funcpatch.circuits as circuits
    values = circuits.batch_patch_values
    # patch values from the one-device twin: meta holds no values to hand back to the first blocks
    monkeypatch.setattr(circuits, "batch_patch_values", lambda _, *a, **k: values(pm1, *a, **k))
    scores = {k: torch.rand(v.shape, generator=torch.Generator().manual_seed(5)).to(v.device)
              for k, v in fp.init_state(pm).masks.items()}
    n = pm.graph.n_edges
    for stacked in (False, True):
        outs = fp.run_circuits(pm, loader, [0, n // 3, n], scores, progress=False, vmap_sizes=stacked)
        got = [o for per_size in outs.values() for o in per_size.values()]
        assert len(got) == 3 and all(o.device == META and o.shape == (4, hf.config.vocab_size) for o in got)


@pytest.mark.parametrize("name", SPLIT_MODELS)
def test_eap_and_mask_gradients_over_two_devices(name):
    """EAP's one backward (zero_grads) and torch.func gradients of the masks. Split at
    block 0: the backward never needs the embedding's side (see the section comment)."""
    one, hf = split(name, 0)
    pm, pm1 = fp.patchable(hf, slice_output="last_seq"), fp.patchable(one, slice_output="last_seq")
    clean, corrupt, loader = _task(pm)
    scores = fp.algos.eap(pm, loader)  # patch values recorded on the split model itself
    want = fp.algos.eap(pm1, loader)
    assert all(v.device == META and v.shape == want[k].shape for k, v in scores.items())
    with torch.no_grad():
        patch = fp.src_ablations(pm1, corrupt)  # Resid Start's patch value joins on the first device
    state = fp.patch_mode(pm, fp.init_state(pm), patch)
    masks = {k: v.to(META) for k, v in _masks(pm, 4).items()}
    grads = torch.func.grad(lambda m: fp.patched_forward(pm, dataclasses.replace(state, masks=m), clean)[:, -1].sum())(
        masks)
    assert all(g.device == META and g.shape == masks[k].shape for k, g in grads.items())


@pytest.mark.parametrize("positional", [False, True])
def test_mib_mean_ablations_are_gathered_on_the_last_device(positional):
    """MIB's means join the token embedding (first device) to the recorded sources (last)."""
    from funcpatch.mib.evaluation import _means
    _, hf = split("llama3-gqa", 1)
    pm = fp.patchable(hf, slice_output="last_seq")
    means = _means(pm, _task(pm)[2], positional)
    assert means.device == META and means.shape[-1] == hf.config.hidden_size


def test_a_block_split_over_devices_is_refused():
    one, hf = split("llama3-gqa", 1)
    _parts(hf)[0][0].mlp.to(META)  # block 0's attention on the first device, its MLP on meta
    pm = fp.patchable(hf)
    with pytest.raises(ValueError, match="block 0's weights are on several devices"):
        fp.record_src_outs(pm, _task(pm)[0])


def test_offloaded_weights_are_refused(tmp_path):
    """accelerate's offload keeps weights on meta for hooks to load: refused, whether
    asked for directly or through transformers' device_map ('disk'); a device_map that
    only places the model is not."""
    accelerate = pytest.importorskip("accelerate")
    import transformers as T
    from test_architectures import model
    hf = accelerate.cpu_offload(copy.deepcopy(model("llama")), execution_device=torch.device("cpu"))
    with pytest.raises(ValueError, match="offloaded by accelerate"):
        fp.patchable(hf)
    model("llama").save_pretrained(tmp_path)
    where = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
             "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    hf = T.AutoModelForCausalLM.from_pretrained(tmp_path, device_map=where, offload_folder=tmp_path / "offload")
    with pytest.raises(ValueError, match="offloaded by accelerate.*model.layers.1"):
        fp.patchable(hf)
    placed = fp.patchable(T.AutoModelForCausalLM.from_pretrained(tmp_path, device_map={"": "cpu"}))
    with torch.no_grad():
        assert fp.record_src_outs(placed, _task(placed)[0])[1].shape[0] == len(placed.graph.srcs)


def test_the_hook_path_refuses_a_model_over_several_devices():
    """The hook path (a bridge with lean=False, or a call the own forward does not take)
    runs the model's own modules on one device: a clear error, not a device mismatch."""
    from conftest import has_bridge
    if not has_bridge():
        pytest.skip("no TransformerBridge")
    _, hf = split("llama", 1)
    bridge = fp.models.from_hf(hf)
    with pytest.raises(ValueError, match="several devices.*hook path"):
        fp.patchable(bridge, lean=False)
    pm = fp.patchable(bridge)
    with pytest.raises(ValueError, match="several devices.*hook path"):
        fp.record_src_outs(pm, _task(pm)[0], output_attentions=True)


def test_a_micro_model_over_several_devices_is_refused():
    model = fp.MicroModel(n_layers=2)
    model.blocks[1].to(META)
    with pytest.raises(ValueError, match="several devices"):
        fp.patchable(model)


def _close(a, b, what):
    """Equal up to float rounding of different kernels: max |a - b| <= 1e-4 * max |b|."""
    a, b = a.detach().cpu(), b.detach().cpu()
    assert a.shape == b.shape, what
    finite = torch.isfinite(b)
    assert torch.equal(finite, torch.isfinite(a)) and torch.equal(a[~finite], b[~finite]), what
    err = float((a[finite] - b[finite]).abs().max()) if finite.any() else 0.0
    assert err <= 1e-4 * max(float(b[finite].abs().max()) if finite.any() else 0.0, 1e-6), (what, err)


def _split_equals_one_device(pm, pm1, last, acdc=True):
    """Every path on ``pm`` (a model over several devices whose last block is on ``last``,
    if given) gives ``pm1``'s values (the same weights on one device)."""
    clean, corrupt, loader = _task(pm, seed=7)
    with torch.no_grad():
        out, src_outs = fp.record_src_outs(pm, clean)
        out1, src_outs1 = fp.record_src_outs(pm1, clean)
    if last is not None:
        assert src_outs.device == last
    _close(out, out1, "logits")
    _close(src_outs, src_outs1, "sources")
    with torch.no_grad():
        patch = fp.src_ablations(pm, corrupt)
        patch1 = fp.src_ablations(pm1, corrupt)
    for rows in (None, 4):
        masks = _masks(pm, 8, rows)
        state = dataclasses.replace(fp.patch_mode(pm, fp.init_state(pm), patch), masks=masks)
        state1 = dataclasses.replace(fp.patch_mode(pm1, fp.init_state(pm1), patch1), masks=masks)
        with torch.no_grad():
            _close(fp.patched_forward(pm, state, clean), fp.patched_forward(pm1, state1, clean), f"patched {rows}")

        def grads(p, s):
            return torch.func.grad(lambda m: p(dataclasses.replace(s, masks=m), clean).sum())(masks)
        g, g1 = grads(lambda s, x: fp.patched_forward(pm, s, x)[:, -1], state), \
            grads(lambda s, x: fp.patched_forward(pm1, s, x)[:, -1], state1)
        for k in masks:
            _close(g[k], g1[k], f"mask gradient {k} {rows}")
    # ACDC's evaluations resume from a checkpoint of a clean forward: here each point that
    # comes after every patched destination (those of the last block's MLP and the end)
    n = pm.forward.decoder.n_layers
    late = {k: v if k.startswith(f"blocks.{n - 1}.") and not k.endswith("_input") else torch.zeros_like(v)
            for k, v in _masks(pm, 9).items()}
    state = dataclasses.replace(fp.patch_mode(pm, fp.init_state(pm), patch), masks=late)
    with torch.no_grad():
        want = fp.patched_forward(pm1, dataclasses.replace(state, patch_src_outs=patch1), clean)
        _, src_outs, points = pm.forward.checkpoints(pm, (clean,), {})
        for point, (resid, before) in sorted(points.items()):
            if point <= (n - 1, 1):
                _close(pm.forward.resumed(pm, state, point, resid, src_outs[:before], (clean,), {}), want,
                       f"resumed at {point}")
    algos = {"eap": lambda p: fp.algos.eap(p, loader, progress=False),
             "eap_ig": lambda p: fp.algos.eap_ig(p, loader, samples=2, progress=False)}
    if acdc:
        algos["acdc"] = lambda p: fp.algos.acdc(p, loader, tao_exps=[-2], progress=False)
    for what, algo in algos.items():
        got, want = algo(pm), algo(pm1)
        for k in want:
            _close(got[k], want[k], f"{what} {k}")
    n = pm.graph.n_edges
    got = fp.run_circuits(pm, loader, [0, n // 3, n], want, progress=False, vmap_sizes=True)
    want_outs = fp.run_circuits(pm1, loader, [0, n // 3, n], want, progress=False, vmap_sizes=True)
    for size in want_outs:
        for key in want_outs[size]:
            _close(got[size][key], want_outs[size][key], f"run_circuits {size}")


@pytest.mark.skipif(DEVICE.type != "cuda", reason="a model split over a GPU and the CPU: FUNCPATCH_TEST_DEVICE=cuda")
@pytest.mark.parametrize("name", SPLIT_MODELS)
def test_split_over_cuda_and_cpu_equals_one_device(name):
    """Block 0 (and the embedding) on the GPU, the rest on the CPU."""
    one, hf = split(name, 1, first=DEVICE, rest=torch.device("cpu"))
    kw = dict(slice_output="last_seq")
    _split_equals_one_device(fp.patchable(hf, **kw), fp.patchable(one, **kw), torch.device("cpu"))


@pytest.mark.parametrize("name", SPLIT_MODELS)
def test_moves_between_devices_keep_the_values(name, monkeypatch):
    """Without a GPU: the blocks are told they alternate between ``cpu:0`` and ``cpu``
    (unequal devices to torch, and ``.to()`` between them copies), so every move a split
    model makes runs, here with values checked against the plain run."""
    from funcpatch import decoder
    one, hf = split(name, 0, rest=DEVICE)  # two copies on DEVICE
    devices = [torch.device(DEVICE.type, 0), torch.device(DEVICE.type)]
    real = decoder.block_devices
    monkeypatch.setattr(decoder, "block_devices", lambda w, n: [devices[i % 2] for i in range(n)]
                        if w["embed"] is hf.get_input_embeddings().weight else real(w, n))
    kw = dict(slice_output="last_seq")
    # (tensors say "cpu" whatever the index; ACDC: its resumed forwards are checked, the search is slow here)
    _split_equals_one_device(fp.patchable(hf, **kw), fp.patchable(one, **kw), None, acdc=False)
