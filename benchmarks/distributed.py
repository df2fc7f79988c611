"""Data-parallel EAP (issue 13): 2 processes x 1 thread under torchrun against 1 process x 1 thread.

The benchmark workload (``common.WORKLOAD``: 4 layers, d_model 256, batches of 16 x 32
tokens), 8 batches. Each process times one ``fp.algos.eap`` call after a warm-up call;
the parallel time is the slowest rank's (its call ends after the gather, so it includes
the communication). On a shared machine the ranks may not get a core each, so it also
reports the CPU time of the busiest rank (the speed-up with a free core per rank). Each
rank also reports the bytes it contributes to the gather per
batch (the scores of one batch), from which ``README.md`` estimates the scaling to k GPUs.

Usage: ``python benchmarks/distributed.py [--ranks 2] [--repeats 3]``
(prints one JSON line: times, speed-up, bytes per batch).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common as C  # noqa: E402

N_BATCHES = 8


def workload():
    import funcpatch as fp
    hf = C.build_hf(C.WORKLOAD)
    pm = fp.patchable(fp.models.from_hf(hf), slice_output="last_seq")
    g = torch.Generator().manual_seed(C.SEED + 1)
    n, vocab = C.BATCH * N_BATCHES, C.WORKLOAD["vocab_size"]
    clean = torch.randint(0, vocab, (n, C.SEQ), generator=g)
    corrupt = clean.clone()
    corrupt[:, -1] = (corrupt[:, -1] + 1) % vocab
    answers = torch.randint(0, vocab, (n, 1), generator=g)
    loader = fp.PromptDataLoader(fp.PromptDataset(clean, corrupt, answers, (answers + 1) % vocab), seq_len=None,
                                 batch_size=C.BATCH)
    return pm, loader


def child(out_path: str, repeats: int) -> None:
    import funcpatch as fp
    from funcpatch import distributed

    torch.set_num_threads(1)
    distributed.init_from_env()
    pm, loader = workload()
    times, cpu = [], []
    for _ in range(repeats + 1):  # the first call warms up
        if distributed.rank_world()[1] > 1:
            torch.distributed.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        scores = fp.algos.eap(pm, loader, progress=False)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    rank, world = distributed.rank_world()
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump({"rank": rank, "world": world, "times": times[1:], "cpu": cpu[1:],
                   "bytes_per_batch": distributed.payload_bytes(scores)}, f)


def run(ranks: int, repeats: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r")
        me = [os.path.abspath(__file__), "--child", out, "--repeats", str(repeats)]
        cmd = [sys.executable] + me if ranks == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] + me
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        per_rank = [json.load(open(f"{out}.{r}")) for r in range(ranks)]
    # per repeat, the slowest rank; then the median over repeats
    slowest = [max(r["times"][i] for r in per_rank) for i in range(repeats)]
    busiest = [max(r["cpu"][i] for r in per_rank) for i in range(repeats)]
    return {"seconds": C.median(slowest), "cpu_seconds": C.median(busiest),
            "bytes_per_batch": per_rank[0]["bytes_per_batch"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", default=None)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.repeats)
        return
    one = run(1, a.repeats)
    many = run(a.ranks, a.repeats)
    print(json.dumps({"batches": N_BATCHES, "batch": C.BATCH, "seq": C.SEQ, "ranks": a.ranks,
                      "one_process_s": one["seconds"], "parallel_s": many["seconds"],
                      "speedup": one["seconds"] / many["seconds"],
                      # CPU time of the busiest rank: the speed-up with a free core per rank
                      "one_process_cpu_s": one["cpu_seconds"], "busiest_rank_cpu_s": many["cpu_seconds"],
                      "cpu_speedup": one["cpu_seconds"] / many["cpu_seconds"],
                      "bytes_per_batch": many["bytes_per_batch"]}))


if __name__ == "__main__":
    main()
