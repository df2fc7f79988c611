"""The README's python blocks run as written, top to bottom, in one namespace."""

import re
from pathlib import Path

import pytest
import torch

from conftest import has_bridge

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(text: str):
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_readme_has_python_blocks():
    blocks = python_blocks(README.read_text())
    assert blocks and any("fp.patchable" in b for b in blocks)


@pytest.mark.skipif(not has_bridge(), reason="the tour uses fp.models.from_hf (a TransformerBridge)")
def test_readme_python_blocks_run(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # the blocks write files
    ns = {"__name__": "readme"}
    for i, block in enumerate(python_blocks(README.read_text())):
        exec(compile(block, f"README.md python block {i}", "exec"), ns)
    # the tour's results are what its comments say
    pm, batch = ns["pm"], ns["batch"]
    assert pm.graph.n_edges == 310 and batch.clean.shape == (8, 15)
    assert ns["logits"].shape == (8, 15, pm.model.cfg.d_vocab)
    assert set(ns["per_prompt"]) == set(ns["state"].masks)
    assert all(v.shape[0] == 8 for v in ns["per_prompt"].values())
    assert sorted(ns["outs"]) == [0, 10, 100, pm.graph.n_edges]
    # per prompt, each on its own answer: row i is the gradient of prompt i's answer logit alone
    import dataclasses
    import funcpatch as fp
    from torch.func import grad
    state, patch = ns["state"], ns["patch"]
    rows = [0] + [i for i in range(8) if batch.answers[i, 0] != batch.answers[0, 0]][:1]
    assert len(rows) == 2
    for i in rows:
        def logit(masks):
            s = dataclasses.replace(state, masks=masks, patch_src_outs=patch[:, i:i + 1])
            return fp.patched_forward(pm, s, batch.clean[i:i + 1])[0, -1, batch.answers[i, 0]]
        want = grad(logit)(dict(state.masks))
        for k, v in want.items():
            torch.testing.assert_close(ns["per_prompt"][k][i], v, atol=1e-5, rtol=1e-4)
