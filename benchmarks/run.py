"""funcpatch benchmarks: against the model's own forward and against auto-circuit 1.0.1.

    python benchmarks/run.py            # from funcpatch's environment; ~3-6 minutes
    python benchmarks/run.py --quick    # fewer repetitions (a smoke test)

auto-circuit needs TransformerLens < 4, so it runs in its own environment: this script
starts ``benchmarks/peer_autocircuit.py`` with ``/work/venvs/ac/bin/python`` (or the
interpreter in ``$AUTOCIRCUIT_PYTHON``) and talks to it over a pipe, one command per
repetition, so that funcpatch and auto-circuit runs alternate (A, B, A, B, ...) and
load from other processes on the machine affects both alike. Without that interpreter
the auto-circuit columns are skipped (with a message).

Both libraries run the *same* weights: a transformers GPT2LMHeadModel built with a
fixed seed and saved to a temporary file; funcpatch wraps a copy with
``fp.models.from_hf`` (TransformerLens TransformerBridge), auto-circuit converts a copy
to a HookedTransformer (no weight processing). Logits are compared before any timing.

Every timing is the median of the repetitions after one warm-up, each timed call right
after an untimed call of the same function (no timed call starts from an idle machine;
the same pause before and after each auto-circuit command), with
``torch.set_num_threads(2)`` in both processes, under ``torch.no_grad()`` for forwards.
The results go to stdout and to ``benchmarks/results.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import common as C  # noqa: E402

PEER_DEFAULT = "/work/venvs/ac/bin/python"


# ---------------------------------------------------------------------------------------
# funcpatch side


def fp_setup(model_path: str, data_path: str):
    import funcpatch as fp
    bridge = fp.models.from_hf(C.load_hf(model_path))
    pm = fp.patchable(bridge, factorized=True, separate_qkv=True, slice_output="last_seq")
    d = torch.load(data_path)
    ds = fp.PromptDataset(list(d["clean"]), list(d["corrupt"]), list(d["answers"]), list(d["wrong_answers"]))
    dl = fp.PromptDataLoader(ds, seq_len=d["clean"].shape[1], diverge_idx=0, batch_size=d["batch_size"],
                             shuffle=False)
    return pm, dl, d


def masks_from_values(pm, values):
    """funcpatch masks with ``values[(edge name, seq_idx)]`` on every edge (missing: 0)."""
    import funcpatch as fp
    masks = {k: v.clone() for k, v in fp.init_state(pm).masks.items()}
    for e in pm.graph.edges:
        v = values.get((e.name, e.seq_idx))
        if v is not None:
            masks[e.dest.module_name][e.patch_idx] = v
    return masks


def scores_by_name(pm, scores):
    return {(e.name, e.seq_idx): float(e.prune_score(scores)) for e in pm.graph.edges}


def find_algo(name: str):
    """``funcpatch.algos.<name>`` if it exists (a function), else None."""
    try:
        algos = importlib.import_module("funcpatch.algos")
    except ImportError:
        return None
    f = getattr(algos, name, None)
    if f is None:
        try:
            f = importlib.import_module(f"funcpatch.algos.{name}")
        except ImportError:
            return None
    if isinstance(f, types.ModuleType):
        f = getattr(f, name, None)
    return f if callable(f) else None


def find_run_circuits():
    import funcpatch as fp
    f = getattr(fp, "run_circuits", None)
    if f is None:
        try:
            f = importlib.import_module("funcpatch.circuits").run_circuits
        except (ImportError, AttributeError):
            return None
    return f


def eap_floor(hf, batches):
    """The physical floor of EAP, per batch: one forward on the corrupt prompts (the
    patch values) and one forward + backward of the plain transformers model on the
    clean prompts (gradients of the logit difference w.r.t. activations only)."""
    for b in batches:
        with torch.no_grad():
            hf(b.corrupt)
        emb = hf.transformer.wte(b.clean).detach().requires_grad_()
        logits = hf(inputs_embeds=emb).logits[:, -1]
        loss = -(logits.gather(1, b.answers) - logits.gather(1, b.wrong_answers)).mean()
        loss.backward()


def mem_child(kind: str, workdir: str):
    """``--mem KIND WORKDIR``: peak memory of one forward, in this fresh process."""
    import funcpatch as fp
    C.setup_threads()
    pm, dl, _ = fp_setup(os.path.join(workdir, "model.pt"), os.path.join(workdir, "data.pt"))
    batch = next(iter(dl))
    x = batch.clean
    if kind == "funcpatch":
        patch = fp.src_ablations(pm, batch.corrupt, fp.AblationType.RESAMPLE)
        state = fp.patch_mode(pm, fp.init_state(pm), patch)
        state = dataclasses.replace(state, masks=masks_from_values(pm, torch.load(os.path.join(workdir, "edge_values.pt"))))

        def run():
            with torch.no_grad():
                fp.patched_forward(pm, state, x)
    elif kind == "bridge":
        def run():
            with torch.no_grad():
                pm.model(x)
    elif kind == "transformers":
        hf = C.load_hf(os.path.join(workdir, "model.pt"))

        def run():
            with torch.no_grad():
                hf(x)
    else:
        raise SystemExit(f"unknown --mem kind {kind!r}")
    run()  # warm-up: one-time allocations are not the forward's
    if kind == "funcpatch":
        # the scratch tensors funcpatch keeps per thread between no-grad calls count as the
        # forward's: drop them so the measured call allocates them again
        importlib.import_module("funcpatch.scratch").release()
    C.emit(C.peak_rss_delta_mb(run))


# ---------------------------------------------------------------------------------------
# The auto-circuit process


class Peer:
    def __init__(self, python: str, workdir: str):
        self.log = open(os.path.join(workdir, "peer.log"), "w")
        self.p = subprocess.Popen([python, os.path.join(HERE, "peer_autocircuit.py"), "serve", workdir],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.hello = self._read()

    def _read(self):
        line = self.p.stdout.readline()
        if not line:
            self.log.flush()
            raise RuntimeError(f"the auto-circuit process exited; see its log {self.log.name}")
        return json.loads(line)

    def call(self, cmd: str, **kw):
        self.p.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.p.stdin.flush()
        res = self._read()
        if not res.get("ok"):
            raise RuntimeError(f"auto-circuit command {cmd} failed: {res.get('error')} (log: {self.log.name})")
        return res

    def time1(self, cmd: str, **kw) -> float:
        # torch's OpenMP threads spin for a while after a process's last parallel region:
        # each side starts only after the other one has been idle for the same pause
        # (measured: a run that starts after 0.5 s idle is ~10% slower than one started
        # right after another run, so pausing on one side only would favour the other)
        time.sleep(0.5)
        t = self.call(cmd, n=2, **kw)["times"][-1]  # after one untimed run, as C.timed_warm
        time.sleep(0.5)
        return t

    def close(self):
        try:
            self.p.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.p.stdin.flush()
            self.p.wait(timeout=30)
        except Exception:
            self.p.kill()
        self.log.close()


def _mem_subprocesses(jobs):
    """Run each ``argv`` of ``jobs`` (name -> argv) in a fresh process; their JSON answers."""
    env = {**os.environ, **C.MEM_ENV}
    procs = {k: subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, argv in jobs.items()}
    out = {}
    for k, p in procs.items():
        so, se = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(jobs[k])} failed:\n{se[-2000:]}")
        out[k] = json.loads(so.strip().splitlines()[-1])
    return out


# ---------------------------------------------------------------------------------------
# Helpers


def interleave(fns, reps: int, warmup: int = 1):
    """Run ``fns`` (name -> callable returning seconds) round-robin; medians after warm-up.

    The order rotates every round, so no function always runs right after the same
    other one (after auto-circuit's process, say, with its data in the caches)."""
    times = {k: [] for k in fns}
    names = list(fns)
    for i in range(warmup + reps):
        for k in names[i % len(names):] + names[:i % len(names)]:
            t = fns[k]()
            if i >= warmup:
                times[k].append(t)
    return {k: C.median(v) for k, v in times.items()}, times


PHASES = ("forward", "memory", "eap", "acdc", "vmap", "circuits", "acdc_wide")
DEFAULT_PHASES = PHASES[:-1]  # acdc_wide takes minutes in auto-circuit: only on request


def wait_for_load(limit_s: float, below: float = 2.0) -> float:
    """Sleep until the 1-minute load average is below ``below`` (at most ``limit_s``)."""
    import time
    t0 = time.time()
    while limit_s > 0 and os.getloadavg()[0] >= below and time.time() - t0 < limit_s:
        time.sleep(10)
    return time.time() - t0


def min_ratio(times, a, b):
    """min(times[a]) / min(times[b]), or None when a side was not measured."""
    if a not in times or b not in times:
        return None
    return min(times[a]) / min(times[b])


def load_avg() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fmt_s(x):
    return "—" if x is None else (f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s")


def fmt_r(x):
    return "—" if x is None else f"{x:.2f}×"


def verdict(ratio, target, le=True):
    if ratio is None:
        return "—"
    return "yes" if (ratio <= target if le else ratio >= target) else "**no**"


def rel_max_diff(a: dict, b: dict):
    keys = set(a) & set(b)
    scale = max(abs(v) for v in b.values()) or 1.0
    return max(abs(a[k] - b[k]) for k in keys) / scale


# ---------------------------------------------------------------------------------------
# Main


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 repetitions instead of 7 (smoke test)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per measurement (default 7)")
    ap.add_argument("--out", default=os.path.join(HERE, "results.md"), help="markdown output file")
    ap.add_argument("--only", nargs="+", choices=PHASES, default=list(DEFAULT_PHASES),
                    help=f"run only these measurements (default: {' '.join(DEFAULT_PHASES)})")
    ap.add_argument("--wait-load", type=float, default=0, metavar="SECONDS",
                    help="first wait (at most SECONDS) until the 1-minute load average is below 2")
    ap.add_argument("--mem", nargs=2, metavar=("KIND", "WORKDIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mem:
        return mem_child(*args.mem)

    import funcpatch as fp
    C.setup_threads()
    reps = args.reps or (3 if args.quick else 7)
    only = set(args.only)
    wait_for_load(args.wait_load)
    t_start = datetime.datetime.now()
    load_before = load_avg()
    loads = []  # 1-minute load average at the start of each phase
    workdir = tempfile.mkdtemp(prefix="funcpatch-bench-")
    notes, checks = [], []
    def log(*a):
        loads.append(os.getloadavg()[0])
        print(f"[{(datetime.datetime.now() - t_start).total_seconds():6.0f} s]", *a, file=sys.stderr, flush=True)

    # -- the same weights and data for both libraries
    C.save_model(os.path.join(workdir, "model.pt"), C.WORKLOAD)
    C.make_data(os.path.join(workdir, "data.pt"), C.WORKLOAD["vocab_size"])

    pm, dl, data = fp_setup(os.path.join(workdir, "model.pt"), os.path.join(workdir, "data.pt"))
    hf = C.load_hf(os.path.join(workdir, "model.pt"))  # a bare copy: the bridge took over its own
    hf.requires_grad_(False)
    batches = list(dl)
    batch = batches[0]
    x = batch.clean
    values = C.random_edge_values([(e.name, e.seq_idx) for e in pm.graph.edges])
    torch.save(values, os.path.join(workdir, "edge_values.pt"))
    patch = fp.src_ablations(pm, batch.corrupt, fp.AblationType.RESAMPLE)
    state = fp.patch_mode(pm, fp.init_state(pm), patch)
    state = dataclasses.replace(state, masks=masks_from_values(pm, values))
    with torch.no_grad():
        bridge_logits = pm.model(x)
        hf_logits = hf(x).logits
        fp_patched = fp.patched_forward(pm, state, x)
    checks.append(("funcpatch bridge vs transformers logits", float((bridge_logits - hf_logits).abs().max())))
    log(f"workload: GPT-2 {C.WORKLOAD}, batch {C.BATCH}x{C.SEQ}, {pm.graph.n_edges} edges")

    # -- auto-circuit
    peer_py = os.environ.get("AUTOCIRCUIT_PYTHON", PEER_DEFAULT)
    peer = None
    if not os.path.exists(peer_py):
        msg = (f"auto-circuit columns skipped: interpreter {peer_py} not found (set AUTOCIRCUIT_PYTHON to a "
               "Python with auto-circuit 1.0.1 and TransformerLens 2.16 installed)")
        print(msg, flush=True)
        notes.append(msg)
    else:
        log("starting auto-circuit process ...")
        peer = Peer(peer_py, workdir)
        info = peer.call("init")
        peer_torch = peer.hello.get("torch")
        pl = torch.load(os.path.join(workdir, "peer_logits.pt"))
        checks.append(("auto-circuit HookedTransformer vs transformers logits", info["hf_vs_hooked_max_abs_diff"]))
        checks.append(("funcpatch bridge vs auto-circuit HookedTransformer logits",
                       float((bridge_logits - pl["logits"]).abs().max())))
        checks.append(("patched logits, random masks on all edges: funcpatch vs auto-circuit",
                       float((fp_patched - pl["patched"]).abs().max())))
        fp_names = sorted([(e.name, e.seq_idx) for e in pm.graph.edges],
                          key=lambda k: (k[0], -1 if k[1] is None else k[1]))
        same = [tuple(k) for k in info["edge_names"]] == fp_names
        checks.append(("edge count funcpatch / auto-circuit", f"{pm.graph.n_edges} / {info['n_edges']}"))
        checks.append(("same set of edge names", "yes" if same else "**NO**"))
    for name, v in checks:
        print(f"check: {name}: {v}", flush=True)

    rows = []  # (measurement, funcpatch, baseline name, baseline value, ratio, target, met)
    minr = {}  # row index -> the same ratio from the fastest run of each side (less sensitive to load)
    eap, acdc, mg, rc = find_algo("eap"), find_algo("acdc"), find_algo("mask_gradient"), find_run_circuits()

    if "forward" in only:
        # -- 1. patched forward vs unpatched forwards vs auto-circuit, interleaved
        log("patched forward ...")

        def t_fp():
            with torch.no_grad():
                return C.timed_warm(lambda: fp.patched_forward(pm, state, x))

        def t_bridge():
            with torch.no_grad():
                return C.timed_warm(lambda: pm.model(x))

        def t_hf():
            with torch.no_grad():
                return C.timed_warm(lambda: hf(x))

        fns = {"funcpatch": t_fp, "bridge": t_bridge, "transformers": t_hf}
        if peer:
            fns["auto-circuit"] = lambda: peer.time1("patched")
            fns["auto-circuit unpatched"] = lambda: peer.time1("unpatched")
        med, T = interleave(fns, reps)
        f = med["funcpatch"]
        rows.append(("Patched forward (random masks on all 1519 edges, RESAMPLE) vs the bridge's own unpatched forward",
                     f, "bridge forward", med["bridge"], f / med["bridge"], "≤ 1.5×", verdict(f / med["bridge"], 1.5)))
        minr[len(rows) - 1] = min_ratio(T, "funcpatch", "bridge")
        rows.append(("… vs the bare transformers forward (identical weights)", f, "transformers forward",
                     med["transformers"], f / med["transformers"], "(info)", ""))
        minr[len(rows) - 1] = min_ratio(T, "funcpatch", "transformers")
        pa = med.get("auto-circuit")
        rows.append(("… vs auto-circuit's patched forward (`patch_mode`, same masks)", f, "auto-circuit patched",
                     pa, None if pa is None else f / pa, "≤ 0.25×", verdict(None if pa is None else f / pa, 0.25)))
        minr[len(rows) - 1] = min_ratio(T, "funcpatch", "auto-circuit")
        if peer:
            notes.append(f"auto-circuit's unpatched HookedTransformer forward (split Q/K/V, attn-result and mlp-in "
                         f"hooks on, as its graph requires): {fmt_s(med['auto-circuit unpatched'])}.")

    if "memory" in only:
        # -- 2. peak memory, each in a fresh process
        log("peak memory (fresh processes) ...")
        # the processes run side by side: each measures only its own resident set
        jobs = {kind: [sys.executable, os.path.abspath(__file__), "--mem", kind, workdir]
                for kind in ("funcpatch", "bridge", "transformers")}
        if peer:
            jobs["auto-circuit"] = [peer_py, os.path.join(HERE, "peer_autocircuit.py"), "mem", workdir]
        mem = _mem_subprocesses(jobs)
        mf = mem["funcpatch"]["peak_delta_mb"]
        ma = mem.get("auto-circuit", {}).get("peak_delta_mb")
        rows.append(("Peak memory of one patched forward (MiB above the post-setup baseline, fresh process)",
                     mf, "auto-circuit patched", ma, None if ma is None else mf / ma, "≤ 1×",
                     verdict(None if ma is None else mf / ma, 1.0)))
        notes.append("Peak memory of one *unpatched* forward, same method: bridge "
                     f"{mem['bridge']['peak_delta_mb']:.1f} MiB, transformers {mem['transformers']['peak_delta_mb']:.1f} MiB.")

    if "eap" in only:
        # -- 3. EAP
        if eap is None:
            notes.append("EAP row skipped: funcpatch.algos.eap does not exist yet.")
        else:
            log("EAP ...")
            out = {}

            def t_fp_eap():
                return C.timed_warm(lambda: out.__setitem__("s", eap(pm, dl, progress=False)))

            fns = {"funcpatch": t_fp_eap, "floor": lambda: C.timed_warm(lambda: eap_floor(hf, batches))}
            if peer:
                fns["auto-circuit"] = lambda: peer.time1("eap", save=True)
            eap_reps = max(3, reps - 2)
            med, T = interleave(fns, eap_reps)
            f = med["funcpatch"]
            pa = med.get("auto-circuit")
            rows.append((f"EAP, {C.N_BATCHES} batches of {C.BATCH}×{C.SEQ} (`fp.algos.eap`) vs auto-circuit "
                         "`mask_gradient_prune_scores(mask_val=0)`", f, "auto-circuit EAP", pa,
                         None if pa is None else f / pa, "≤ 0.25×", verdict(None if pa is None else f / pa, 0.25)))
            minr[len(rows) - 1] = min_ratio(T, "funcpatch", "auto-circuit")
            rows.append(("… vs the physical floor (per batch: 1 corrupt forward + 1 forward/backward of the "
                         "transformers model)", f, "floor", med["floor"], f / med["floor"], "≤ 1.5×",
                         verdict(f / med["floor"], 1.5)))
            minr[len(rows) - 1] = min_ratio(T, "funcpatch", "floor")
            fp_eap = scores_by_name(pm, out["s"])
            if peer:
                pe = torch.load(os.path.join(workdir, "peer_eap.pt"))
                checks.append(("EAP scores funcpatch vs auto-circuit (max |diff| / max |score|)", rel_max_diff(fp_eap, pe)))

    def acdc_row(tag, shape, taus):
        """ACDC on a model of ``shape`` at ``taus``: funcpatch vs auto-circuit, and do they agree."""
        log(f"ACDC ({tag}) ...")
        model_f, data_f = f"acdc_{tag}_model.pt", f"acdc_{tag}_data.pt"
        C.save_model(os.path.join(workdir, model_f), shape)
        C.make_data(os.path.join(workdir, data_f), shape["vocab_size"], n=C.BATCH)
        apm, adl, _ = fp_setup(os.path.join(workdir, model_f), os.path.join(workdir, data_f))
        exps = sorted({round(torch.log10(torch.tensor(t)).item()) for t in taus})
        out = {}

        def t_fp_acdc():
            return C.timed_warm(lambda: out.__setitem__("s", acdc(apm, adl, tao_exps=exps, tao_bases=[1],
                                                                  progress=False)))

        fns = {"funcpatch": t_fp_acdc}
        if peer:
            n_peer_edges = peer.call("acdc_init", model=model_f, data=data_f)["n_edges"]
            fns["auto-circuit"] = lambda: peer.time1("acdc", tao_exps=exps, tao_bases=[1], save=True)
        med, T = interleave(fns, acdc_reps, warmup=0)
        f = med["funcpatch"]
        pa = med.get("auto-circuit")
        rows.append((f"ACDC, τ ∈ {{{', '.join(f'1e{e}' for e in exps)}}}, {tag} model ({shape['n_layer']} layers, "
                     f"d_model {shape['n_embd']}, {shape['n_head']} heads, {apm.graph.n_edges} edges, batch "
                     f"{C.BATCH}×{C.SEQ}; `fp.algos.acdc` defaults) — speed-up", f,
                     "auto-circuit `acdc_prune_scores`", pa, None if pa is None else pa / f, "≥ 5× faster",
                     verdict(None if pa is None else pa / f, 5.0, le=False)))
        minr[len(rows) - 1] = min_ratio(T, "auto-circuit", "funcpatch")
        if peer:
            pe = torch.load(os.path.join(workdir, "peer_acdc.pt"))
            fa = scores_by_name(apm, out["s"])
            agree = sum(1 for k in fa if fa[k] == pe.get(k) or abs(fa[k] - pe.get(k, float("nan"))) < 1e-12)
            checks.append((f"ACDC ({tag} model) scores equal per edge, funcpatch vs auto-circuit",
                           f"{agree} / {len(fa)} edges (auto-circuit graph: {n_peer_edges} edges)"))

    acdc_reps = max(3, reps // 2)
    for phase, tag, shape, taus in (("acdc", "small", C.ACDC_WORKLOAD, C.ACDC_TAUS),
                                    ("acdc_wide", "2-layer full-width", C.ACDC_WIDE_WORKLOAD, C.ACDC_WIDE_TAUS)):
        if phase in only:
            # smaller models: auto-circuit runs one forward per edge per tau (minutes per tau on the full workload)
            if acdc is None:
                notes.append("ACDC row skipped: funcpatch.algos.acdc does not exist yet.")
            else:
                acdc_row(tag, shape, taus)

    if "vmap" in only:
        # -- 5. per-prompt scores: vmap vs a loop; circuit sizes: one vmapped call vs one call per size
        if mg is not None and eap is not None:
            log("per-prompt EAP: vmap vs loop ...")
            def loader(idx, bs):
                return fp.PromptDataLoader(fp.PromptDataset([data["clean"][i] for i in idx], [data["corrupt"][i] for i in idx],
                                                            [data["answers"][i] for i in idx],
                                                            [data["wrong_answers"][i] for i in idx]),
                                           seq_len=C.SEQ, diverge_idx=0, batch_size=bs)
            dl1 = loader(range(C.BATCH), C.BATCH)  # one batch of 16 prompts
            singles = [loader([i], 1) for i in range(C.BATCH)]
            out = {}

            def t_vmap():
                return C.timed_warm(lambda: out.__setitem__("v", mg(pm, dl1, mask_val=0.0, per_prompt=True,
                                                                    progress=False)))

            def t_loop():
                return C.timed_warm(lambda: out.__setitem__("l", [eap(pm, s, progress=False) for s in singles]))

            med, T = interleave({"vmap": t_vmap, "loop": t_loop}, max(3, reps // 2))
            n = len(singles)
            rows.append((f"Per-prompt EAP scores, {n} prompts: `mask_gradient(per_prompt=True)` (vmap) vs a loop of "
                         "one-prompt `eap` calls", med["vmap"], "loop", med["loop"], med["vmap"] / med["loop"],
                         "(info)", ""))
            minr[len(rows) - 1] = min_ratio(T, "vmap", "loop")
            diff = max(float((out["v"][k][i] - out["l"][i][k]).abs().max()) for i in range(n) for k in out["v"])
            scale = max(float(v.abs().max()) for v in out["v"].values())
            checks.append(("per-prompt scores vmap vs loop (max |diff| / max |score|)", diff / scale))

    if "circuits" in only:
        if rc is not None and eap is not None:
            log("run_circuits: vmap over sizes vs one call per size ...")
            import inspect
            scores = eap(pm, dl, progress=False)
            n_e = pm.graph.n_edges
            sizes = [0, 30, 100, 300, 1000, n_e]
            has_vmap = "vmap_sizes" in inspect.signature(rc).parameters
            fns = {"per size": lambda: C.timed_warm(lambda: [rc(pm, dl, [s], scores, progress=False) for s in sizes]),
                   "one call, loop": lambda: C.timed_warm(lambda: rc(pm, dl, sizes, scores, progress=False))}
            if has_vmap:
                fns["vmap"] = lambda: C.timed_warm(lambda: rc(pm, dl, sizes, scores, progress=False, vmap_sizes=True))
            if peer:
                torch.save(scores_by_name(pm, scores), os.path.join(workdir, "circuit_scores.pt"))
                fns["auto-circuit"] = lambda: peer.time1("run_circuits", sizes=sizes)
            med, T = interleave(fns, max(3, reps // 2))
            v = med.get("vmap")
            if v is not None:
                rows.append((f"`run_circuits`, {len(sizes)} circuit sizes × {C.N_BATCHES} batches: one call with "
                             "`vmap_sizes=True` vs one call per size", v, "one call per size", med["per size"],
                             v / med["per size"], "(info)", ""))
                minr[len(rows) - 1] = min_ratio(T, "vmap", "per size")
                rows.append(("… vs one call looping over the sizes (`vmap_sizes=False`)", v, "one call, loop",
                             med["one call, loop"], v / med["one call, loop"], "(info)", ""))
                minr[len(rows) - 1] = min_ratio(T, "vmap", "one call, loop")
            else:
                notes.append("run_circuits has no vmap_sizes argument: vmapped row skipped.")
            best = v if v is not None else med["one call, loop"]
            pa = med.get("auto-circuit")
            rows.append(("… funcpatch (fastest of the above) vs auto-circuit `run_circuits` (same sizes, same scores)",
                         best, "auto-circuit run_circuits", pa, None if pa is None else best / pa, "(info)", ""))
            minr[len(rows) - 1] = min_ratio(T, "vmap" if v is not None else "one call, loop", "auto-circuit")

    if peer:
        peer.close()
    load_after = load_avg()
    elapsed = (datetime.datetime.now() - t_start).total_seconds()

    # -- report
    lines = ["# funcpatch benchmarks", ""]
    lines.append(f"- date: {t_start:%Y-%m-%d %H:%M} (run took {elapsed:.0f} s; `python benchmarks/run.py`)")
    lines.append(f"- machine: {os.cpu_count()} CPUs ({cpu_model()}), torch threads {C.THREADS} in both processes; "
                 f"load average (1/5/15 min) before: {load_before}, after: {load_after}; 1-min load at the start of "
                 f"each phase: {', '.join(f'{x:.1f}' for x in loads)}"
                 + (" — **the machine was busy: other processes competed for the 2 cores, so absolute times are "
                    "inflated; the ratios come from interleaved runs**" if max(loads) >= 2 else ""))
    lines.append(f"- funcpatch: torch {torch.__version__}, TransformerLens {_version('transformer_lens')}, "
                 f"transformers {_version('transformers')}; model = `fp.models.from_hf` (TransformerBridge)")
    if peer:
        lines.append(f"- auto-circuit 1.0.1: torch {peer_torch}, TransformerLens 2.16.1 HookedTransformer, "
                     f"`patchable_model(factorized=True, separate_qkv=True, slice_output='last_seq')` "
                     f"(interpreter {peer_py})")
    lines.append(f"- workload: GPT-2 shape, {C.WORKLOAD['n_layer']} layers, d_model {C.WORKLOAD['n_embd']}, "
                 f"{C.WORKLOAD['n_head']} heads, vocab {C.WORKLOAD['vocab_size']}, random weights (seed {C.SEED}), "
                 f"batch {C.BATCH} × {C.SEQ} tokens, factorized graph with separate Q/K/V: {pm.graph.n_edges} edges")
    lines.append(f"- timings: median of {reps} runs (EAP {max(3, reps - 2)}, vmap rows {max(3, reps // 2)}, ACDC "
                 f"{acdc_reps}) after one warm-up, funcpatch and baselines interleaved run by run, each timed call "
                 "right after an untimed call of the same function (in both processes); forwards under "
                 "`torch.no_grad()`")
    lines += ["", "| measurement | funcpatch | baseline | baseline value | ratio (funcpatch / baseline), medians | "
              "same ratio from the fastest runs | target | met (medians) |",
              "|---|---|---|---|---|---|---|---|"]
    for i, (name, fv, bname, bv, ratio, target, met) in enumerate(rows):
        is_mem = "memory" in name
        fv_s = f"{fv:.1f} MiB" if is_mem else fmt_s(fv)
        bv_s = "—" if bv is None else (f"{bv:.1f} MiB" if is_mem else fmt_s(bv))
        if "speed-up" in name and ratio is not None:
            r_s = f"{ratio:.1f}× faster ({1 / ratio:.3f}×)"
        else:
            r_s = fmt_r(ratio)
        m = minr.get(i)
        m_s = "—" if m is None else (f"{m:.1f}× faster" if "speed-up" in name else fmt_r(m))
        lines.append(f"| {name} | {fv_s} | {bname} | {bv_s} | {r_s} | {m_s} | {target} | {met} |")
    lines += ["", "## Same numbers in both libraries (checked before timing)", ""]
    for name, v in checks:
        lines.append(f"- {name}: {v:.2e}" if isinstance(v, float) else f"- {name}: {v}")
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "Memory: each forward runs in a fresh process after setup and one warm-up call; the number is "
              "the kernel's resident-set high-water mark (`VmHWM`, reset through `/proc/self/clear_refs`) minus "
              "the resident set just before the call, with glibc's mmap threshold fixed so freed tensors leave "
              "the process (see `benchmarks/common.py: peak_rss_delta_mb`).", ""]
    text = "\n".join(lines)
    print(text)
    with open(args.out, "w") as fh:
        fh.write(text)
    log(f"written to {args.out}")


def _version(mod):
    try:
        from importlib.metadata import version
        return version(mod.replace("_", "-"))
    except Exception:
        return "?"


if __name__ == "__main__":
    main()
