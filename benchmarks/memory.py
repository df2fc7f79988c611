"""Peak memory of EAP and EAP-IG against transformers' own forward + backward (issue 13).

For each model shape and prompt length, two fresh processes each build the same random
GPT-2-shaped model and one batch of 8 prompt pairs, run their call once to warm up, then
measure one call's resident-memory high-water mark above the resident memory just
before it (``common.peak_rss_delta_mb``: the process's own peak, above the loaded model
and inputs):

- transformers: forward on the clean prompts and backward of the logit difference at
  the last position (what EAP needs at least: one forward and one backward);
- funcpatch: ``fp.algos.eap`` (or ``eap_ig``) on that batch, patch values included.

Usage: ``python benchmarks/memory.py [--only A,B,C] [--algo eap|eap_ig] [--budget MIB]``
(prints a markdown table; ``--json`` for one JSON line per row).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

BATCH = 8
# the three models: (name, GPT-2 shape, prompt lengths)
MODELS = {
    "A": ("4 layers, d_model 256 (benchmark shape)", dict(n_layer=4, n_embd=256, n_head=8), (32, 256, 1024)),
    "B": ("GPT-2-small shape (12 layers, d_model 768)", dict(n_layer=12, n_embd=768, n_head=12), (128, 512)),
    "C": ("many sources (8 layers, 32 heads, d_model 512)", dict(n_layer=8, n_embd=512, n_head=32), (512,)),
}


def _inputs(seq: int, vocab: int):
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, vocab, (BATCH, seq), generator=g)
    corrupt = clean.clone()
    corrupt[:, -1] = (corrupt[:, -1] + 1) % vocab
    answers = torch.randint(0, vocab, (BATCH, 1), generator=g)
    return clean, corrupt, answers, (answers + 1) % vocab


def child(kind: str, model: str, seq: int, algo: str, budget_mib) -> dict:
    torch.set_num_threads(C.THREADS)
    _, shape, _ = MODELS[model]
    shape = dict(shape, vocab_size=1000, n_positions=max(1024, seq))
    hf = C.build_hf(shape)
    clean, corrupt, answers, wrong = _inputs(seq, shape["vocab_size"])
    if kind == "transformers":
        def run():
            logits = hf(clean).logits[:, -1]
            loss = -(logits.gather(1, answers) - logits.gather(1, wrong)).mean()
            loss.backward()
            hf.zero_grad(set_to_none=True)
        for p in hf.parameters():  # gradients for the activations only, as EAP needs
            p.requires_grad_(False)
        emb = hf.transformer.wte
        emb.weight.requires_grad_(True)  # something upstream needs a gradient: the whole backward runs
    else:
        import funcpatch as fp
        pm = fp.patchable(fp.models.from_hf(hf), slice_output="last_seq")
        batch = fp.PromptPairBatch(0, 0, clean, corrupt, answers, wrong)
        kwargs = {} if budget_mib is None else {"max_memory": int(budget_mib * 2 ** 20)}

        def run():
            if algo == "eap":
                fp.algos.eap(pm, [batch], progress=False, **kwargs)
            else:
                fp.algos.eap_ig(pm, [batch], samples=2, variant="inputs", progress=False, **kwargs)
    run()
    if kind != "transformers":
        import importlib
        importlib.import_module("funcpatch.scratch").release()
    return C.peak_rss_delta_mb(run)


def measure(kind, model, seq, algo, budget) -> float:
    env = {**os.environ, **C.MEM_ENV, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, model, str(seq), "--algo", algo]
    if budget is not None:
        cmd += ["--budget", str(budget)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_delta_mb"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=3)
    ap.add_argument("--only", default="A,B,C")
    ap.add_argument("--seqs", default=None, help="comma-separated prompt lengths (default: the issue's)")
    ap.add_argument("--algo", default="eap", choices=("eap", "eap_ig"))
    ap.add_argument("--budget", type=float, default=None, help="EAP's max_memory, MiB (default: none)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.child:
        kind, model, seq = a.child
        print(json.dumps(child(kind, model, int(seq), a.algo, a.budget)))
        return
    if not a.json:
        print(f"| model | tokens | transformers fwd+bwd (MiB) | funcpatch {a.algo} (MiB) | ratio |")
        print("|---|---|---|---|---|")
    for m in a.only.split(","):
        name, _, seqs = MODELS[m]
        for seq in ([int(s) for s in a.seqs.split(",")] if a.seqs else seqs):
            hf_mb = measure("transformers", m, seq, a.algo, None)
            fp_mb = measure("funcpatch", m, seq, a.algo, a.budget)
            row = {"model": m, "name": name, "seq": seq, "transformers_mb": hf_mb, "funcpatch_mb": fp_mb,
                   "ratio": fp_mb / hf_mb, "budget_mib": a.budget, "algo": a.algo}
            if a.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"| {name} | {seq} | {hf_mb:.0f} | {fp_mb:.0f} | {fp_mb / hf_mb:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
