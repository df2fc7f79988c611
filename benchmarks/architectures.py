"""Today's architectures on funcpatch's own forward: ratios in one process.

    python benchmarks/architectures.py [--runs 3] [--reps 9]

Workload of issue 10: a Llama-shaped model with grouped-query attention (4 layers,
d_model 256, 8 query heads sharing 2 key/value heads, gated MLP 688, vocab 1000, seeded
random weights, transformers' default attention), batches of 16 x 32, random mask values
on every edge. Rows:

- patched forward (no grad) / transformers' own forward, per-query-head graph (MIB's) and
  the grouped graph (``grouped_kv=True``);
- EAP over 2 batches / its floor (per batch: one corrupt forward, one forward/backward of
  the transformers model on the clean prompts, gradients w.r.t. activations only);
- grouped / per-query-head, for both;
- GPT-2's patched forward / its bridge's forward on the GPT-2 benchmark workload of
  ``benchmarks/run.py`` (the regression check; ``run.py`` has the full comparison).

Calls are interleaved round-robin in rotating order, each timed right after an untimed
call of the same function (``common.timed_warm``); each run reports medians, and the
table gives the range of the medians over ``--runs`` runs. Results go to
``benchmarks/architectures_results.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
import common as C  # noqa: E402

LLAMA = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=688, vocab_size=1000, max_position_embeddings=64)


def batches(vocab, seed=C.SEED + 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(C.N_BATCHES):
        clean = torch.randint(0, vocab, (C.BATCH, C.SEQ), generator=g)
        corrupt = torch.randint(0, vocab, (C.BATCH, C.SEQ), generator=g)
        ans, wrong = torch.randint(0, vocab, (C.BATCH, 1), generator=g), torch.randint(0, vocab, (C.BATCH, 1), generator=g)
        out.append((clean, corrupt, ans, wrong))
    return out


def loader(data):
    import funcpatch as fp
    cols = [torch.cat([b[i] for b in data]) for i in range(4)]
    return fp.PromptDataLoader(fp.PromptDataset(*cols), seq_len=C.SEQ, diverge_idx=0, batch_size=C.BATCH)


def random_state(pm, corrupt, seed=C.SEED + 2):
    import dataclasses
    import funcpatch as fp
    state = fp.patch_mode(pm, fp.init_state(pm), fp.src_ablations(pm, corrupt))
    g = torch.Generator().manual_seed(seed)
    return dataclasses.replace(state, masks={k: torch.rand(v.shape, generator=g) for k, v in state.masks.items()})


def eap_floor(hf, embed, data):
    for clean, corrupt, ans, wrong in data:
        with torch.no_grad():
            hf(corrupt)
        emb = embed(clean).detach().requires_grad_()
        logits = hf(inputs_embeds=emb).logits[:, -1]
        (-(logits.gather(1, ans) - logits.gather(1, wrong)).mean()).backward()


def one_run(reps: int):
    import funcpatch as fp
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(C.SEED)
    hf = LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()
    data = batches(LLAMA["vocab_size"])
    clean, corrupt = data[0][0], data[0][1]
    dl = loader(data)
    per_head = fp.patchable(hf, slice_output="last_seq")
    grouped = fp.patchable(hf, slice_output="last_seq", grouped_kv=True)
    s_head, s_group = random_state(per_head, corrupt), random_state(grouped, corrupt)
    # GPT-2: the benchmark workload, through its bridge
    gpt2 = C.build_hf(C.WORKLOAD)
    bridge = fp.models.from_hf(gpt2)
    pm2 = fp.patchable(bridge)
    x2 = torch.randint(0, C.WORKLOAD["vocab_size"], (C.BATCH, C.SEQ), generator=torch.Generator().manual_seed(5))
    s2 = random_state(pm2, torch.randint(0, C.WORKLOAD["vocab_size"], (C.BATCH, C.SEQ),
                                         generator=torch.Generator().manual_seed(6)))

    def nograd(f):
        def g():
            with torch.no_grad():
                return C.timed_warm(f)
        return g

    fns = {
        "hf forward": nograd(lambda: hf(clean)),
        "patched per-head": nograd(lambda: fp.patched_forward(per_head, s_head, clean)),
        "patched grouped": nograd(lambda: fp.patched_forward(grouped, s_group, clean)),
        "eap floor": lambda: C.timed_warm(lambda: eap_floor(hf, hf.model.embed_tokens, data)),
        "eap per-head": lambda: C.timed_warm(lambda: fp.algos.eap(per_head, dl, progress=False)),
        "eap grouped": lambda: C.timed_warm(lambda: fp.algos.eap(grouped, dl, progress=False)),
        "gpt2 bridge forward": nograd(lambda: bridge(x2)),
        "gpt2 patched": nograd(lambda: fp.patched_forward(pm2, s2, x2)),
    }
    times = {k: [] for k in fns}
    names = list(fns)
    for i in range(reps):
        for k in names[i % len(names):] + names[:i % len(names)]:
            times[k].append(fns[k]())
    med = {k: C.median(v) for k, v in times.items()}
    return med, per_head.graph.n_edges, grouped.graph.n_edges


ROWS = [
    ("patched forward / transformers forward (per-query-head graph)", "patched per-head", "hf forward", "<= 1.5x"),
    ("patched forward / transformers forward (grouped_kv graph)", "patched grouped", "hf forward", "(info)"),
    ("EAP, 2 batches / floor (per-query-head graph)", "eap per-head", "eap floor", "<= 1.5x"),
    ("EAP, 2 batches / floor (grouped_kv graph)", "eap grouped", "eap floor", "(info)"),
    ("grouped / per-query-head: patched forward", "patched grouped", "patched per-head", "< 1x"),
    ("grouped / per-query-head: EAP", "eap grouped", "eap per-head", "< 1x"),
    ("GPT-2 workload: patched forward / bridge forward", "gpt2 patched", "gpt2 bridge forward", "<= 1.5x (was 1.30-1.42x)"),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "architectures_results.md"))
    a = ap.parse_args()
    C.setup_threads()
    warnings.simplefilter("ignore")
    runs = []
    for r in range(a.runs):
        med, n_head, n_group = one_run(a.reps)
        runs.append(med)
        print(f"run {r + 1}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in med.items()), flush=True)
    lines = [f"# Architectures benchmark ({time.strftime('%Y-%m-%d')}, {C.cpu_model() if hasattr(C, 'cpu_model') else 'CPU'}"
             f", {C.THREADS} threads, torch {torch.__version__})", "",
             f"Llama-shaped GQA model: 4 layers, d_model 256, 8 query heads / 2 key-value heads, gated MLP 688, vocab "
             f"1000, batch {C.BATCH} x {C.SEQ}, random masks on every edge ({n_head} edges per-query-head, "
             f"{n_group} grouped). {a.runs} runs of {a.reps} interleaved calls each; ranges of the per-run medians.", "",
             "| measurement | ratio (range of medians) | target |", "|---|---|---|"]
    for label, num, den, target in ROWS:
        ratios = [m[num] / m[den] for m in runs]
        lines.append(f"| {label} | {min(ratios):.2f}-{max(ratios):.2f}x | {target} |")
    lines += ["", "Medians per run (ms): " + "; ".join(
        ", ".join(f"{k} {v * 1e3:.1f}" for k, v in m.items()) for m in runs)]
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
