"""Bad input at the API boundary: one table, each row an input with its expected error type
and a fragment of the message; then the immutable mask mapping and the loader's unknown words."""

import copy
import dataclasses
import json
import pickle

import optree
import pytest
import torch
import torch.utils._pytree as torch_pytree
from torch.func import grad, vmap

import funcpatch as fp
from conftest import tokens
from funcpatch.datasets import DatasetFormatError, load_datasets_from_json
from funcpatch.state import OPTREE_NAMESPACE, FrozenMasks


@pytest.fixture
def ctx(any_lm):
    pm = fp.patchable(any_lm, slice_output="last_seq")
    x = tokens(0, batch=2, seq=5)
    patch = fp.src_ablations(pm, tokens(1, batch=2, seq=5))
    state = fp.patch_mode(pm, fp.init_state(pm), patch)
    spec = fp.patchable(any_lm, seq_len=5)  # token-specific graph
    spec_state = fp.patch_mode(spec, fp.init_state(spec), fp.src_ablations(spec, x))
    return dict(model=any_lm, pm=pm, x=x, patch=patch, state=state, spec=spec, spec_state=spec_state)


def _with_masks(state, fn):
    return dataclasses.replace(state, masks={k: fn(v) for k, v in state.masks.items()})


def _nan_state(c):
    return _with_masks(c["state"], lambda v: torch.full_like(v, float("nan")))


BAD_INPUTS = [
    # (id, call, error type, message fragment)
    ("init_state nan", lambda c: fp.init_state(c["pm"], float("nan")), ValueError, "must be a finite number"),
    ("init_state inf", lambda c: fp.init_state(c["pm"], float("inf")), ValueError, "got inf"),
    ("set_all_masks -inf", lambda c: fp.set_all_masks(c["state"], -float("inf")), ValueError, "set_all_masks"),
    ("set_all_masks not a number", lambda c: fp.set_all_masks(c["state"], "1"), ValueError, "finite number"),
    ("patch_mode nan masks", lambda c: fp.patch_mode(c["pm"], _nan_state(c), c["patch"]), ValueError,
     "holds NaN or inf"),
    ("float64 masks on a float32 model",
     lambda c: fp.patched_forward(c["pm"], _with_masks(c["state"], lambda v: v.double()), c["x"]), TypeError,
     "has dtype torch.float64 but the model computes in torch.float32"),
    ("token id = d_vocab", lambda c: fp.patched_forward(c["pm"], c["state"], c["x"] * 0 + 50), ValueError,
     "token ids must be in [0, d_vocab=50)"),
    ("negative token id", lambda c: fp.patched_forward(c["pm"], c["state"], c["x"] - 100), ValueError,
     "got ids from -"),
    ("float tokens", lambda c: fp.patched_forward(c["pm"], c["state"], c["x"].float()), TypeError,
     "must be integer token ids"),
    ("longer than the context", lambda c: fp.record_src_outs(c["pm"], tokens(2, batch=1, seq=40)), ValueError,
     "context window is n_ctx=32"),
    ("out-of-vocabulary in record_src_outs", lambda c: fp.record_src_outs(c["pm"], c["x"] + 50), ValueError,
     "d_vocab=50"),
    ("token-specific graph, other length",
     lambda c: fp.patched_forward(c["spec"], c["spec_state"], tokens(3, batch=2, seq=6)), ValueError,
     "token-specific for seq_len=5"),
    ("params key the model lacks",
     lambda c: fp.patched_forward(c["pm"], c["state"], c["x"], params={"no.such.weight": torch.zeros(1)}),
     KeyError, "the model does not have: ['no.such.weight']"),
    ("params not a mapping", lambda c: fp.patched_forward(c["pm"], c["state"], c["x"], params=[1]), TypeError,
     "params must be a mapping"),
    ("single unknown edge name", lambda c: fp.patch_mode(c["pm"], c["state"], c["patch"], edges="A9.9->Resid End"),
     KeyError, "A9.9->Resid End"),
    ("state.masks item assignment",
     lambda c: c["state"].masks.__setitem__("blocks.0.hook_mlp_in", torch.zeros(1)), TypeError,
     "masks are immutable"),
    ("state.masks update", lambda c: c["state"].masks.update({}), TypeError, "masks are immutable"),
    ("state.masks del", lambda c: c["state"].masks.pop(next(iter(c["state"].masks))), TypeError, "immutable"),
]


@pytest.mark.parametrize("name,call,error,fragment", BAD_INPUTS, ids=[r[0] for r in BAD_INPUTS])
def test_bad_input_table(ctx, name, call, error, fragment):
    with pytest.raises(error) as info:
        call(ctx)
    assert fragment in str(info.value), f"{name}: {info.value}"


def test_a_single_edge_name_is_one_edge(ctx):
    pm, state, patch = ctx["pm"], ctx["state"], ctx["patch"]
    name = pm.graph.edges[-1].name
    one = fp.patch_mode(pm, state, patch, edges=name)
    listed = fp.patch_mode(pm, state, patch, edges=[name])
    assert sum(int(v.sum()) for v in one.masks.values()) == 1
    assert all(torch.equal(one.masks[k], listed.masks[k]) for k in listed.masks)


def test_a_subset_of_params_stays_allowed(ctx):
    pm, state, x = ctx["pm"], ctx["state"], ctx["x"]
    name, weight = next(iter(pm.model.named_parameters()))
    torch.testing.assert_close(fp.patched_forward(pm, state, x, params={name: weight}),
                               fp.patched_forward(pm, state, x))


def test_checks_pass_inside_vmap_and_grad(ctx):
    # the value checks look under the transforms' wrappers: every row's tokens are checked
    pm, state, x = ctx["pm"], ctx["state"], ctx["x"]
    run = lambda t, p: fp.patched_forward(pm, dataclasses.replace(state, patch_src_outs=p), t[None])[0, -1, 0]
    patch = state.patch_src_outs[:, :, None]
    vmap(run, in_dims=(0, 1))(x, patch)
    bad = x.clone()
    bad[1, 2] = 50
    with pytest.raises(ValueError, match="d_vocab=50"):
        vmap(run, in_dims=(0, 1))(bad, patch)
    masks = grad(lambda m: fp.patched_forward(pm, dataclasses.replace(state, masks=m), x)[:, -1].sum())(state.masks)
    assert isinstance(masks, FrozenMasks) and set(masks) == set(state.masks)


# ---------------------------------------------------------------------------- immutable masks


def test_masks_are_frozen_and_a_pytree_for_torch_and_optree(ctx):
    state = ctx["state"]
    assert isinstance(state.masks, FrozenMasks) and isinstance(state.masks, dict)
    leaves, spec = torch_pytree.tree_flatten(state)
    back = torch_pytree.tree_unflatten(leaves, spec)
    leaves = [t for t in leaves if t is not None]  # noise=None
    assert isinstance(back.masks, FrozenMasks) and list(back.masks) == list(state.masks)
    assert sum(v.numel() for v in state.masks.values()) + state.patch_src_outs.numel() == sum(
        t.numel() for t in leaves)
    paths = [torch_pytree.keystr(p) for p, _ in torch_pytree.tree_flatten_with_path(state)[0]]
    assert paths[0] == f".masks[{next(iter(state.masks))!r}]"
    o_leaves, o_spec = optree.tree_flatten(state, namespace=OPTREE_NAMESPACE)
    assert len(o_leaves) == len(leaves) == len(state.masks) + 1
    assert isinstance(optree.tree_unflatten(o_spec, o_leaves).masks, FrozenMasks)
    doubled = optree.tree_map(lambda t: t * 2, state.masks, namespace=OPTREE_NAMESPACE)
    assert isinstance(doubled, FrozenMasks)


def test_masks_copy_and_pickle_and_replace(ctx):
    state = ctx["state"]
    given = {k: v.clone() for k, v in state.masks.items()}
    s = dataclasses.replace(state, masks=given)
    given.clear()  # the caller's dict was copied: the state keeps its masks
    assert set(s.masks) == set(state.masks)
    for clone in (copy.deepcopy(s.masks), pickle.loads(pickle.dumps(s.masks)), copy.copy(s.masks)):
        assert isinstance(clone, FrozenMasks) and set(clone) == set(state.masks)


# ---------------------------------------------------------------------------- unknown words in datasets


def test_unknown_word_names_the_word_and_the_prompt(tmp_path):
    from funcpatch import zoo
    _, tok = zoo.load_hf("ioi")
    good = json.loads(zoo.dataset_path("ioi").read_text())["prompts"][:4]
    for field, word in (("clean", "Zorblax"), ("answers", "Quux")):
        prompts = copy.deepcopy(good)
        if field == "clean":
            prompts[2]["clean"] = prompts[2]["clean"].replace(prompts[2]["answers"][0], word, 1)
        else:
            prompts[2]["answers"] = [word]
        path = tmp_path / f"{field}.json"
        path.write_text(json.dumps({"prompts": prompts}))
        with pytest.raises(DatasetFormatError) as info:
            load_datasets_from_json(tok, path, train_test_size=(2, 2))
        msg = str(info.value)
        assert f"prompts[2].{field}" in msg and repr(word) in msg and "not in the tokenizer's vocabulary" in msg
        if field == "clean":
            assert repr(prompts[2]["clean"]) in msg  # the prompt itself


def test_the_unknown_token_written_out_is_allowed(tmp_path):
    from funcpatch import zoo
    _, tok = zoo.load_hf("ioi")
    prompts = json.loads(zoo.dataset_path("ioi").read_text())["prompts"][:2]
    prompts[0]["clean"] = prompts[0]["clean"] + f" {tok.unk_token}"
    prompts[0]["corrupt"] = prompts[0]["corrupt"] + f" {tok.unk_token}"
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"prompts": prompts}))
    train, _ = load_datasets_from_json(tok, path, train_test_size=(1, 1), shuffle=False)
    assert tok.unk_token_id in next(iter(train)).clean[0].tolist()
