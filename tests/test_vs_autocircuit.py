"""funcpatch reproduces auto-circuit 1.0.1's patched logits on the same weights.

The reference ``tests/data/autocircuit_reference.pt`` was produced by

    python benchmarks/crosscheck_autocircuit.py --fixture tests/data/autocircuit_reference.pt

from funcpatch's environment, with auto-circuit 1.0.1 + TransformerLens 2.16.1 in a second
environment (``$AUTOCIRCUIT_PYTHON``, default ``/work/venvs/ac/bin/python``). It holds a
seeded 2-layer GPT-2 (d_model 24, 4 heads, vocab 16, initializer_range 0.1; transformers
state dict), 4 clean / corrupt prompts of 8 tokens (batches of 2), and, for 3 graphs (factorized with separate
Q/K/V, residual, token-specific factorized) x 3 ablations (RESAMPLE, ZERO,
TOKENWISE_MEAN_CLEAN) x 3 mask settings (random values on every edge; a random 10% of
edge *names* at 1 through ``patch_mode(edges=...)``; random values on 30% of the edges),
the full logits of auto-circuit's patched forward (its HookedTransformer converted
from the same transformers weights with no weight processing). Masks are stored by edge
name (and token position), so the test checks names, layout and numbers together.

This test needs neither auto-circuit nor TransformerLens 2.x.
"""

import dataclasses
import os

import pytest
import torch

import funcpatch as fp

PATH = os.path.join(os.path.dirname(__file__), "data", "autocircuit_reference.pt")
BATCH_SPECIFIC = ("RESAMPLE", "BATCH_TOKENWISE_MEAN", "BATCH_ALL_TOK_MEAN")


def _has_bridge():
    try:
        from transformer_lens.model_bridge import TransformerBridge  # noqa: F401
        return True
    except ImportError:
        return False


pytestmark = pytest.mark.skipif(not _has_bridge(), reason="needs TransformerLens with TransformerBridge")

_REF = torch.load(PATH, weights_only=False)
_CACHE = {}


def _bridge():
    if "bridge" not in _CACHE:
        from transformers import GPT2Config, GPT2LMHeadModel
        cfg = GPT2Config(**_REF["shape"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                         eos_token_id=0)
        cfg._attn_implementation = "eager"
        hf = GPT2LMHeadModel(cfg).eval()
        missing, unexpected = hf.load_state_dict(_REF["state_dict"], strict=False)
        assert not unexpected and all(".attn." in k for k in missing), (missing, unexpected)
        _CACHE["bridge"] = fp.models.from_hf(hf)
    return _CACHE["bridge"]


def _dataloader():
    ds = fp.PromptDataset(list(_REF["clean"]), list(_REF["corrupt"]), list(_REF["answers"]),
                          list(_REF["wrong_answers"]))
    return fp.PromptDataLoader(ds, seq_len=_REF["clean"].shape[1], diverge_idx=0, batch_size=_REF["batch_size"],
                               shuffle=False)


def _pm(gi):
    if gi not in _CACHE:
        g = _REF["graphs"][gi]
        _CACHE[gi] = fp.patchable(_bridge(), factorized=g["factorized"], separate_qkv=g["separate_qkv"],
                                  seq_len=g["seq_len"])
    return _CACHE[gi]


def _masks(pm, gi, values):
    """funcpatch masks from the reference's values, ``[edge name]`` or ``[edge name, position]``
    (NaN: edge not set, mask 0), looked up by edge *name*."""
    masks = {k: torch.zeros_like(v) for k, v in fp.init_state(pm).masks.items()}
    names = _REF["graphs"][gi]["edge_names"]
    for e in pm.graph.edges:
        v = values[names.index(e.name)] if e.seq_idx is None else values[names.index(e.name), e.seq_idx]
        if not torch.isnan(v):
            masks[e.dest.module_name][e.patch_idx] = v
    return masks


CASES = list(enumerate(_REF["cases"]))


@pytest.mark.parametrize("gi", range(len(_REF["graphs"])), ids=[g["name"] for g in _REF["graphs"]])
def test_same_edges_as_autocircuit(gi):
    g, pm = _REF["graphs"][gi], _pm(gi)
    assert pm.graph.n_edges == g["n_edges"]
    assert sorted({e.name for e in pm.graph.edges}) == g["edge_names"]


@pytest.mark.parametrize("i,case", CASES,
                         ids=[f"{_REF['graphs'][c['graph']]['name']}|{c['ablation']}|{c['mask_setting']}"
                              for _, c in CASES])
def test_patched_logits_match_autocircuit(i, case):
    gi = case["graph"]
    pm = _pm(gi)
    dl = _dataloader()
    abl = case["ablation"]
    patches = fp.batch_src_ablations(pm, dl, abl, clean_corrupt="corrupt" if abl in BATCH_SPECIFIC else None)
    outs = []
    for batch in dl:
        state = fp.patch_mode(pm, fp.init_state(pm), patches[batch.key], edges=case["edges"])
        if case["values"] is not None:
            state = dataclasses.replace(state, masks=_masks(pm, gi, case["values"]))
        with torch.no_grad():
            outs.append(fp.patched_forward(pm, state, batch.clean))
    out = torch.cat(outs)
    ref = _REF["logits"][i]
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_fixture_patches_move_the_logits():
    """The reference discriminates: every case's patch moves the logits far beyond the tolerance."""
    pm = _pm(0)
    with torch.no_grad():
        clean = torch.cat([pm.model(b.clean) for b in _dataloader()])
    moved = (_REF["logits"] - clean).abs().flatten(1).max(dim=1).values
    assert moved.min() > 1e-2, moved
