"""The ``funcpatch`` command.

``funcpatch discover``
    Discover a circuit on a model and its task, evaluate it, and write the results.
    With no arguments it runs on the zoo's induction model and its held-out prompts:
    scores every edge with EAP-IG on a train split, measures the faithfulness of the
    circuits of the MIB sizes (0.1% .. 100% of the edges) on a test split, prints the
    table with the CPR and CMD, and writes to ``--out`` (default ``out/``):

    - ``circuit.png``: the diagram of the circuit (``--edges`` edges);
    - ``faithfulness.png``: faithfulness against circuit size;
    - ``scores.safetensors``: the prune scores (dest module -> tensor shaped like its mask;
      the metadata ``srcs:<module>`` names the sources along the last axis);
    - ``edges.json``: every edge with its score (null when infinite or NaN), in rank order;
    - ``summary.json``: the settings, the table, CPR and CMD;
    - with ``--mib-out DIR``: the circuit in MIB's submission layout
      (:func:`funcpatch.mib.save_submission`).

    EAP-IG interpolates as EAP-IG's code does (``--endpoint corrupt``, the points MIB's
    numbers come from). ``--dataset`` takes auto-circuit's JSON or EAP-IG's CSV files.

``funcpatch evaluate CIRCUIT --model M [--dataset D]``
    MIB's evaluation (:func:`funcpatch.mib.evaluate`) of a circuit file: funcpatch's
    ``scores.safetensors``, an EAP-IG/MIB ``.json``/``.pt``, auto-circuit's PruneScores
    ``.pt``, or a MIB submission's ``{task}_{model}`` folder (one scores file, or binary
    circuits). Prints MIB's table, CPR and CMD.

    Every circuit evaluated (the table, ``summary.json``, the plots) has exactly its
    reported number of edges: the top n by ``|score|``, ties broken by the graph's edge
    order (:func:`funcpatch.circuits.edge_ranks`; the rank in ``edges.json``). When the
    full model does not clearly beat the empty circuit on the task (see
    :func:`task_check`), faithfulness is undefined: the table and ``summary.json`` say so
    and give no CPR or CMD.

    ``--out`` is checked to be writable before any work. The files are written into a
    temporary folder inside it and then moved in; while they are moved, ``--out`` holds
    the marker file ``INCOMPLETE`` (:data:`INCOMPLETE_MARKER`), so an interrupted run
    leaves the previous complete set, or that marker, never an unmarked mix of two runs.

``funcpatch zoo``
    List the zoo's models and their tasks.

Errors (bad arguments, missing files, a model without the hooks the graph needs, ...)
print one line on stderr and exit with a non-zero status (2: usage, 1: anything else);
``FUNCPATCH_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

# The zoo is local and nothing is downloaded: keep the hub libraries offline and quiet.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

PROG = "funcpatch"
DEFAULT_MODEL = "induction"
DEFAULT_ALGO = "eap_ig"
DEFAULT_OUT = "out"
#: the output files of ``discover``
OUTPUT_FILES = ("circuit.png", "faithfulness.png", "scores.safetensors", "edges.json", "summary.json")
#: the marker file in ``--out`` while a run moves its files in (left there if interrupted)
INCOMPLETE_MARKER = "INCOMPLETE"
#: the faithfulness a drawn circuit should reach by default
DRAW_FAITHFULNESS = 0.8
#: the task check: the full model must beat the empty circuit by this fraction of
#: ``|m(full)| + |m(empty)|``
MIN_TASK_GAP = 0.1

__all__ = ["main", "ALGORITHMS", "CLIError", "discover", "DiscoverResult", "evaluate", "format_mib_table"]


class CLIError(Exception):
    """An error the command reports in one line (exit status ``code``)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse that raises (one line, status 2) instead of printing the usage and exiting."""

    def error(self, message):  # noqa: D401 - argparse API
        raise CLIError(f"{self.prog}: {message} (see '{self.prog} --help')", code=2)


# --------------------------------------------------------------------------------------
# Algorithms


@dataclass(frozen=True)
class Algorithm:
    name: str
    help: str
    run: Callable[..., Dict[str, Any]]  # (pm, train_loader, args, progress) -> PruneScores
    module: str  # where it lives in funcpatch.algos
    attr: str


def _algo_fn(module: str, attr: str):
    """``funcpatch.algos.<attr>`` (a function), else ``funcpatch.algos.<module>.<attr>``."""
    import importlib

    import funcpatch.algos as algos

    fn = getattr(algos, attr, None)
    if callable(fn) and not isinstance(fn, type(algos)):
        return fn
    try:
        mod = importlib.import_module(f"funcpatch.algos.{module}")
    except ImportError:
        return None
    fn = getattr(mod, attr, None)
    return fn if callable(fn) else None


def _run_eap(pm, loader, a, progress):
    return _algo_fn("mask_gradient", "eap")(pm, loader, ablation_type=a.ablation, progress=progress)


def _run_eap_ig(pm, loader, a, progress):
    return _algo_fn("mask_gradient", "eap_ig")(pm, loader, samples=a.samples, variant="inputs",
                                               endpoint=a.endpoint, ablation_type=a.ablation, progress=progress)


def _run_eap_ig_mask(pm, loader, a, progress):
    return _algo_fn("mask_gradient", "eap_ig")(pm, loader, samples=a.samples, variant="mask",
                                               ablation_type=a.ablation, progress=progress)


def _run_exact(pm, loader, a, progress):
    return _algo_fn("exact", "exact_patching")(pm, loader, ablation_type=a.ablation, progress=progress)


def _run_acdc(pm, loader, a, progress):
    return _algo_fn("acdc", "acdc")(pm, loader, ablation_type=a.ablation, progress=progress)


def _run_sp(pm, loader, a, progress):
    # clean_corrupt=None: the batch-specific ablations patch the circuit's edges with the
    # clean run's values into the corrupt run (patching corrupt values into the corrupt run
    # would change nothing, and leave the masks untrained)
    return _algo_fn("probing", "subnetwork_probing")(pm, loader, epochs=a.sp_epochs, regularize_lambda=a.sp_lambda,
                                                      ablation_type=a.ablation, seed=a.seed, progress=progress)


def _run_magnitude(pm, loader, a, progress):
    return _algo_fn("simple", "activation_magnitude")(pm, loader, progress=progress)


def _run_random(pm, loader, a, progress):
    return _algo_fn("simple", "random_scores")(pm, seed=a.seed)


_ALL_ALGORITHMS = (
    Algorithm("eap", "edge attribution patching: one gradient at the clean run (fastest)", _run_eap,
              "mask_gradient", "eap"),
    Algorithm("eap_ig", "EAP with integrated gradients over the inputs (Hanna et al. 2024; --samples steps)",
              _run_eap_ig, "mask_gradient", "eap_ig"),
    Algorithm("eap_ig_mask", "integrated gradients over the edge masks (auto-circuit's; --samples steps)",
              _run_eap_ig_mask, "mask_gradient", "eap_ig"),
    Algorithm("exact", "the true effect of patching each edge alone (one forward per edge)", _run_exact,
              "exact", "exact_patching"),
    Algorithm("acdc", "ACDC greedy pruning over a grid of thresholds (first batch only; minutes)", _run_acdc,
              "acdc", "acdc"),
    Algorithm("subnetwork_probing", "learned edge masks (hard concrete; --sp-epochs, --sp-lambda)", _run_sp,
              "probing", "subnetwork_probing"),
    Algorithm("activation_magnitude", "baseline: mean |activation| of each edge's source", _run_magnitude,
              "simple", "activation_magnitude"),
    Algorithm("random", "baseline: random scores (--seed)", _run_random, "simple", "random_scores"),
)


def available_algorithms() -> Dict[str, Algorithm]:
    """The algorithms this installation has, by command-line name."""
    return {a.name: a for a in _ALL_ALGORITHMS if _algo_fn(a.module, a.attr) is not None}


def _algo_name(name: str, algos: Dict[str, Algorithm]) -> str:
    """The algorithm's command-line name for ``name`` in any case (``-`` for ``_`` too)."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    if key not in algos:
        raise CLIError(f"{PROG} discover: unknown --algo {name!r}; available: {', '.join(algos)}", code=2)
    return key


def __getattr__(name):  # ALGORITHMS is computed on first use (it imports funcpatch.algos)
    if name == "ALGORITHMS":
        return available_algorithms()
    raise AttributeError(name)


# --------------------------------------------------------------------------------------
# Loading


def _ablation_type(name: str):
    from funcpatch.ablation import AblationType

    key = name.strip().upper().replace("-", "_").replace(" ", "_")
    if key not in AblationType.__members__:
        valid = ", ".join(m.lower() for m in AblationType.__members__)
        raise CLIError(f"{PROG} discover: unknown --ablation {name!r}; valid: {valid}", code=2)
    return AblationType[key]


def _quiet_libraries() -> None:
    import logging

    warnings.filterwarnings("ignore")
    for name in ("transformers", "transformer_lens", "huggingface_hub", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - older transformers
        pass


def resolve_model(model: str, dataset: Optional[str], cmd: str = "discover") -> Tuple[str, Optional[Path], Path]:
    """``(kind, folder, dataset path)`` for a zoo name or a local transformers folder."""
    from funcpatch import zoo

    who = f"{PROG} {cmd}"
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CLIError(f"{who}: {model} is a folder without config.json: not a transformers model folder")
        if dataset is None:
            if not (path / "dataset.json").is_file():
                raise CLIError(f"{who}: {model} has no dataset.json: pass --dataset FILE.json")
            dataset = str(path / "dataset.json")
        kind = "folder"
    else:
        names = zoo.list_models()
        if model not in names:
            raise CLIError(f"{who}: --model {model!r} is neither a zoo model ({', '.join(names) or 'none'}) "
                           "nor a folder", code=2)
        if dataset is None:
            dataset = str(zoo.dataset_path(model))
        path = None
        kind = "zoo"
    ds = Path(dataset).expanduser()
    if not ds.is_file():
        raise CLIError(f"{who}: dataset file not found: {dataset}")
    return kind, path, ds


def load_model(model: str, kind: str, folder: Optional[Path]):
    """``(transformers model, tokenizer)``, offline."""
    if kind == "zoo":
        from funcpatch import zoo

        return zoo.load_hf(model)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, attn_implementation="eager")
    except (ValueError, TypeError) as e:
        if "attn_implementation" not in str(e) and "eager" not in str(e):
            raise
        hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - report any tokenizer failure in one line
        raise CLIError(f"{PROG} discover: cannot load a tokenizer from {folder}: {_one_line(e)}") from e
    return hf.float().eval(), tok


def load_splits(tok, dataset: Path, prompts: int, batch_size: int, seed: int, cmd: str = "discover"):
    """``(train, test, n_train, n_test)`` from auto-circuit's JSON or EAP-IG's CSV prompts:
    up to ``prompts`` in each split, at most half the dataset in the train split."""
    from funcpatch.datasets import load_datasets_from_json, read_dataset_csv, read_dataset_json

    data = read_dataset_csv(dataset, tok) if dataset.suffix.lower() == ".csv" else read_dataset_json(dataset)
    n_prompts = len(data["prompts"])
    if n_prompts < 2:
        raise CLIError(f"{PROG} {cmd}: {dataset} has {n_prompts} prompt; a train and a test split need 2")
    n_train = min(prompts, n_prompts // 2)
    n_test = min(prompts, n_prompts - n_train)
    train, test = load_datasets_from_json(tok, data, batch_size=batch_size, train_test_size=(n_train, n_test),
                                          random_seed=seed)
    return train, test, n_train, n_test


# --------------------------------------------------------------------------------------
# Discover


@dataclass
class DiscoverResult:
    """What ``funcpatch discover`` computed (also returned by :func:`discover`).

    ``edge_counts`` are the evaluated circuits' sizes (exact: each circuit has that many
    edges). ``faithfulness``, ``cpr`` and ``cmd`` are None when the task check failed
    (``task_problem`` says why).
    """

    prune_scores: Dict[str, Any]
    percentages: List[float]
    edge_counts: List[int]
    metric: List[float]
    faithfulness: Optional[List[float]]
    m_empty: float
    m_full: float
    cpr: Optional[float]
    cmd: Optional[float]
    files: Dict[str, str]
    n_edges: int
    drawn_edges: int
    seconds: float
    task_problem: Optional[str] = None
    drawn_note: str = ""


def _mean_logit_diff(outputs: Dict[int, Any], batches) -> float:
    import torch

    from funcpatch.metrics import logit_diff

    vals = [logit_diff(outputs[b.key], b.answers, b.wrong_answers, per_prompt=True) for b in batches]
    return float(torch.cat([v.reshape(-1) for v in vals]).mean())


def task_check(m_full: float, m_empty: float) -> Optional[str]:
    """None when the full model beats the empty circuit on the metric by at least
    :data:`MIN_TASK_GAP` of ``|m_full| + |m_empty|``; else why faithfulness (a ratio over
    ``m_full - m_empty``) would be meaningless."""
    gap = m_full - m_empty
    if gap <= 0:
        return (f"the full model ({m_full:.4g}) does not beat the empty circuit ({m_empty:.4g}) on the metric: "
                "faithfulness is undefined")
    scale = abs(m_full) + abs(m_empty)
    if gap < MIN_TASK_GAP * scale:
        return (f"the full model ({m_full:.4g}) beats the empty circuit ({m_empty:.4g}) by only {gap:.3g}, less than "
                f"{MIN_TASK_GAP:.0%} of |m(full)| + |m(empty)| = {scale:.4g}: faithfulness would be noise")
    return None


def _json_number(x: float) -> Optional[float]:
    """A float for JSON, or None for inf / NaN (JSON has neither)."""
    return float(x) if math.isfinite(x) else None


def _edges_json(pm, scores) -> List[Dict[str, Any]]:
    """Every edge in rank order (:func:`funcpatch.circuits.edge_ranks`): the circuit of n
    edges is the first n rows. A score that is not a JSON number is null, with its
    value as text in ``nonfinite``."""
    from funcpatch.circuits import edge_ranks

    flat = {k: v.detach().double().cpu() for k, v in scores.items()}
    ranks = edge_ranks(pm, flat)
    rows = []
    for e in pm.graph.edges:
        s = float(e.prune_score(flat))
        row = {"rank": int(e.prune_score(ranks)) + 1, "edge": e.name, "src": e.src.name, "dest": e.dest.name}
        if e.seq_idx is not None:
            row["seq_idx"] = e.seq_idx
        row["score"] = _json_number(s)
        if row["score"] is None:
            row["nonfinite"] = str(s)
        rows.append(row)
    rows.sort(key=lambda r: r["rank"])
    return rows


def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _check_writable(out: Path, flag: str = "--out") -> None:
    """``out`` must be a folder that can be created or written: probed by creating and
    removing a temporary folder in ``out`` or its nearest existing ancestor."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"{PROG} discover: {flag} {out} exists and is not a folder")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise CLIError(f"{PROG} discover: {flag} {out}: {probe} is not a folder")
    try:
        tempfile.TemporaryDirectory(dir=probe).cleanup()
    except OSError as e:
        raise CLIError(f"{PROG} discover: {flag} {out} is not writable ({e.strerror or e}: {probe})") from e


def _install_outputs(staging: Path, out: Path) -> None:
    """Move the files written in ``staging`` (a folder in ``out``) into ``out``,
    replacing the previous run's set (also its files this run did not write), with
    :data:`INCOMPLETE_MARKER` in ``out`` while they move."""
    marker = out / INCOMPLETE_MARKER
    marker.write_text(f"{PROG} discover was interrupted while moving its files here: they may mix two runs. "
                      "Run it again.\n")
    for name in OUTPUT_FILES:
        src, dst = staging / name, out / name
        if src.exists():
            os.replace(src, dst)
        elif dst.exists():
            dst.unlink()
    marker.unlink()


def _choose_drawn(counts: Sequence[int], faith: Optional[Sequence[float]], n_edges: int) -> Tuple[int, str]:
    """The default circuit to draw: the smallest evaluated one with faithfulness >=
    :data:`DRAW_FAITHFULNESS` (the full model's is 1), and a note for the title when
    faithfulness is undefined."""
    if faith is None:
        return min(20, n_edges), "task check failed: faithfulness undefined; the top 20 edges"
    return next((c for c, f in zip(counts, faith) if c > 0 and f >= DRAW_FAITHFULNESS), n_edges), ""


def discover(args) -> DiscoverResult:
    """Run ``funcpatch discover`` with parsed arguments (see :func:`build_parser`)."""
    t0 = time.perf_counter()
    quiet, progress = args.quiet, not args.quiet
    ablation = _ablation_type(args.ablation)
    args.ablation = ablation
    algos = available_algorithms()
    args.algo = _algo_name(args.algo, algos)
    for flag, v, lo in (("--samples", args.samples, 1), ("--prompts", args.prompts, 2), ("--batch-size", args.batch_size, 1),
                        ("--sp-epochs", args.sp_epochs, 1)):
        if v < lo:
            raise CLIError(f"{PROG} discover: {flag} must be >= {lo}, got {v}", code=2)
    if not (args.sp_lambda >= 0 and math.isfinite(args.sp_lambda)):
        raise CLIError(f"{PROG} discover: --sp-lambda must be a finite number >= 0, got {args.sp_lambda}", code=2)
    if args.edges is not None and args.edges < 1:
        raise CLIError(f"{PROG} discover: --edges must be >= 1, got {args.edges}", code=2)
    kind, folder, dataset = resolve_model(args.model, args.dataset)
    out = Path(args.out).expanduser()
    _check_writable(out)
    if args.mib_out is not None and Path(args.mib_out).expanduser().is_file():
        raise CLIError(f"{PROG} discover: --mib-out {args.mib_out} exists and is not a folder")

    _quiet_libraries()
    import torch

    import funcpatch as fp
    from funcpatch import distributed, metrics
    from funcpatch.circuits import PatchType, run_circuits

    if distributed.init_from_env() and not distributed.is_main():  # under torchrun: rank 0 reports
        quiet, progress = True, False
    torch.manual_seed(args.seed)
    _log(quiet, f"[1/4] loading {args.model} ({'zoo' if kind == 'zoo' else 'folder'})")
    hf, tok = load_model(args.model, kind, folder)
    bridge = fp.models.from_hf(hf, tok)
    pm = fp.patchable(bridge, slice_output="last_seq", grouped_kv=args.grouped_kv)
    if args.mib_out is not None:
        fp.mib.check_mib_graph(pm)  # before the scoring, not after it

    train, test, n_train, n_test = load_splits(tok, dataset, args.prompts, args.batch_size, args.seed)
    test_batches = list(test)
    _log(quiet, f"      {pm.n_edges} edges; {n_train} train / {n_test} test prompts from {dataset}")

    ablation_name = ablation.name.lower()
    _log(quiet, f"[2/4] scoring edges with {args.algo} (ablation: {ablation_name})")
    scores = algos[args.algo].run(pm, train, args, progress)
    scores = {k: v.detach() for k, v in scores.items()}

    _log(quiet, "[3/4] evaluating circuits on the test prompts")
    n_edges = pm.n_edges
    percentages = list(metrics.MIB_PERCENTAGES)
    counts = metrics.mib_edge_counts(n_edges, percentages)
    wanted = list(dict.fromkeys([0] + counts + [n_edges]))  # the empty circuit and the full model too
    outs = run_circuits(pm, test, wanted, scores, patch_type=PatchType.TREE_PATCH, ablation_type=ablation,
                        progress=progress, vmap_sizes=True, exact_sizes=True)
    metric_at = {s: _mean_logit_diff(outs[s], test_batches) for s in outs}
    m_empty, m_full = metric_at[0], metric_at[n_edges]
    metric = [metric_at[c] for c in counts]
    problem = task_check(m_full, m_empty)
    ps, faith, c_pr, c_md = [float(p) for p in percentages], None, None, None
    if problem is None:
        ps, faith = metrics.faithfulness_curve(dict(zip(counts, metric)), n_edges, m_empty, m_full, percentages)
        c_pr, c_md = metrics.cpr(ps, faith), metrics.cmd(ps, faith)

    drawn, note = (min(args.edges, n_edges), "") if args.edges is not None else _choose_drawn(counts, faith, n_edges)

    if not distributed.is_main():  # the other ranks computed their share; rank 0 writes
        return DiscoverResult(scores, ps, counts, metric, faith, m_empty, m_full, c_pr, c_md, {}, n_edges, drawn,
                              time.perf_counter() - t0, problem, note)
    _log(quiet, f"[4/4] writing {out}/")
    name = args.model if kind == "zoo" else Path(args.model).name
    files = {k: str(out / f) for k, f in zip(("circuit", "faithfulness", "scores", "edges", "summary"), OUTPUT_FILES)}
    if faith is None:
        del files["faithfulness"]
    result = DiscoverResult(scores, ps, counts, metric, faith, m_empty, m_full, c_pr, c_md, files, n_edges, drawn,
                            0.0, problem, note)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".funcpatch-partial-", dir=out))  # same file system: moves are renames
    try:
        _write_outputs(staging, pm, result, name, args, ablation_name, dataset, n_train, n_test, t0)
        _install_outputs(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if args.mib_out is not None:
        mib_name = args.mib_name or f"{_task_name(args.model, kind, dataset)}_{name}"
        fp.mib.save_submission(pm, scores, Path(args.mib_out).expanduser(), mib_name)
        result.files["mib"] = str(Path(args.mib_out).expanduser())
    return result


def _write_outputs(staging: Path, pm, r: DiscoverResult, name: str, args, ablation_name: str, dataset: Path,
                   n_train: int, n_test: int, t0: float) -> None:
    from safetensors.torch import save

    from funcpatch import viz

    f_drawn = dict(zip(r.edge_counts, r.faithfulness)).get(r.drawn_edges) if r.faithfulness is not None else None
    note = r.drawn_note or ("" if f_drawn is not None or r.faithfulness is None else
                            "faithfulness not evaluated at this size")
    viz.draw_circuit(pm, r.prune_scores, n_edges=r.drawn_edges, path=staging / "circuit.png",
                     title=f"{name}: {args.algo} circuit (ablation {ablation_name}, {n_test} test prompts)",
                     faithfulness=f_drawn, note=note or None)
    if r.faithfulness is not None:
        viz.plot_faithfulness(r.percentages, r.faithfulness, staging / "faithfulness.png", label=args.algo,
                              title=f"{name}: faithfulness against circuit size ({n_test} test prompts)")
    src_name = {s.src_idx: s.name for s in pm.graph.srcs}
    srcs = {f"srcs:{m.module_name}": json.dumps([src_name[i] for i in range(*m.in_srcs)])
            for m in pm.graph.dest_modules}
    # written with open(): the file gets the usual permissions (umask), not a temporary file's 0o600
    (staging / "scores.safetensors").write_bytes(save(
        {k: v.contiguous().cpu() for k, v in r.prune_scores.items()},
        metadata={"model": str(args.model), "algo": args.algo, "ablation": ablation_name,
                  "n_edges": str(r.n_edges), **srcs,
                  "format": "funcpatch PruneScores: dest module -> [seq?, heads?, n_in_srcs]; "
                            "srcs:<module> names the sources along the last axis"}))
    with open(staging / "edges.json", "w") as f:
        json.dump(_edges_json(pm, r.prune_scores), f, indent=1)
    r.seconds = time.perf_counter() - t0
    faith = r.faithfulness if r.faithfulness is not None else [None] * len(r.edge_counts)
    summary = {
        "model": str(args.model), "dataset": str(dataset), "algo": args.algo, "ablation": ablation_name,
        "grouped_kv": bool(args.grouped_kv),
        "samples": args.samples if args.algo.startswith("eap_ig") else None,
        "endpoint": args.endpoint if args.algo == "eap_ig" else None, "seed": args.seed,
        "n_edges": r.n_edges, "n_train": n_train, "n_test": n_test, "patch_type": "TREE_PATCH",
        "metric": "logit_diff", "m_full": r.m_full, "m_empty": r.m_empty,
        "task_check": {"ok": r.task_problem is None, "problem": r.task_problem},
        "table": [{"percent": p, "edges": c, "circuit_edges": c, "logit_diff": m, "faithfulness": fa}
                  for p, c, m, fa in zip(r.percentages, r.edge_counts, r.metric, faith)],
        "cpr": r.cpr, "cmd": r.cmd, "drawn_edges": r.drawn_edges, "drawn_faithfulness": f_drawn,
        "seconds": round(r.seconds, 2),
    }
    if args.algo == "subnetwork_probing":
        summary.update(sp_epochs=args.sp_epochs, sp_lambda=args.sp_lambda)
    with open(staging / "summary.json", "w") as f:
        json.dump(summary, f, indent=1)


def format_table(r: DiscoverResult, algo: str) -> str:
    """The faithfulness table printed by ``funcpatch discover``."""
    lines = [f"Faithfulness of the {algo} circuits (logit difference on the test prompts; "
             f"full model {r.m_full:.3f}, empty circuit {r.m_empty:.3f})",
             f"{'% edges':>8} {'edges':>7} {'logit diff':>11} {'faithfulness':>13}"]
    faith = r.faithfulness if r.faithfulness is not None else [None] * len(r.edge_counts)
    for p, c, m, f in zip(r.percentages, r.edge_counts, r.metric, faith):
        lines.append(f"{p:>7g}% {c:>7} {m:>11.3f} {'n/a' if f is None else format(f, '.3f'):>13}")
    if r.task_problem is not None:
        lines.append(f"no CPR or CMD: task check failed: {r.task_problem}   [{r.n_edges} edges]")
    else:
        lines.append(f"CPR {r.cpr:.3f} (higher is better)   CMD {r.cmd:.3f} (lower is better)   "
                     f"[{r.n_edges} edges]")
    return "\n".join(lines)


def _task_name(model: str, kind: str, dataset: Path) -> str:
    """The task part of a MIB folder name: the zoo model's name, else the dataset file's stem."""
    return model if kind == "zoo" and dataset.name == "dataset.json" else dataset.stem


# --------------------------------------------------------------------------------------
# Evaluate


def _load_circuit(pm, path: Path):
    """``("scores", PruneScores)`` or ``("circuits", [in-graph masks])`` from a circuit file or folder."""
    import funcpatch as fp

    if path.is_dir():
        return fp.mib.load_circuit_folder(pm, path)
    if path.suffix == ".safetensors":  # funcpatch discover's scores
        from safetensors.torch import load_file

        from funcpatch.circuits import check_prune_scores

        scores = load_file(str(path))
        check_prune_scores(pm, scores)
        return "scores", scores
    return "scores", fp.mib.load(pm, path)[0]


def evaluate(args):
    """Run ``funcpatch evaluate`` with parsed arguments: ``(MibResults, n_edges, n_test)``."""
    import funcpatch as fp

    if args.intervention not in fp.mib.INTERVENTIONS:
        raise CLIError(f"{PROG} evaluate: unknown --intervention {args.intervention!r}; valid: "
                       f"{', '.join(fp.mib.INTERVENTIONS)}", code=2)
    if args.metric not in fp.mib.METRICS:
        raise CLIError(f"{PROG} evaluate: unknown --metric {args.metric!r}; valid: {', '.join(fp.mib.METRICS)}", code=2)
    for flag, v, lo in (("--prompts", args.prompts, 1), ("--batch-size", args.batch_size, 1)):
        if v < lo:
            raise CLIError(f"{PROG} evaluate: {flag} must be >= {lo}, got {v}", code=2)
    kind, folder, dataset = resolve_model(args.model, args.dataset, "evaluate")
    if not Path(args.circuit).expanduser().exists():
        raise CLIError(f"{PROG} evaluate: circuit file not found: {args.circuit}")
    _quiet_libraries()
    _log(args.quiet, f"[1/3] loading {args.model} and {args.circuit}")
    hf, tok = load_model(args.model, kind, folder)
    pm = fp.patchable(fp.models.from_hf(hf, tok), slice_output="last_seq")
    what, circuit = _load_circuit(pm, Path(args.circuit).expanduser())
    train, test, _, n_test = load_splits(tok, dataset, args.prompts, args.batch_size, args.seed, "evaluate")
    means = train if "mean" in args.intervention else None  # the means come from the other split
    _log(args.quiet, f"[2/3] evaluating {'scores' if what == 'scores' else f'{len(circuit)} circuits'} on "
                     f"{n_test} test prompts ({args.intervention})")
    kw = dict(intervention=args.intervention, log_scale=args.log_scale, metric=args.metric,
              intervention_dataloader=means)
    if what == "scores":
        res = fp.mib.evaluate(pm, test, circuit, absolute=not args.signed, **kw)
    else:
        res = fp.mib.evaluate_circuits(pm, test, circuit, **kw)
    _log(args.quiet, "[3/3] done")
    return res, pm.n_edges, n_test


def format_mib_table(res, n_edges: int, title: str) -> str:
    """MIB's table: each circuit's share of the edges, its edges and faithfulness; CPR, CMD."""
    lines = [title, f"{'% edges':>8} {'edges':>7} {'faithfulness':>13}"]
    for p, c, f in zip(res.fractions, res.weighted_edge_counts, res.faithfulnesses):
        lines.append(f"{100 * p:>7.3g}% {int(c):>7} {f:>13.3f}")
    lines.append(f"CPR {res.area_under:.3f} (higher is better)   CMD {res.area_from_1:.3f} (lower is better)   "
                 f"average {res.average:.3f}   [{n_edges} edges]")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# zoo


def zoo_table() -> str:
    from funcpatch import zoo

    names = zoo.list_models()
    if not names:
        return "the zoo is empty"
    rows = []
    for n in names:
        card = zoo.info(n)
        arch = card.get("architecture", "?")
        shape = ", ".join(f"{k} {card[k]}" for k in ("n_layer", "n_head", "n_kv_head", "d_model") if k in card)
        acc = card.get("accuracy")
        rows.append((n, card.get("task", "?"), f"{arch} ({shape})" if shape else arch,
                     "" if acc is None else f"{acc:.1%}"))
    w = [max(len(r[i]) for r in rows + [("model", "task", "architecture", "accuracy")]) for i in range(4)]
    head = ("model", "task", "architecture", "accuracy")
    lines = ["  ".join(h.ljust(w[i]) for i, h in enumerate(head))]
    lines += ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    lines.append("")
    for n in names:
        lines.append(f"{n}: model {zoo.model_dir(n).resolve()}")
        lines.append(f"{' ' * len(n)}  dataset {zoo.dataset_path(n).resolve()}")
    lines.append(f"run one: {PROG} discover --model {names[0]}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Parser and entry point


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Functional edge patching and automatic circuit discovery.")
    p.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = p.add_subparsers(dest="command", metavar="{discover,evaluate,zoo}", parser_class=_Parser)
    algos = _ALL_ALGORITHMS  # not available_algorithms(): the help needs no torch import
    d = sub.add_parser("discover", help="discover a circuit and measure its faithfulness",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="algorithms (--algo):\n" + "\n".join(f"  {a.name:<22}{a.help}" for a in algos),
                       description="Score every edge of a model on a task, evaluate the circuits of the MIB "
                                   "sizes on held-out prompts, print the faithfulness table and write "
                                   "circuit.png, faithfulness.png, scores.safetensors, edges.json and "
                                   "summary.json to --out.")
    d.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a zoo model name (see '{PROG} zoo') or a local transformers folder (default: %(default)s)")
    d.add_argument("--dataset", default=None,
                   help="prompt pairs in auto-circuit's JSON format (default: the zoo model's dataset.json, "
                        "or dataset.json in the model folder)")
    d.add_argument("--algo", default=DEFAULT_ALGO,
                   help=f"the scoring algorithm, any case: {', '.join(a.name for a in algos)} (described below; "
                        "default: %(default)s)")
    d.add_argument("--ablation", default="resample",
                   help="the ablation: an AblationType name, any case (resample, zero, tokenwise_mean_corrupt, ...; "
                        "default: %(default)s)")
    d.add_argument("--edges", type=int, default=None,
                   help=f"edges drawn in circuit.png (default: the smallest evaluated circuit with "
                        f"faithfulness >= {DRAW_FAITHFULNESS}, else the most faithful one)")
    d.add_argument("--grouped-kv", action="store_true",
                   help="grouped-query attention: one K and one V destination per key/value head (A{l}.kv{g}.K/V) "
                        "instead of one per query head (MIB's graph, the default)")
    d.add_argument("--samples", type=int, default=5, help="integration steps of eap_ig (default: %(default)s)")
    d.add_argument("--sp-epochs", type=int, default=20,
                   help="training epochs of subnetwork_probing (default: %(default)s)")
    d.add_argument("--sp-lambda", type=float, default=10.0,
                   help="weight of subnetwork_probing's circuit-size penalty (default: %(default)s)")
    d.add_argument("--endpoint", choices=("clean", "corrupt"), default="corrupt",
                   help="eap_ig's interpolation points: corrupt = k 0..m-1 as EAP-IG's code (MIB's numbers), "
                        "clean = k 1..m as the paper (default: %(default)s)")
    d.add_argument("--prompts", type=int, default=64,
                   help="prompts in each of the train and test splits, at most half the dataset (default: %(default)s)")
    d.add_argument("--batch-size", type=int, default=32, help="prompts per batch (default: %(default)s)")
    d.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    d.add_argument("--seed", type=int, default=0, help="seed of the train/test split and of torch (default: %(default)s)")
    d.add_argument("--quiet", action="store_true", help="no progress bars or status lines; print only the table")
    d.add_argument("--mib-out", default=None, metavar="DIR",
                   help="also write the circuit in MIB's submission layout under DIR: importances/NAME/importances.json "
                        "and multiple_circuits/NAME/<percent>.json")
    d.add_argument("--mib-name", default=None, metavar="NAME",
                   help="the MIB folder name, {task}_{model} (default: the zoo model or dataset name, then the model)")
    e = sub.add_parser("evaluate", help="MIB's evaluation of a circuit file",
                       description="MIB's evaluation (evaluate_area_under_curve) of a circuit: funcpatch's "
                                   "scores.safetensors, an EAP-IG/MIB .json or .pt, auto-circuit's PruneScores .pt, "
                                   "or a MIB submission's {task}_{model} folder. Prints the faithfulness table, "
                                   "CPR and CMD.")
    e.add_argument("circuit", metavar="CIRCUIT", help="a circuit file or a MIB {task}_{model} folder")
    e.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"a zoo model name (see '{PROG} zoo') or a local transformers folder (default: %(default)s)")
    e.add_argument("--dataset", default=None,
                   help="prompt pairs: auto-circuit's JSON or EAP-IG's CSV (default: the model's dataset.json)")
    e.add_argument("--intervention", default="patching",
                   help="patching, zero, mean or mean-positional (means over the train split; default: %(default)s)")
    e.add_argument("--metric", default="logit_diff",
                   help="logit_diff, prob_diff or prob_mass_diff (greater-than; default: %(default)s)")
    e.add_argument("--signed", action="store_true", help="rank edges by score, not by |score| (MIB's absolute=False)")
    e.add_argument("--log-scale", action="store_true", help="CPR and CMD over the log of the edge fraction")
    e.add_argument("--prompts", type=int, default=64,
                   help="prompts in each of the train and test splits, as discover splits them (default: %(default)s)")
    e.add_argument("--batch-size", type=int, default=32, help="prompts per batch (default: %(default)s)")
    e.add_argument("--seed", type=int, default=0, help="seed of the train/test split (default: %(default)s)")
    e.add_argument("--quiet", action="store_true", help="no status lines; print only the table")
    sub.add_parser("zoo", help="list the zoo's models and tasks", description="List the zoo's models and tasks.")
    return p


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("funcpatch")
    except Exception:  # noqa: BLE001
        return "unknown"


def _one_line(e: BaseException, limit: int = 600) -> str:
    msg = " ".join(str(e).split())
    if isinstance(e, KeyError) and msg.startswith(("'", '"')) and msg.endswith(("'", '"')):
        msg = msg[1:-1]
    if len(msg) > limit:
        msg = msg[: limit - 3] + "..."
    return msg or type(e).__name__


def _run(argv: Optional[Sequence[str]]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        raise CLIError(f"{PROG}: give a command: discover, evaluate or zoo (see '{PROG} --help')", code=2)
    if args.command == "zoo":
        print(zoo_table())
        return 0
    if args.command == "evaluate":
        res, n_edges, n_test = evaluate(args)
        print(format_mib_table(res, n_edges, f"MIB evaluation of {args.circuit} ({args.intervention}, "
                                             f"{args.metric}, {n_test} test prompts)"))
        return 0
    result = discover(args)
    if not result.files:  # a rank other than 0 under torchrun
        return 0
    print(format_table(result, args.algo))
    if not args.quiet:
        print(f"wrote {', '.join(result.files.values())}  ({result.drawn_edges} edges drawn; "
              f"{result.seconds:.1f} s)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``funcpatch`` command; returns the exit status (never raises,
    except with ``FUNCPATCH_DEBUG=1``)."""
    debug = os.environ.get("FUNCPATCH_DEBUG", "") not in ("", "0")
    try:
        return _run(argv)
    except CLIError as e:
        if debug:
            raise
        print(_one_line(e) if str(e).startswith(PROG) else f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return e.code
    except SystemExit as e:  # --help / --version
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the command reports, it does not crash
        if debug:
            raise
        print(f"{PROG}: error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
