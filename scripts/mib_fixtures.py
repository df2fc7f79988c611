"""Produce tests/data/mib/: EAP-IG's and MIB's own outputs on the zoo's ioi model.

The fixtures that tests/test_mib.py checks funcpatch against come from running the
reference code itself (GitHub hannamw/EAP-IG and hannamw/MIB-circuit-track, which are not
on the package index). This script only *calls* their code; it contains none of it.

Two stages, two environments:

1. ``ours`` (funcpatch's environment): funcpatch writes a circuit in both MIB formats::

       PYTHONPATH=. python scripts/mib_fixtures.py ours

2. ``theirs`` (a separate venv: ``pip install torch==2.13.0 transformer-lens==2.16.1
   pandas "numpy>=2"``, with checkouts of both repositories)::

       PYTHONPATH=EAP-IG/src:MIB-circuit-track python scripts/mib_fixtures.py theirs

   It builds a HookedTransformer with the zoo ioi model's weights (TransformerLens 2.16's
   ``convert_gpt2_weights``, no weight processing: same logits as transformers), and with
   EAP-IG/MIB's code: attributes EAP and EAP-IG-inputs (5 steps), writes the EAP-IG graph
   with ``Graph.to_json``/``to_pt`` after ``apply_topn(40)``, runs MIB's
   ``evaluate_area_under_curve`` for every intervention, and reads funcpatch's files of
   stage 1 with ``Graph.from_json``/``from_pt`` and MIB's ``load_graph_from_json``/``_pt``.

Their score and mean matrices are allocated on ``'cuda'``; on a CPU machine this script
redirects ``torch.zeros(..., device='cuda')`` to the CPU (nothing else changes).
Prompts: the zoo ioi dataset's first 16 pairs (evaluated, 2 batches of 8) and the next 32
(the mean interventions' dataset, 4 batches of 8), tokenized as ``<bos>`` + words.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "mib"
ZOO = ROOT / "funcpatch" / "zoo" / "ioi"
N_EVAL, N_MEAN, BATCH, IG_STEPS, TOPN = 16, 32, 8, 5, 40
INTERVENTIONS = ("patching", "zero", "mean", "mean-positional")


def prompts():
    return json.loads((ZOO / "dataset.json").read_text())["prompts"]


def ours():
    """funcpatch writes a circuit (seeded scores, top 30 edges in the graph) as .json and .pt."""
    import funcpatch as fp
    from funcpatch import zoo

    hf, _ = zoo.load_hf("ioi")
    pm = fp.patchable(fp.models.from_hf(hf))
    scores = {k: v - 0.5 for k, v in fp.algos.random_scores(pm, seed=0).items()}
    in_graph, _ = fp.circuit_masks(pm, scores, 30)
    OUT.mkdir(parents=True, exist_ok=True)
    for suffix in ("json", "pt"):
        fp.mib.save(pm, scores, OUT / f"ours.{suffix}", in_graph={k: v.bool() for k, v in in_graph.items()})


def _hooked(hf, tokenizer):
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, d_head=c.n_embd // c.n_head,
        n_heads=c.n_head, d_mlp=c.n_inner, d_vocab=c.vocab_size, act_fn=c.activation_function,
        normalization_type="LN", eps=c.layer_norm_epsilon, original_architecture="GPT2LMHeadModel",
        tokenizer_name=None, device="cpu")
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    model.set_tokenizer(tokenizer, default_padding_side="right")
    model.cfg.use_split_qkv_input = True
    model.cfg.use_attn_result = True
    model.cfg.use_hook_mlp_in = True
    return model.eval()


def _edges(graph):
    return {name: [float(e.score), bool(e.in_graph)] for name, e in graph.edges.items()}


def theirs():
    from functools import partial

    from transformers import AutoModelForCausalLM, AutoTokenizer

    zeros = torch.zeros

    def cpu_zeros(*args, **kwargs):  # EAP-IG allocates its matrices on 'cuda'
        if str(kwargs.get("device")) == "cuda":
            kwargs["device"] = "cpu"
        return zeros(*args, **kwargs)

    torch.zeros = cpu_zeros

    from eap.attribute import attribute
    from eap.graph import Graph
    from MIB_circuit_track.circuit_loading import load_graph_from_json, load_graph_from_pt
    from MIB_circuit_track.evaluation import evaluate_area_under_curve
    from MIB_circuit_track.metrics import logit_diff

    hf = AutoModelForCausalLM.from_pretrained(ZOO, local_files_only=True, attn_implementation="eager").float().eval()
    tok = AutoTokenizer.from_pretrained(ZOO, local_files_only=True)
    model = _hooked(hf, tok)

    ps = prompts()
    ids = lambda w: tok.convert_tokens_to_ids(w)  # noqa: E731

    def batches(rows):
        return [([p["clean"] for p in rows[i:i + BATCH]], [p["corrupt"] for p in rows[i:i + BATCH]],
                 [[ids(p["answers"][0]), ids(p["wrong_answers"][0])] for p in rows[i:i + BATCH]])
                for i in range(0, len(rows), BATCH)]

    evals, means = batches(ps[:N_EVAL]), batches(ps[N_EVAL:N_EVAL + N_MEAN])
    # their tokenization must be <bos> + the words, as funcpatch's loader makes it
    got = model.to_tokens(evals[0][0], prepend_bos=True, padding_side="right")
    want = torch.tensor([[tok.bos_token_id] + tok(p, add_special_tokens=False).input_ids for p in evals[0][0]])
    assert torch.equal(got, want), (got, want)
    logits_ht = model(got)
    assert torch.allclose(logits_ht, hf(want).logits, atol=1e-4), "HookedTransformer != transformers"

    metric = partial(logit_diff, mean=False, loss=False)  # as MIB's run_evaluation.py
    attribution_metric = partial(logit_diff, mean=True, loss=True)  # as MIB's run_attribution.py
    OUT.mkdir(parents=True, exist_ok=True)
    out = {"prompts": {"eval": [0, N_EVAL], "mean": [N_EVAL, N_EVAL + N_MEAN], "batch_size": BATCH},
           "ig_steps": IG_STEPS, "topn": TOPN}

    g_eap = Graph.from_model(model)
    attribute(model, g_eap, evals, attribution_metric, method="EAP", quiet=True)
    g_eap.to_pt(str(OUT / "eap_scores.pt"))

    g = Graph.from_model(model)
    attribute(model, g, evals, attribution_metric, method="EAP-IG-inputs", ig_steps=IG_STEPS, quiet=True)
    g.apply_topn(TOPN, absolute=True)
    g.to_json(str(OUT / "eapig.json"))
    g.to_pt(str(OUT / "eapig.pt"))
    out["eapig_edges"] = _edges(g)
    out["eapig_n_in_graph"] = int(g.in_graph.sum())

    # a hand-made case for the prune: a connected chain and dangling edges, one two steps deep
    case = {"input->a0.h0<q>": 5., "a0.h0->m0": -4., "m0->logits": 3., "input->a1.h2<v>": 2.5,
            "a0.h3->a1.h0<k>": 2., "input->a0.h5<v>": 1.2, "a0.h5->a1.h5<q>": 1.1}
    graph = Graph.from_model(model)
    for name, v in case.items():
        graph.edges[name].score = v
    graph.apply_topn(len(case), absolute=True, prune=True)
    after_topn = sorted(n for n, e in graph.edges.items() if e.in_graph)
    graph.prune()  # as evaluate_graph does before it runs the circuit
    out["prune_case"] = {"scores": case, "n": len(case), "after_topn": after_topn,
                         "evaluated": sorted(n for n, e in graph.edges.items() if e.in_graph)}

    runs = [dict(intervention=i) for i in INTERVENTIONS] + [
        dict(intervention="patching", absolute=False), dict(intervention="zero", log_scale=True)]
    out["evaluate"] = []
    for kw in runs:
        graph = Graph.from_json(str(OUT / "eapig.json"))
        mean_loader = means if "mean" in kw["intervention"] else None
        res = evaluate_area_under_curve(model, graph, evals, metric, quiet=True, intervention_dataloader=mean_loader,
                                        **{"absolute": True, **kw})
        wec, area_under, area_from_1, average, faith = res
        out["evaluate"].append({"kwargs": kw, "weighted_edge_counts": wec, "area_under": area_under,
                                "area_from_1": area_from_1, "average": average, "faithfulnesses": faith})

    out["ours_read"] = {}
    for suffix, loaders in (("json", (Graph.from_json, load_graph_from_json)),
                            ("pt", (Graph.from_pt, load_graph_from_pt))):
        path = OUT / f"ours.{suffix}"
        if not path.exists():
            continue
        for loader in loaders:
            graph = loader(str(path))
            out["ours_read"][f"{loader.__module__}.{loader.__qualname__}({suffix})"] = {
                "edges": _edges(graph), "nodes_in_graph": graph.nodes_in_graph.tolist()}
    (OUT / "theirs.json").write_text(json.dumps(out))


if __name__ == "__main__":
    stages = {"ours": ours, "theirs": theirs}
    if len(sys.argv) != 2 or sys.argv[1] not in stages:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(stages)}}}")
    stages[sys.argv[1]]()
