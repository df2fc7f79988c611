"""The ``funcpatch`` command.

``funcpatch discover``
    Discover a circuit on a model and its task, evaluate it, and write the results.
    With no arguments it runs on the zoo's induction model and its held-out prompts:
    scores every edge with EAP-IG on a train split, measures the faithfulness of the
    circuits of the MIB sizes (0.1% .. 100% of the edges) on a test split, prints the
    table with the CPR and CMD, and writes to ``--out`` (default ``out/``):

    - ``circuit.png``: the diagram of the circuit (``--edges`` edges);
    - ``faithfulness.png``: faithfulness against circuit size;
    - ``scores.safetensors``: the prune scores (dest module -> tensor shaped like its mask);
    - ``edges.json``: every edge with its score, sorted by ``|score|``;
    - ``summary.json``: the settings, the table, CPR and CMD.

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
import sys
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

__all__ = ["main", "ALGORITHMS", "CLIError", "discover", "DiscoverResult"]


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
                                               ablation_type=a.ablation, progress=progress)


def _run_eap_ig_mask(pm, loader, a, progress):
    return _algo_fn("mask_gradient", "eap_ig")(pm, loader, samples=a.samples, variant="mask",
                                               ablation_type=a.ablation, progress=progress)


def _run_exact(pm, loader, a, progress):
    return _algo_fn("exact", "exact_patching")(pm, loader, ablation_type=a.ablation, progress=progress)


def _run_acdc(pm, loader, a, progress):
    return _algo_fn("acdc", "acdc")(pm, loader, ablation_type=a.ablation, progress=progress)


def _run_sp(pm, loader, a, progress):
    fn = _algo_fn("probing", "subnetwork_probing")
    return fn(pm, loader, ablation_type=a.ablation, clean_corrupt="corrupt" if a.ablation.batch_specific else None,
              seed=a.seed, progress=progress)


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
    Algorithm("subnetwork_probing", "learned edge masks (hard concrete, 20 epochs)", _run_sp, "probing",
              "subnetwork_probing"),
    Algorithm("activation_magnitude", "baseline: mean |activation| of each edge's source", _run_magnitude,
              "simple", "activation_magnitude"),
    Algorithm("random", "baseline: random scores (--seed)", _run_random, "simple", "random_scores"),
)


def available_algorithms() -> Dict[str, Algorithm]:
    """The algorithms this installation has, by command-line name."""
    return {a.name: a for a in _ALL_ALGORITHMS if _algo_fn(a.module, a.attr) is not None}


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


def resolve_model(model: str, dataset: Optional[str]) -> Tuple[str, Optional[Path], Path]:
    """``(kind, folder, dataset path)`` for a zoo name or a local transformers folder."""
    from funcpatch import zoo

    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CLIError(f"{PROG} discover: {model} is a folder without config.json: not a transformers model folder")
        if dataset is None:
            if not (path / "dataset.json").is_file():
                raise CLIError(f"{PROG} discover: {model} has no dataset.json: pass --dataset FILE.json")
            dataset = str(path / "dataset.json")
        kind = "folder"
    else:
        names = zoo.list_models()
        if model not in names:
            raise CLIError(f"{PROG} discover: --model {model!r} is neither a zoo model ({', '.join(names) or 'none'}) "
                           "nor a folder", code=2)
        if dataset is None:
            dataset = str(zoo.dataset_path(model))
        path = None
        kind = "zoo"
    ds = Path(dataset).expanduser()
    if not ds.is_file():
        raise CLIError(f"{PROG} discover: dataset file not found: {dataset}")
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


# --------------------------------------------------------------------------------------
# Discover


@dataclass
class DiscoverResult:
    """What ``funcpatch discover`` computed (also returned by :func:`discover`)."""

    prune_scores: Dict[str, Any]
    percentages: List[float]
    edge_counts: List[int]
    real_sizes: List[int]
    metric: List[float]
    faithfulness: List[float]
    m_empty: float
    m_full: float
    cpr: float
    cmd: float
    files: Dict[str, str]
    n_edges: int
    drawn_edges: int
    seconds: float


def _mean_logit_diff(outputs: Dict[int, Any], batches) -> float:
    import torch

    from funcpatch.metrics import logit_diff

    vals = [logit_diff(outputs[b.key], b.answers, b.wrong_answers, per_prompt=True) for b in batches]
    return float(torch.cat([v.reshape(-1) for v in vals]).mean())


def _score_float(x: float):
    """A score for JSON: a float, or "inf" / "-inf" (JSON has no infinities)."""
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return float(x)


def _edges_json(pm, scores) -> List[Dict[str, Any]]:
    flat = {k: v.detach().double().cpu() for k, v in scores.items()}
    rows = []
    for e in pm.graph.edges:
        s = float(e.prune_score(flat))
        row = {"edge": e.name, "src": e.src.name, "dest": e.dest.name}
        if e.seq_idx is not None:
            row["seq_idx"] = e.seq_idx
        row["score"] = s
        rows.append(row)
    rows.sort(key=lambda r: -abs(r["score"]) if not math.isnan(r["score"]) else 0.0)
    for i, r in enumerate(rows):
        r["rank"] = i + 1
        r["score"] = _score_float(r["score"])
    return rows


def _log(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def discover(args) -> DiscoverResult:
    """Run ``funcpatch discover`` with parsed arguments (see :func:`build_parser`)."""
    t0 = time.perf_counter()
    quiet, progress = args.quiet, not args.quiet
    ablation = _ablation_type(args.ablation)
    args.ablation = ablation
    algos = available_algorithms()
    if args.algo not in algos:
        raise CLIError(f"{PROG} discover: unknown --algo {args.algo!r}; available: {', '.join(algos)}", code=2)
    for flag, v, lo in (("--samples", args.samples, 1), ("--prompts", args.prompts, 2), ("--batch-size", args.batch_size, 1)):
        if v < lo:
            raise CLIError(f"{PROG} discover: {flag} must be >= {lo}, got {v}", code=2)
    if args.edges is not None and args.edges < 1:
        raise CLIError(f"{PROG} discover: --edges must be >= 1, got {args.edges}", code=2)
    kind, folder, dataset = resolve_model(args.model, args.dataset)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise CLIError(f"{PROG} discover: --out {args.out} exists and is not a folder")

    _quiet_libraries()
    import torch

    import funcpatch as fp
    from funcpatch import distributed, metrics, viz
    from funcpatch.circuits import PatchType, run_circuits
    from funcpatch.datasets import load_datasets_from_json, read_dataset_json
    from funcpatch.edge_counts import circuit_size_at

    if distributed.init_from_env() and not distributed.is_main():  # under torchrun: rank 0 reports
        quiet, progress = True, False
    torch.manual_seed(args.seed)
    _log(quiet, f"[1/4] loading {args.model} ({'zoo' if kind == 'zoo' else 'folder'})")
    hf, tok = load_model(args.model, kind, folder)
    bridge = fp.models.from_hf(hf, tok)
    pm = fp.patchable(bridge, slice_output="last_seq")

    n_prompts = len(read_dataset_json(dataset)["prompts"])
    if n_prompts < 2:
        raise CLIError(f"{PROG} discover: {dataset} has {n_prompts} prompt; a train and a test split need 2")
    n_train = min(args.prompts, n_prompts // 2)
    n_test = min(args.prompts, n_prompts - n_train)
    train, test = load_datasets_from_json(tok, dataset, batch_size=args.batch_size,
                                          train_test_size=(n_train, n_test), random_seed=args.seed)
    test_batches = list(test)
    _log(quiet, f"      {pm.n_edges} edges; {n_train} train / {n_test} test prompts from {dataset}")

    _log(quiet, f"[2/4] scoring edges with {args.algo} (ablation: {ablation.name.lower()})")
    scores = algos[args.algo].run(pm, train, args, progress)
    scores = {k: v.detach() for k, v in scores.items()}

    _log(quiet, "[3/4] evaluating circuits on the test prompts")
    n_edges = pm.n_edges
    percentages = list(metrics.MIB_PERCENTAGES)
    counts = metrics.mib_edge_counts(n_edges, percentages)
    real = [circuit_size_at(scores, c) for c in counts]
    wanted = list(dict.fromkeys([0] + counts + [n_edges]))  # the empty circuit and the full model too
    outs = run_circuits(pm, test_batches, wanted, scores, patch_type=PatchType.TREE_PATCH,
                        ablation_type=ablation, progress=progress, vmap_sizes=True)
    if 0 not in outs or n_edges not in outs:  # infinite scores: the empty circuit was not run
        zeros = {k: torch.zeros_like(v) for k, v in scores.items()}
        base = run_circuits(pm, test_batches, [0, n_edges], zeros, patch_type=PatchType.TREE_PATCH,
                            ablation_type=ablation, progress=False)
        outs = {**base, **outs}
    metric_at = {s: _mean_logit_diff(outs[s], test_batches) for s in outs}
    m_empty, m_full = metric_at[0], metric_at[n_edges]
    by_count = {c: metric_at[r] for c, r in zip(counts, real)}
    try:
        ps, faith = metrics.faithfulness_curve(by_count, n_edges, m_empty, m_full, percentages)
    except ZeroDivisionError as e:
        raise CLIError(f"{PROG} discover: the full model and the empty circuit have the same logit difference "
                       f"({m_full:.4g}) on this task: faithfulness is undefined") from e
    c_pr, c_md = metrics.cpr(ps, faith), metrics.cmd(ps, faith)

    drawn = args.edges
    if drawn is None:  # the smallest evaluated circuit with faithfulness >= 0.8, within [5, 40]
        hit = [c for c, f in zip(counts, faith) if f >= 0.8 and c > 0]
        drawn = max(5, min(hit[0] if hit else 40, 40))
    drawn = min(drawn, n_edges)

    if not distributed.is_main():  # the other ranks computed their share; rank 0 writes
        return DiscoverResult(scores, ps, counts, real, [by_count[c] for c in counts], faith, m_empty, m_full,
                              c_pr, c_md, {}, n_edges, drawn, time.perf_counter() - t0)
    _log(quiet, f"[4/4] writing {out}/")
    out.mkdir(parents=True, exist_ok=True)
    files = {"circuit": str(out / "circuit.png"), "faithfulness": str(out / "faithfulness.png"),
             "scores": str(out / "scores.safetensors"), "edges": str(out / "edges.json"),
             "summary": str(out / "summary.json")}
    name = args.model if kind == "zoo" else Path(args.model).name
    viz.draw_circuit(pm, scores, n_edges=drawn, path=files["circuit"],
                     title=f"{name}: top {drawn} of {n_edges} edges ({args.algo}, {ablation.name.lower()})")
    viz.plot_faithfulness(ps, faith, files["faithfulness"], label=args.algo,
                          title=f"{name}: faithfulness against circuit size ({n_test} test prompts)")
    from safetensors.torch import save_file

    save_file({k: v.contiguous().cpu() for k, v in scores.items()}, files["scores"],
              metadata={"model": str(args.model), "algo": args.algo, "ablation": ablation.name,
                        "n_edges": str(n_edges), "format": "funcpatch PruneScores: dest module -> [seq?, heads?, n_in_srcs]"})
    with open(files["edges"], "w") as f:
        json.dump(_edges_json(pm, scores), f, indent=1)
    result = DiscoverResult(scores, ps, counts, real, [by_count[c] for c in counts], faith, m_empty, m_full,
                            c_pr, c_md, files, n_edges, drawn, time.perf_counter() - t0)
    summary = {
        "model": str(args.model), "dataset": str(dataset), "algo": args.algo, "ablation": ablation.name,
        "samples": args.samples if args.algo.startswith("eap_ig") else None, "seed": args.seed,
        "n_edges": n_edges, "n_train": n_train, "n_test": n_test, "patch_type": "TREE_PATCH",
        "metric": "logit_diff", "m_full": m_full, "m_empty": m_empty,
        "table": [{"percent": p, "edges": c, "circuit_edges": r, "logit_diff": m, "faithfulness": fa}
                  for p, c, r, m, fa in zip(ps, counts, real, result.metric, faith)],
        "cpr": c_pr, "cmd": c_md, "drawn_edges": drawn, "seconds": round(result.seconds, 2),
    }
    with open(files["summary"], "w") as f:
        json.dump(summary, f, indent=1)
    return result


def format_table(r: DiscoverResult, algo: str) -> str:
    """The faithfulness table printed by ``funcpatch discover``."""
    lines = [f"Faithfulness of the {algo} circuits (logit difference on the test prompts; "
             f"full model {r.m_full:.3f}, empty circuit {r.m_empty:.3f})",
             f"{'% edges':>8} {'edges':>7} {'logit diff':>11} {'faithfulness':>13}"]
    for p, c, real, m, f in zip(r.percentages, r.edge_counts, r.real_sizes, r.metric, r.faithfulness):
        size = f"{c}" if real == c else f"{c}({real})"
        lines.append(f"{p:>7g}% {size:>7} {m:>11.3f} {f:>13.3f}")
    lines.append(f"CPR {r.cpr:.3f} (higher is better)   CMD {r.cmd:.3f} (lower is better)   "
                 f"[{r.n_edges} edges]")
    if any(c != real for c, real in zip(r.edge_counts, r.real_sizes)):
        lines.append("n(m): tied scores put m edges in the circuit of nominal size n")
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
        shape = ", ".join(f"{k} {card[k]}" for k in ("n_layer", "n_head", "d_model") if k in card)
        acc = card.get("accuracy")
        rows.append((n, card.get("task", "?"), f"{arch} ({shape})" if shape else arch,
                     "" if acc is None else f"{acc:.1%}"))
    w = [max(len(r[i]) for r in rows + [("model", "task", "architecture", "accuracy")]) for i in range(4)]
    head = ("model", "task", "architecture", "accuracy")
    lines = ["  ".join(h.ljust(w[i]) for i, h in enumerate(head))]
    lines += ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    lines.append(f"run one: {PROG} discover --model {names[0]}   (dataset: funcpatch.zoo.dataset_path(name))")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Parser and entry point


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Functional edge patching and automatic circuit discovery.")
    p.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = p.add_subparsers(dest="command", metavar="{discover,zoo}", parser_class=_Parser)
    d = sub.add_parser("discover", help="discover a circuit and measure its faithfulness",
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
                   help="eap, eap_ig, eap_ig_mask, exact, acdc, activation_magnitude, random, ... "
                        "(default: %(default)s)")
    d.add_argument("--ablation", default="resample",
                   help="the ablation: an AblationType name, any case (resample, zero, tokenwise_mean_corrupt, ...; "
                        "default: %(default)s)")
    d.add_argument("--edges", type=int, default=None,
                   help="edges drawn in circuit.png (default: the smallest evaluated circuit with "
                        "faithfulness >= 0.8, between 5 and 40)")
    d.add_argument("--samples", type=int, default=5, help="integration steps of eap_ig (default: %(default)s)")
    d.add_argument("--prompts", type=int, default=64,
                   help="prompts in each of the train and test splits, at most half the dataset (default: %(default)s)")
    d.add_argument("--batch-size", type=int, default=32, help="prompts per batch (default: %(default)s)")
    d.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    d.add_argument("--seed", type=int, default=0, help="seed of the train/test split and of torch (default: %(default)s)")
    d.add_argument("--quiet", action="store_true", help="no progress bars or status lines; print only the table")
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
        raise CLIError(f"{PROG}: give a command: discover or zoo (see '{PROG} --help')", code=2)
    if args.command == "zoo":
        print(zoo_table())
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
