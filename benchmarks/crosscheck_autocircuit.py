"""Semantics check: funcpatch's patched logits against auto-circuit 1.0.1's, on the same weights.

    python benchmarks/crosscheck_autocircuit.py                 # small model, all cases
    python benchmarks/crosscheck_autocircuit.py --full          # the benchmark workload's model
    python benchmarks/crosscheck_autocircuit.py --fixture tests/data/autocircuit_reference.pt

Runs from funcpatch's environment and starts ``peer_autocircuit.py crosscheck`` with
``/work/venvs/ac/bin/python`` (or ``$AUTOCIRCUIT_PYTHON``). For every graph
(factorized with separate Q/K/V, factorized with one attention input per head, the
residual graph, and a token-specific factorized graph), every ablation type and
several mask settings, both libraries run every batch of the same prompts with the
same edges patched, and the script prints the max |difference| of the full logits.
Masks are exchanged *by edge name* (``"A0.3->MLP 2"``, plus the token position in the
token-specific graph), never by tensor layout, so a layout difference shows up as a
numeric difference. It also compares the edge counts and the sets of edge names.

``--fixture PATH`` saves a small reference (a 2-layer d_model 32 model's weights,
prompts, masks and auto-circuit's logits) for ``tests/test_vs_autocircuit.py``, which
then checks funcpatch against it without auto-circuit installed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import common as C  # noqa: E402

ABLATIONS = ("RESAMPLE", "ZERO", "TOKENWISE_MEAN_CLEAN", "TOKENWISE_MEAN_CORRUPT",
             "TOKENWISE_MEAN_CLEAN_AND_CORRUPT", "BATCH_TOKENWISE_MEAN", "BATCH_ALL_TOK_MEAN")
BATCH_SPECIFIC = ("RESAMPLE", "BATCH_TOKENWISE_MEAN", "BATCH_ALL_TOK_MEAN")
# initializer_range 0.1 (GPT-2 uses 0.02): larger activations and logits, so that patching
# moves the outputs by a lot and any semantic difference would show clearly
SMALL = dict(n_layer=3, n_embd=64, n_head=4, vocab_size=100, n_positions=16, initializer_range=0.1)
FIXTURE = dict(n_layer=2, n_embd=24, n_head=4, vocab_size=16, n_positions=8, initializer_range=0.1)


def graph_specs(seq: int):
    return [
        dict(name="factorized, separate_qkv", factorized=True, separate_qkv=True),
        dict(name="factorized, attn_in", factorized=True, separate_qkv=False),
        dict(name="residual", factorized=False),
        dict(name=f"factorized, separate_qkv, seq_len={seq}", factorized=True, separate_qkv=True, seq_len=seq),
    ]


def mask_settings(keys, seed: int):
    """Mask settings by edge name: random values everywhere, a random subset at 1 (given
    as edge *names*, through both libraries' ``patch_mode(edges=...)``), and random
    values on a random 30% of the edges."""
    rng = random.Random(seed)
    names = sorted({k[0] for k in keys})
    subset = sorted(rng.sample(names, max(1, len(names) // 10)))
    sparse = rng.sample(sorted(keys, key=str), max(1, (3 * len(keys)) // 10))
    vals = C.random_edge_values(keys, seed=seed)
    return {
        "random values on every edge": {"values": vals},
        "random 10% of edge names at 1 (patch_mode edges=)": {"edges": subset},
        "random values on a random 30% of edges": {"values": {k: vals[k] for k in sparse}},
    }


def fp_outputs(model_path, data_path, graphs, ablations):
    import funcpatch as fp
    bridge = fp.models.from_hf(C.load_hf(model_path))
    d = torch.load(data_path)
    ds = fp.PromptDataset(list(d["clean"]), list(d["corrupt"]), list(d["answers"]), list(d["wrong_answers"]))
    dl = fp.PromptDataLoader(ds, seq_len=d["clean"].shape[1], diverge_idx=0, batch_size=d["batch_size"],
                             shuffle=False)
    with torch.no_grad():
        clean = torch.cat([bridge(b.clean) for b in dl])
    results = {"_clean": clean}
    for g in graphs:
        pm = fp.patchable(bridge, factorized=g["factorized"], separate_qkv=g.get("separate_qkv"),
                          seq_len=g.get("seq_len"))
        keys = sorted(((e.name, e.seq_idx) for e in pm.graph.edges), key=lambda k: (k[0], -1 if k[1] is None else k[1]))
        res = {"edge_names": keys, "n_edges": pm.graph.n_edges, "cases": {}}
        for abl in ablations:
            cc = "corrupt" if abl in BATCH_SPECIFIC else None
            patches = fp.batch_src_ablations(pm, dl, abl, clean_corrupt=cc)
            for mname, setting in g["masks"].items():
                outs = []
                for batch in dl:
                    state = fp.patch_mode(pm, fp.init_state(pm), patches[batch.key], edges=setting.get("edges"))
                    if "values" in setting:
                        state = dataclasses.replace(state, masks=_masks(pm, setting["values"]))
                    with torch.no_grad():
                        outs.append(fp.patched_forward(pm, state, batch.clean))
                res["cases"][(abl, mname)] = torch.cat(outs)
        results[g["name"]] = res
    return results


def _masks(pm, values):
    import funcpatch as fp
    masks = {k: torch.zeros_like(v) for k, v in fp.init_state(pm).masks.items()}
    for e in pm.graph.edges:
        v = values.get((e.name, e.seq_idx))
        if v is not None:
            masks[e.dest.module_name][e.patch_idx] = v
    return masks


def graph_keys(model_path, g):
    import funcpatch as fp
    pm = fp.patchable(fp.models.from_hf(C.load_hf(model_path)), factorized=g["factorized"],
                      separate_qkv=g.get("separate_qkv"), seq_len=g.get("seq_len"))
    return [(e.name, e.seq_idx) for e in pm.graph.edges]


def run(shape, n_prompts, batch, seq, ablations, workdir, peer_py, graphs=None):
    model_path, data_path = os.path.join(workdir, "model.pt"), os.path.join(workdir, "data.pt")
    C.save_model(model_path, shape)
    C.make_data(data_path, shape["vocab_size"], n=n_prompts, seq=seq)
    d = torch.load(data_path)
    d["batch_size"] = batch
    torch.save(d, data_path)
    graphs = graphs or graph_specs(seq)
    for i, g in enumerate(graphs):
        g["masks"] = mask_settings(graph_keys(model_path, g), seed=100 + i)
    spec = {"model": model_path, "data": data_path, "graphs": graphs, "ablations": list(ablations)}
    spec_path, peer_out = os.path.join(workdir, "spec.pt"), os.path.join(workdir, "peer_out.pt")
    torch.save(spec, spec_path)
    p = subprocess.run([peer_py, os.path.join(HERE, "peer_autocircuit.py"), "crosscheck", spec_path, peer_out],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"auto-circuit crosscheck failed:\n{p.stderr[-3000:]}")
    peer = torch.load(peer_out, weights_only=False)
    mine = fp_outputs(model_path, data_path, graphs, ablations)
    return spec, mine, peer


def report(mine, peer, tol):
    lines, worst = [], 0.0
    clean = mine["_clean"]
    for gname, r in mine.items():
        if gname == "_clean":
            continue
        q = peer[gname]
        same = [tuple(k) for k in r["edge_names"]] == [tuple(k) for k in q["edge_names"]]
        lines.append(f"\n### {gname}: edges funcpatch {r['n_edges']} / auto-circuit {q['n_edges']}; "
                     f"same edge names: {'yes' if same else 'NO'}")
        if not same:
            a, b = set(map(tuple, r["edge_names"])), set(map(tuple, q["edge_names"]))
            lines.append(f"only funcpatch: {sorted(a - b, key=str)[:10]}; only auto-circuit: {sorted(b - a, key=str)[:10]}")
            worst = float("inf")
        lines.append("\n| ablation | mask setting | max abs diff funcpatch vs auto-circuit | effect of the patch: "
                     "max abs (patched - unpatched) |\n|---|---|---|---|")
        for (abl, mname), out in r["cases"].items():
            ref = q["cases"][(abl, mname)]
            diff = float((out - ref).abs().max())
            worst = max(worst, diff)
            flag = "" if diff <= tol else " **(differs)**"
            lines.append(f"| {abl} | {mname} | {diff:.2e}{flag} | {float((ref - clean).abs().max()):.2f} |")
    return "\n".join(lines), worst


def save_fixture(path, workdir, peer_py):
    """A small reference for tests/test_vs_autocircuit.py (< 200 KB)."""
    seq, n, b = 8, 4, 2  # small enough for a < 200 KB file
    graphs = [dict(name="factorized, separate_qkv", factorized=True, separate_qkv=True),
              dict(name="residual", factorized=False),
              dict(name=f"factorized, separate_qkv, seq_len={seq}", factorized=True, separate_qkv=True, seq_len=seq)]
    ablations = ("RESAMPLE", "ZERO", "TOKENWISE_MEAN_CLEAN")
    spec, mine, peer = run(FIXTURE, n, b, seq, ablations, workdir, peer_py, graphs)
    text, worst = report(mine, peer, 1e-4)
    print(text)
    blob = torch.load(spec["model"])
    d = torch.load(spec["data"])
    fixture = {
        "about": "auto-circuit 1.0.1 (TransformerLens 2.16.1 HookedTransformer, no weight processing) patched logits "
                 "on a seeded GPT-2; produced by `python benchmarks/crosscheck_autocircuit.py --fixture PATH`",
        "shape": blob["shape"], "state_dict": blob["state_dict"],
        "clean": d["clean"], "corrupt": d["corrupt"], "answers": d["answers"], "wrong_answers": d["wrong_answers"],
        "batch_size": b,
        "graphs": [], "cases": [],
    }
    logits = []
    for gi, g in enumerate(graphs):
        q = peer[g["name"]]
        names = sorted({k[0] for k in q["edge_names"]})
        pos = {k: i for i, k in enumerate(names)}
        seq_len = g.get("seq_len")
        fixture["graphs"].append({"name": g["name"], "factorized": g["factorized"],
                                  "separate_qkv": g.get("separate_qkv"), "seq_len": seq_len,
                                  "n_edges": q["n_edges"], "edge_names": names})
        for (abl, mname), out in q["cases"].items():
            setting = g["masks"][mname]
            values = None
            if "values" in setting:  # [edge name] or [edge name, position]; NaN = not set (mask 0)
                values = torch.full((len(names),) + (() if seq_len is None else (seq_len,)), float("nan"))
                for (name, seq_idx), v in setting["values"].items():
                    values[(pos[name],) + (() if seq_idx is None else (seq_idx,))] = v
            fixture["cases"].append({"graph": gi, "ablation": abl, "mask_setting": mname,
                                     "edges": setting.get("edges"), "values": values})
            logits.append(out.to(torch.float32))
    fixture["logits"] = torch.stack(logits)  # [case, prompt, pos, vocab]: one tensor keeps the file small
    torch.save(fixture, path)
    print(f"\nfixture: {path} ({os.path.getsize(path) / 1024:.0f} KiB), worst diff funcpatch vs auto-circuit {worst:.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="the benchmark workload's model (slower)")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--fixture", help="write the reference fixture for tests/test_vs_autocircuit.py here")
    ap.add_argument("--out", help="also write the markdown report here")
    args = ap.parse_args()
    C.setup_threads()
    peer_py = os.environ.get("AUTOCIRCUIT_PYTHON", "/work/venvs/ac/bin/python")
    if not os.path.exists(peer_py):
        raise SystemExit(f"auto-circuit interpreter {peer_py} not found: set AUTOCIRCUIT_PYTHON")
    workdir = tempfile.mkdtemp(prefix="funcpatch-crosscheck-")
    if args.fixture:
        return save_fixture(args.fixture, workdir, peer_py)
    if args.full:
        shape, n, b, seq = C.WORKLOAD, C.BATCH * C.N_BATCHES, C.BATCH, C.SEQ
    else:
        shape, n, b, seq = SMALL, 8, 4, 8
    _, mine, peer = run(shape, n, b, seq, ABLATIONS, workdir, peer_py)
    text, worst = report(mine, peer, args.tol)
    head = (f"# funcpatch vs auto-circuit 1.0.1: patched logits on the same weights\n\n"
            f"Model: GPT-2 shape {json.dumps(shape)}, {n} prompts of {seq} tokens in batches of {b}; "
            f"tolerance {args.tol:g}.\n")
    text = head + text + f"\n\n**Worst max abs difference over all cases: {worst:.2e}** " \
                         f"({'PASS' if worst <= args.tol else 'FAIL'})\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    sys.exit(0 if worst <= args.tol else 1)


if __name__ == "__main__":
    main()
