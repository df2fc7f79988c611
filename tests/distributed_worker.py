"""Every data-parallel algorithm on one small workload; run by tests/test_distributed.py
in the test process (the single-process reference) and under ``torchrun`` (each rank
saves its results to ``<out>/rank<r>.pt``).

Usage: ``torchrun --standalone --nproc-per-node 2 tests/distributed_worker.py OUT``
"""

import os
import sys

import torch

import funcpatch as fp
from conftest import TRANSFORMERS, tokens

N_PROMPTS, BATCH, SEQ = 13, 3, 5  # 5 batches (the last of 1 prompt): uneven over 2 ranks


def workload():
    model = TRANSFORMERS["gpt2-bridge"][1]()
    pm = fp.patchable(model, slice_output="last_seq")
    clean, corrupt = tokens(1, N_PROMPTS, SEQ), tokens(2, N_PROMPTS, SEQ)
    answers = tokens(3, N_PROMPTS, 1)
    wrong = (answers + 7) % 50
    loader = fp.PromptDataLoader(fp.PromptDataset(clean, corrupt, answers, wrong), seq_len=None,
                                 batch_size=BATCH)
    return pm, loader


def run_all():
    """``{name: result}`` of every algorithm that splits its work."""
    torch.manual_seed(0)
    pm, loader = workload()
    algos = fp.algos
    out = {}
    out["eap"] = algos.eap(pm, loader, progress=False)
    out["eap_per_prompt"] = algos.eap(pm, loader, per_prompt=True, progress=False)
    out["mask_ig"] = algos.eap_ig(pm, loader, samples=2, variant="mask", progress=False)
    out["inputs_ig"] = algos.eap_ig(pm, loader, samples=2, variant="inputs", progress=False)
    out["eap_tokenwise_mean"] = algos.eap(pm, loader, ablation_type="tokenwise_mean_clean_and_corrupt",
                                          clean_corrupt=None, progress=False)
    out["tokenwise_mean"] = fp.src_ablations(pm, loader, "tokenwise_mean_corrupt")
    out["exact"] = algos.exact_patching(pm, loader, batch_edges=128, progress=False)
    circuits = fp.run_circuits(pm, loader, [0, 5, 20, pm.graph.n_edges], out["eap"], progress=False)
    out["circuits"] = {size: [outs[k] for k in sorted(outs)] for size, outs in circuits.items()}
    out["circuit_keys"] = {size: list(outs) for size, outs in circuits.items()}
    runs = algos.acdc_runs(pm, loader, [1e-4, 1e-3, 1e-2], progress=False)
    out["acdc"] = [([e.name for e in r.removed], r.faithfulness) for r in runs]
    sp = algos.subnetwork_probing_run(pm, loader, epochs=2, learning_rate=0.1, progress=False)
    out["probing_masks"] = sp.masks
    out["probing_losses"] = torch.tensor(sp.losses)
    out["circuit_probing"] = algos.circuit_probing(pm, loader, circuit_sizes=[5, 20], epochs=2, progress=False)
    import funcpatch.mib.evaluation as mib_eval
    calls = []
    real = mib_eval.patched_forward
    mib_eval.patched_forward = lambda *a, **k: calls.append(1) or real(*a, **k)  # counts this rank's forwards
    try:
        for intervention in ("patching", "mean-positional"):  # the second also splits the means' batches
            res = fp.mib.evaluate(pm, loader, out["eap"], intervention=intervention,
                                  intervention_dataloader=loader if intervention != "patching" else None)
            out[f"mib_{intervention}"] = list(res.faithfulnesses) + [res.area_under, res.area_from_1]
    finally:
        mib_eval.patched_forward = real
    out["mib_forwards"] = len(calls)
    return out


DISCOVER = ["discover", "--algo", "eap", "--prompts", "8", "--batch-size", "4", "--edges", "12", "--quiet"]


def discover(out_dir):
    """``funcpatch discover`` into ``out_dir``: (exit status, stdout, stderr)."""
    import contextlib
    import io

    from funcpatch import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(DISCOVER + ["--out", str(out_dir)])
    return code, out.getvalue(), err.getvalue()


if __name__ == "__main__":
    from funcpatch import distributed

    torch.set_num_threads(1)
    assert distributed.init_from_env()  # torchrun's environment: gloo on a CPU
    rank = distributed.rank_world()[0]
    result = run_all()
    pm, loader = workload()
    shuffled = list(loader)[::-1] if rank else list(loader)  # rank 1 sees the batches in another order
    try:
        fp.algos.eap(pm, shuffled, progress=False)
        result["mismatch"] = "no error"
    except ValueError as e:
        result["mismatch"] = str(e)
    result["discover"] = discover(os.path.join(sys.argv[1], "discover"))  # every rank runs it; rank 0 writes
    torch.save(result, os.path.join(sys.argv[1], f"rank{rank}.pt"))
