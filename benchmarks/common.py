"""Shared by both sides of the benchmark (funcpatch's environment and auto-circuit's).

Imports only torch and transformers, which both environments have, so the two
processes build *the same* model from one saved file and read one set of token
tensors. Nothing here imports funcpatch or auto-circuit.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Dict, List, Optional, Tuple

import torch

# The benchmark workload of the issues: GPT-2 shape, random weights, fixed seed.
WORKLOAD = dict(n_layer=4, n_embd=256, n_head=8, vocab_size=1000, n_positions=64)
BATCH, SEQ, N_BATCHES = 16, 32, 2
SEED = 0
# ACDC runs one (partial) forward per edge in auto-circuit: on the full workload
# (1519 edges) one tau takes minutes there, so the ACDC row uses this smaller model.
ACDC_WORKLOAD = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64)
ACDC_TAUS = (1e-3, 1e-2)
# on request (run.py --only acdc_wide): the full workload's width, 2 layers, one tau
ACDC_WIDE_WORKLOAD = dict(n_layer=2, n_embd=256, n_head=8, vocab_size=1000, n_positions=64)
ACDC_WIDE_TAUS = (1e-2,)
THREADS = 2


def gpt2_config(**shape):
    from transformers import GPT2Config
    # eager attention: the same arithmetic in every copy (sdpa may pick another kernel)
    cfg = GPT2Config(**shape, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "eager"
    return cfg


def build_hf(shape: dict, seed: int = SEED):
    """A GPT2LMHeadModel with seeded random weights (eval mode)."""
    from transformers import GPT2LMHeadModel
    torch.manual_seed(seed)
    return GPT2LMHeadModel(gpt2_config(**shape)).eval()


def save_model(path: str, shape: dict, seed: int = SEED) -> None:
    hf = build_hf(shape, seed)
    torch.save({"shape": dict(shape), "seed": seed,
                "state_dict": {k: v.detach().clone() for k, v in hf.state_dict().items()}}, path)


def load_hf(path: str):
    """A fresh GPT2LMHeadModel with the saved weights (every call gives a new copy)."""
    from transformers import GPT2LMHeadModel
    blob = torch.load(path, weights_only=False)
    hf = GPT2LMHeadModel(gpt2_config(**blob["shape"])).eval()
    missing, unexpected = hf.load_state_dict(blob["state_dict"], strict=False)
    # GPT-2's causal-mask buffers are not always in the state dict; nothing else may be missing
    assert not unexpected and all(".attn.bias" in k or ".attn.masked_bias" in k for k in missing), (missing, unexpected)
    return hf


def make_data(path: str, vocab: int, n: int = BATCH * N_BATCHES, seq: int = SEQ, seed: int = SEED + 1,
              n_diff: int = 3) -> None:
    """Random prompts; each corrupt prompt differs from its clean one at ``n_diff``
    random positions (always including the last); single answer / wrong-answer tokens."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (n, seq), generator=g)
    corrupt = clean.clone()
    for i in range(n):
        pos = torch.cat([torch.randperm(seq - 1, generator=g)[: n_diff - 1], torch.tensor([seq - 1])])
        corrupt[i, pos] = (clean[i, pos] + torch.randint(1, vocab, (n_diff,), generator=g)) % vocab
    answers = torch.randint(0, vocab, (n, 1), generator=g)
    wrong = (answers + torch.randint(1, vocab, (n, 1), generator=g)) % vocab
    torch.save({"clean": clean, "corrupt": corrupt, "answers": answers, "wrong_answers": wrong,
                "batch_size": BATCH}, path)


def random_edge_values(names: List[Tuple[str, Optional[int]]], seed: int = SEED + 2) -> Dict:
    """A value in (0, 1) for every edge ``(name, seq_idx)``; keyed by name so that both
    libraries set the same edge to the same value whatever their mask layout."""
    g = torch.Generator().manual_seed(seed)
    names = sorted(names, key=lambda k: (k[0], -1 if k[1] is None else k[1]))
    vals = torch.rand(len(names), generator=g, dtype=torch.float64) * 0.98 + 0.01
    return {k: float(v) for k, v in zip(names, vals)}


# ---------------------------------------------------------------------------------------
# Timing and memory


def median(xs):
    xs = sorted(xs)
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else 0.5 * (xs[m - 1] + xs[m])


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed_warm(fn) -> float:
    """The time of ``fn()`` right after one untimed call: no timed call starts from an idle
    machine (one started after half a second idle runs ~10% slower). Both processes time
    this way (the auto-circuit side: the last of ``n=2`` timings)."""
    fn()
    return timed(fn)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+)", f.read(), re.M).group(1))


def peak_rss_delta_mb(fn) -> dict:
    """Peak resident memory of ``fn()`` above the resident memory just before it, in MiB.

    How: the caller has done all setup (model, inputs, patch values) and one warm-up
    call in this *fresh* process. We read the current RSS (``VmRSS``) as the baseline,
    reset the kernel's high-water mark (writing ``5`` to ``/proc/self/clear_refs``
    resets ``VmHWM`` to the current RSS, Linux >= 4.0), run ``fn`` once and read
    ``VmHWM``. Unlike a plain ``ru_maxrss`` delta this is not masked by a larger peak
    during setup, and unlike tracemalloc it sees torch's C++ allocations. The
    subprocess runs with ``MALLOC_MMAP_THRESHOLD_`` fixed low so freed tensors go
    back to the OS (glibc's dynamic threshold would otherwise keep freed memory
    resident and let the measured call reuse it, which hides allocations
    differently in the two libraries). Both libraries are measured the same way.
    """
    import gc
    gc.collect()
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    fn()
    peak = _status_kb("VmHWM")
    return {"peak_delta_mb": (peak - base) / 1024, "baseline_mb": base / 1024}


MEM_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def setup_threads() -> None:
    torch.set_num_threads(THREADS)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def emit(obj) -> None:
    """One JSON line on the real stdout (the peer redirects sys.stdout to stderr)."""
    import sys
    out = getattr(sys, "__stdout__")
    out.write(json.dumps(obj) + "\n")
    out.flush()
