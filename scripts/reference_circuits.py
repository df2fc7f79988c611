"""Reference circuits of the zoo models, found by brute force (``fp.algos.exact_patching``).

For each zoo model: the true effect on the logit difference of patching each edge alone
(resample ablation from the corrupt prompts, 64 training prompts); the reference circuit
is every edge whose |effect| is at least ``FRACTION`` of the largest. Written to
``funcpatch/zoo/<name>/reference_circuit.json``; for a model with grouped-query attention
also in the ``grouped_kv=True`` graph (``A{l}.kv{g}.K/V`` destinations), to
``reference_circuit_grouped_kv.json``.
Run: ``python scripts/reference_circuits.py [NAME ...]`` (default: every zoo model).
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import funcpatch as fp  # noqa: E402
from funcpatch import zoo  # noqa: E402
from funcpatch.datasets import load_datasets_from_json  # noqa: E402

FRACTION = 0.1
N_PROMPTS = 64


def file_name(grouped_kv: bool) -> str:
    return "reference_circuit_grouped_kv.json" if grouped_kv else "reference_circuit.json"


def reference(name: str, grouped_kv: bool = False) -> dict:
    hf, tok = zoo.load_hf(name)
    pm = fp.patchable(fp.models.from_hf(hf, tok), slice_output="last_seq", grouped_kv=grouped_kv)
    train, _ = load_datasets_from_json(tok, zoo.dataset_path(name), batch_size=32,
                                       train_test_size=(N_PROMPTS, 8), random_seed=0)
    scores = fp.algos.exact_patching(pm, train, progress=False)
    effects = {e.name: float(e.prune_score(scores)) for e in pm.graph.edges}
    top = max(abs(v) for v in effects.values())
    edges = sorted((n for n, v in effects.items() if abs(v) >= FRACTION * top), key=lambda n: -abs(effects[n]))
    return {"model": name, "rule": f"|exact patching effect| >= {FRACTION} x max, RESAMPLE, {N_PROMPTS} prompts",
            "edges": edges, "effects": effects}


if __name__ == "__main__":
    for name in sys.argv[1:] or zoo.list_models():
        config = zoo.load_hf(name)[0].config
        grouped = getattr(config, "num_key_value_heads", None) not in (None, config.num_attention_heads)
        for grouped_kv in (False, True) if grouped else (False,):
            torch.manual_seed(0)
            ref = reference(name, grouped_kv)
            path = zoo.model_dir(name) / file_name(grouped_kv)
            path.write_text(json.dumps(ref, indent=1) + "\n")
            print(f"{name}: {len(ref['edges'])} of {len(ref['effects'])} edges -> {path}")
