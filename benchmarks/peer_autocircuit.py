"""The auto-circuit 1.0.1 side of the benchmarks. Runs in auto-circuit's environment
(TransformerLens 2.16, which still has HookedTransformer), never imports funcpatch.

Modes (all print JSON lines on stdout; everything else goes to stderr):

  serve WORKDIR       read one JSON command per stdin line, answer one JSON line each,
                      so that run.py can interleave funcpatch and auto-circuit runs
  mem WORKDIR         peak memory of one patched forward, in a fresh process
  crosscheck IN OUT   patched logits for the cases in IN (see crosscheck_autocircuit.py)

The model: the transformers GPT2LMHeadModel saved by run.py, converted with
TransformerLens 2.16's ``convert_gpt2_weights`` and loaded without any weight
processing (no LayerNorm folding, no centring), so it computes exactly what the
transformers model (and funcpatch's bridge around it) computes.
"""

from __future__ import annotations

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
_real_stdout = sys.stdout
sys.stdout = sys.stderr  # libraries' prints must not corrupt the JSON channel

import torch  # noqa: E402

import common as C  # noqa: E402

warnings.filterwarnings("ignore")


# ---------------------------------------------------------------------------------------
# Model, data, masks


def hooked_from_hf(hf, *, split_qkv: bool = True):
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, d_head=c.n_embd // c.n_head,
        n_heads=c.n_head, d_mlp=4 * c.n_embd if c.n_inner is None else c.n_inner, d_vocab=c.vocab_size,
        act_fn=c.activation_function, normalization_type="LN", eps=c.layer_norm_epsilon,
        positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
        tokenizer_name=None, default_prepend_bos=False, device="cpu",
    )
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    model.set_use_attn_result(True)
    model.set_use_hook_mlp_in(True)
    if split_qkv:
        model.set_use_split_qkv_input(True)
    else:
        model.set_use_attn_in(True)
    return model.eval()


def build(model_path: str, *, factorized=True, separate_qkv=True, seq_len=None, slice_output="last_seq"):
    """(patchable auto-circuit model, HookedTransformer, the transformers model)."""
    from auto_circuit.utils.graph_utils import patchable_model
    hf = C.load_hf(model_path)
    ht = hooked_from_hf(hf, split_qkv=separate_qkv)
    pm = patchable_model(ht, factorized=factorized, slice_output=slice_output, seq_len=seq_len,
                         separate_qkv=separate_qkv, device=torch.device("cpu"))
    return pm, ht, hf


def dataloader(data_path: str):
    from auto_circuit.data import PromptDataLoader, PromptDataset
    d = torch.load(data_path)
    ds = PromptDataset(list(d["clean"]), list(d["corrupt"]), list(d["answers"]), list(d["wrong_answers"]))
    return PromptDataLoader(ds, seq_len=d["clean"].shape[1], diverge_idx=0, batch_size=d["batch_size"],
                            shuffle=False), d


def set_edge_values(pm, values) -> None:
    """Every edge's mask entry from ``{(edge name, seq_idx): value}`` (missing: 0)."""
    from auto_circuit.utils.graph_utils import set_all_masks
    set_all_masks(pm, 0.0)
    with torch.no_grad():
        for e in pm.edges:
            v = values.get((e.name, e.seq_idx))
            if v is not None:
                e.patch_mask(pm).data[e.patch_idx] = v


def by_edge_name(pm, scores) -> dict:
    """PruneScores (module -> tensor) as ``{(edge name, seq_idx): float}``."""
    return {(e.name, e.seq_idx): float(e.prune_score(scores)) for e in pm.edges}


def edge_keys(pm):
    return sorted(((e.name, e.seq_idx) for e in pm.edges), key=lambda k: (k[0], -1 if k[1] is None else k[1]))


# ---------------------------------------------------------------------------------------
# serve: the commands run.py interleaves with funcpatch's runs


class Server:
    def __init__(self, workdir: str):
        self.w = workdir
        self.pm = self.ht = self.dl = None
        self.acdc_pm = self.acdc_dl = None

    def path(self, name):
        return os.path.join(self.w, name)

    def cmd_init(self, _):
        from auto_circuit.types import AblationType
        from auto_circuit.utils.ablation_activations import src_ablations
        from auto_circuit.utils.graph_utils import patch_mode
        self.pm, self.ht, hf = build(self.path("model.pt"))
        self.dl, d = dataloader(self.path("data.pt"))
        self.batch = next(iter(self.dl))
        x = self.batch.clean
        with torch.no_grad():
            hf_logits = hf(x).logits
            ht_logits = self.ht(x)
        self.values = torch.load(self.path("edge_values.pt"))
        set_edge_values(self.pm, self.values)
        self.patch = src_ablations(self.pm, self.batch.corrupt, AblationType.RESAMPLE)
        with torch.no_grad(), patch_mode(self.pm, self.patch):
            patched = self.pm(x)
        torch.save({"logits": ht_logits, "patched": patched}, self.path("peer_logits.pt"))
        return {"n_edges": len(self.pm.edges), "n_srcs": len(self.pm.srcs), "n_dests": len(self.pm.dests),
                "hf_vs_hooked_max_abs_diff": float((hf_logits - ht_logits).abs().max()),
                "edge_names": [list(k) for k in edge_keys(self.pm)]}

    def cmd_patched(self, c):
        from auto_circuit.utils.graph_utils import patch_mode
        set_edge_values(self.pm, self.values)  # random values in (0, 1) on every edge
        x = self.batch.clean

        def run():
            with torch.no_grad(), patch_mode(self.pm, self.patch):
                self.pm(x)
        return {"times": [C.timed(run) for _ in range(c.get("n", 1))]}

    def cmd_unpatched(self, c):
        x = self.batch.clean

        def run():
            with torch.no_grad():
                self.ht(x)
        return {"times": [C.timed(run) for _ in range(c.get("n", 1))]}

    def cmd_eap(self, c):
        from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores
        out = {}

        def run():
            out["s"] = mask_gradient_prune_scores(self.pm, self.dl, None, grad_function="logit",
                                                  answer_function="avg_diff", mask_val=0.0)
        times = [C.timed(run) for _ in range(c.get("n", 1))]
        if c.get("save"):
            torch.save(by_edge_name(self.pm, out["s"]), self.path("peer_eap.pt"))
        return {"times": times}

    def cmd_acdc_init(self, c):
        self.acdc_pm, _, _ = build(self.path(c.get("model", "acdc_model.pt")))
        self.acdc_dl, _ = dataloader(self.path(c.get("data", "acdc_data.pt")))
        return {"n_edges": len(self.acdc_pm.edges)}

    def cmd_acdc(self, c):
        from auto_circuit.prune_algos.ACDC import acdc_prune_scores
        out = {}

        def run():
            out["s"] = acdc_prune_scores(self.acdc_pm, self.acdc_dl, None, tao_exps=c["tao_exps"],
                                         tao_bases=c["tao_bases"])
        times = [C.timed(run) for _ in range(c.get("n", 1))]
        if c.get("save"):
            torch.save(by_edge_name(self.acdc_pm, out["s"]), self.path("peer_acdc.pt"))
        return {"times": times}

    def cmd_run_circuits(self, c):
        from auto_circuit.prune import run_circuits
        scores_by_name = torch.load(self.path("circuit_scores.pt"))
        scores = self.pm.new_prune_scores()
        for e in self.pm.edges:
            scores[e.dest.module_name][e.patch_idx] = scores_by_name[(e.name, e.seq_idx)]

        def run():
            run_circuits(self.pm, self.dl, c["sizes"], scores)
        return {"times": [C.timed(run) for _ in range(c.get("n", 1))]}

    def loop(self):
        import json
        C.emit({"ready": True, "torch": torch.__version__})
        for line in sys.stdin:
            c = json.loads(line)
            if c["cmd"] == "quit":
                break
            try:
                res = getattr(self, "cmd_" + c["cmd"])(c)
                res["ok"] = True
            except Exception as e:  # report, keep serving
                import traceback
                traceback.print_exc()
                res = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            C.emit(res)


# ---------------------------------------------------------------------------------------
# mem: one patched forward in a fresh process


def mem(workdir: str):
    from auto_circuit.types import AblationType
    from auto_circuit.utils.ablation_activations import src_ablations
    from auto_circuit.utils.graph_utils import patch_mode
    pm, _, _ = build(os.path.join(workdir, "model.pt"))
    dl, _ = dataloader(os.path.join(workdir, "data.pt"))
    batch = next(iter(dl))
    set_edge_values(pm, torch.load(os.path.join(workdir, "edge_values.pt")))
    patch = src_ablations(pm, batch.corrupt, AblationType.RESAMPLE)

    def run():
        with torch.no_grad(), patch_mode(pm, patch):
            pm(batch.clean)
    run()  # warm-up: one-time allocations are not the forward's
    C.emit(C.peak_rss_delta_mb(run))


# ---------------------------------------------------------------------------------------
# crosscheck: patched outputs for given graphs, ablations and mask settings


def crosscheck(in_path: str, out_path: str):
    from auto_circuit.types import AblationType
    from auto_circuit.utils.ablation_activations import batch_src_ablations
    from auto_circuit.utils.graph_utils import patch_mode
    spec = torch.load(in_path, weights_only=False)
    dl, _ = dataloader(spec["data"])
    results = {}
    for g in spec["graphs"]:
        pm, _, _ = build(spec["model"], factorized=g["factorized"], separate_qkv=g.get("separate_qkv", True),
                         seq_len=g.get("seq_len"), slice_output=None)
        res = {"edge_names": edge_keys(pm), "n_edges": len(pm.edges), "cases": {}}
        for abl in spec["ablations"]:
            at = AblationType[abl]
            cc = "corrupt" if at in (AblationType.RESAMPLE, AblationType.BATCH_TOKENWISE_MEAN,
                                     AblationType.BATCH_ALL_TOK_MEAN) else None
            patches = batch_src_ablations(pm, dl, at, clean_corrupt=cc)
            for mname, setting in g["masks"].items():
                # a setting is {"values": {(edge name, seq_idx): value}} or {"edges": [edge names]}
                # (the latter through patch_mode's own edges argument: those 1, all others 0)
                edges = setting.get("edges")
                if edges is None:
                    set_edge_values(pm, setting["values"])
                outs = []
                for batch in dl:
                    with torch.no_grad(), patch_mode(pm, patches[batch.key], edges=edges):
                        outs.append(pm(batch.clean))
                res["cases"][(abl, mname)] = torch.cat(outs)
        results[g["name"]] = res
    torch.save(results, out_path)
    C.emit({"ok": True})


if __name__ == "__main__":
    C.setup_threads()
    mode = sys.argv[1]
    if mode == "serve":
        Server(sys.argv[2]).loop()
    elif mode == "mem":
        mem(sys.argv[2])
    elif mode == "crosscheck":
        crosscheck(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown mode {mode!r}; valid: serve, mem, crosscheck")
