"""Circuit files of EAP-IG / MIB (JSON and ``.pt``) and auto-circuit (PruneScores ``.pt``).

EAP-IG's graph (GitHub hannamw/EAP-IG, ``src/eap/graph.py``), which MIB's circuit track
evaluates, is funcpatch's factorized, Q/K/V-split graph of a transformer with MLPs, under
other names:

=====================  ==========================
funcpatch              EAP-IG / MIB
=====================  ==========================
``Resid Start``        ``input``
``A{l}.{h}``           ``a{l}.h{h}``
``MLP {l}``            ``m{l}``
``Resid End``          ``logits``
``A{l}.{h}.Q/K/V``     ``a{l}.h{h}<q>/<k>/<v>``
=====================  ==========================

Edge ``"A0.1->A1.2.Q"`` is ``"a0.h1->a1.h2<q>"``. Its ``.pt`` layout holds one
``[n_forward, n_backward]`` matrix: row = the source's forward index (``input`` 0, then
per layer its heads and its MLP: funcpatch's ``src_idx``), column = the destination's
backward index (per layer ``3 * n_heads`` Q/K/V columns, Q heads first, then the MLP; the
logits last). Entries that are no edge hold score 0 and flag False.

MIB's ``input`` node is the token embedding alone (``hook_embed``), funcpatch's
``Resid Start`` is token plus position embedding; the two name the same edges, and an
edge's score carries over unchanged (what an ablation of the input *means* is
:func:`funcpatch.mib.evaluate`'s business).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Tuple

import torch

from funcpatch.backends import MicroBackend
from funcpatch.circuits import check_prune_scores
from funcpatch.graph import Edge

__all__ = ["FORMATS", "MibGraphError", "check_mib_graph", "mib_cfg", "to_mib_name", "from_mib_name",
           "save", "load"]

#: ``format=`` values of :func:`save`: EAP-IG's JSON, EAP-IG's ``.pt``, auto-circuit's PruneScores ``.pt``
FORMATS = ("json", "pt", "autocircuit")
_SUFFIX_FORMATS = {".json": "json", ".pt": "pt"}
_PT_KEYS = ("cfg", "src_nodes", "dst_nodes", "edges_scores", "edges_in_graph", "nodes_in_graph")

_OURS = (  # funcpatch node name -> MIB node name
    (re.compile(r"^Resid Start$"), lambda m: "input"),
    (re.compile(r"^Resid End$"), lambda m: "logits"),
    (re.compile(r"^MLP (\d+)$"), lambda m: f"m{m[1]}"),
    (re.compile(r"^A(\d+)\.(\d+)$"), lambda m: f"a{m[1]}.h{m[2]}"),
    (re.compile(r"^A(\d+)\.(\d+)\.([QKV])$"), lambda m: f"a{m[1]}.h{m[2]}<{m[3].lower()}>"),
)
_THEIRS = (  # MIB node name -> funcpatch node name
    (re.compile(r"^input$"), lambda m: "Resid Start"),
    (re.compile(r"^logits$"), lambda m: "Resid End"),
    (re.compile(r"^m(\d+)$"), lambda m: f"MLP {m[1]}"),
    (re.compile(r"^a(\d+)\.h(\d+)$"), lambda m: f"A{m[1]}.{m[2]}"),
    (re.compile(r"^a(\d+)\.h(\d+)<([qkv])>$"), lambda m: f"A{m[1]}.{m[2]}.{m[3].upper()}"),
)


class MibGraphError(ValueError):
    """The graph or file cannot be expressed in (or read from) EAP-IG/MIB's graph."""


def _rename(name: str, rules, what: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"a {what} node or edge name must be a str, got {type(name).__name__}")
    if "->" in name:
        src, _, dest = name.partition("->")
        return f"{_rename(src, rules, what)}->{_rename(dest, rules, what)}"
    for pattern, fn in rules:
        m = pattern.match(name)
        if m:
            return fn(m)
    raise MibGraphError(f"{name!r} is no {what} node name; {what} names are "
                        + ("'Resid Start', 'A{l}.{h}', 'A{l}.{h}.Q/K/V', 'MLP {l}', 'Resid End'" if rules is _OURS
                           else "'input', 'a{l}.h{h}', 'a{l}.h{h}<q/k/v>', 'm{l}', 'logits'"))


def to_mib_name(name: str) -> str:
    """funcpatch node or edge name -> EAP-IG/MIB's (``"A0.1->MLP 2"`` -> ``"a0.h1->m2"``)."""
    return _rename(name, _OURS, "funcpatch")


def from_mib_name(name: str) -> str:
    """EAP-IG/MIB node or edge name -> funcpatch's (``"a0.h1->a1.h2<q>"`` -> ``"A0.1->A1.2.Q"``)."""
    return _rename(name, _THEIRS, "MIB")


def check_mib_graph(pm) -> None:
    """Raise :class:`MibGraphError` unless ``pm``'s graph is one EAP-IG/MIB can express:
    a transformer's factorized graph, Q/K/V split, with MLPs, not token-specific, one
    K/V destination per query head."""
    why = None
    if isinstance(pm.backend, MicroBackend):
        why = "a MicroModel graph (MIB's graph is a transformer's: attention heads and MLPs)"
    elif not pm.graph.factorized:
        why = "a residual graph (factorized=False); MIB's graph is factorized: build pm with factorized=True"
    elif pm.graph.seq_len is not None:
        why = f"a token-specific graph (seq_len={pm.graph.seq_len}); MIB's edges span all positions: seq_len=None"
    elif not pm.separate_qkv:
        why = "a graph without the Q/K/V split (separate_qkv=False); MIB's has it: separate_qkv=True"
    elif not any(s.name.startswith("MLP ") for s in pm.graph.srcs):
        why = "an attention-only graph; MIB's graph has an MLP node in every layer"
    else:
        for n in pm.graph.nodes:
            try:
                to_mib_name(n.name)
            except MibGraphError:
                why = (f"a graph with node {n.name!r}, which MIB's graph has no counterpart for (grouped K/V "
                       "destinations: build pm with grouped_kv=False for MIB's per-query-head graph)")
                break
    if why:
        raise MibGraphError(f"EAP-IG/MIB's graph cannot express {why}")


def mib_cfg(pm) -> Dict[str, object]:
    """The ``cfg`` EAP-IG writes: ``n_layers``, ``n_heads``, ``parallel_attn_mlp``, ``d_model``."""
    check_mib_graph(pm)
    shape = pm.backend.shape(pm.model)
    d_model = getattr(getattr(pm.model, "cfg", None), "d_model", None)  # TransformerLens
    if d_model is None:  # a transformers model
        d_model = getattr(getattr(pm.model, "config", None), "hidden_size", None)
    if d_model is None:
        raise MibGraphError(f"cannot read d_model from a {type(pm.model).__name__} (no .cfg.d_model, "
                            "no .config.hidden_size)")
    return {"n_layers": shape.n_layers, "n_heads": shape.n_heads, "parallel_attn_mlp": shape.parallel_attn_mlp,
            "d_model": int(d_model)}


def _forward_index(name: str, n_heads: int) -> int:
    """EAP-IG's row of a MIB source node name."""
    if name == "input":
        return 0
    m = re.match(r"^a(\d+)\.h(\d+)$", name)
    if m:
        return 1 + int(m[1]) * (n_heads + 1) + int(m[2])
    m = re.match(r"^m(\d+)$", name)
    return 1 + int(m[1]) * (n_heads + 1) + n_heads


def _backward_index(name: str, n_layers: int, n_heads: int) -> int:
    """EAP-IG's column of a MIB destination name."""
    if name == "logits":
        return n_layers * (3 * n_heads + 1)
    m = re.match(r"^a(\d+)\.h(\d+)<([qkv])>$", name)
    if m:
        return int(m[1]) * (3 * n_heads + 1) + "qkv".index(m[3]) * n_heads + int(m[2])
    m = re.match(r"^m(\d+)$", name)
    return int(m[1]) * (3 * n_heads + 1) + 3 * n_heads


def _node_lists(cfg) -> Tuple[list, list]:
    """EAP-IG's ``src_nodes`` and ``dst_nodes`` (the rows' and columns' names, in order)."""
    L, H = cfg["n_layers"], cfg["n_heads"]
    srcs = ["input"] + [n for layer in range(L) for n in [f"a{layer}.h{h}" for h in range(H)] + [f"m{layer}"]]
    dsts = [n for layer in range(L) for n in
            [f"a{layer}.h{h}<{x}>" for x in "qkv" for h in range(H)] + [f"m{layer}"]] + ["logits"]
    return srcs, dsts


def _forward_to_backward(cfg) -> torch.Tensor:
    """``[n_fwd, n_bwd]``: True where a column is one of the row node's own inputs (EAP-IG's
    ``forward_to_backward``)."""
    srcs, dsts = _node_lists(cfg)
    out = torch.zeros(len(srcs), len(dsts), dtype=torch.bool)
    for c, d in enumerate(dsts[:-1]):
        out[srcs.index(d.split("<")[0]), c] = True
    return out


def _edge_cells(pm, cfg):
    """(edge, MIB edge name, row, column) for every edge of ``pm``'s graph."""
    L, H = cfg["n_layers"], cfg["n_heads"]
    for e in pm.graph.edges:
        src, dest = to_mib_name(e.src.name), to_mib_name(e.dest.name)
        yield e, f"{src}->{dest}", _forward_index(src, H), _backward_index(dest, L, H)


def _in_graph_masks(pm, in_graph) -> Dict[str, torch.Tensor]:
    """``in_graph`` (None = every edge; a mask-shaped dict; or edges / edge names) as bool masks."""
    template = {m.module_name: torch.zeros(m.mask_shape(None), dtype=torch.bool) for m in pm.graph.dest_modules}
    if in_graph is None:
        return {k: ~v for k, v in template.items()}
    if isinstance(in_graph, Mapping):
        check_prune_scores(pm, in_graph)
        return {k: in_graph[k].detach().cpu().bool() for k in template}
    if isinstance(in_graph, (str, Edge)):
        in_graph = [in_graph]
    for e in pm.graph.edges_named(in_graph):
        template[e.dest.module_name][e.patch_idx] = True
    return template


def _matrices(pm, scores, in_graph):
    cfg = mib_cfg(pm)
    check_prune_scores(pm, scores)
    flags = _in_graph_masks(pm, in_graph)
    n_fwd, n_bwd = 1 + cfg["n_layers"] * (cfg["n_heads"] + 1), cfg["n_layers"] * (3 * cfg["n_heads"] + 1) + 1
    s = torch.zeros(n_fwd, n_bwd)
    f = torch.zeros(n_fwd, n_bwd, dtype=torch.bool)
    cells = list(_edge_cells(pm, cfg))
    for e, _, r, c in cells:
        s[r, c] = float(e.prune_score(scores))
        f[r, c] = bool(flags[e.dest.module_name][e.patch_idx])
    # A node is in the graph when it has an outgoing and (but the input) an incoming edge in it (EAP-IG's rule
    # after a top-n); evaluation prunes whatever dangles.
    nodes = f.any(dim=1) & ((_forward_to_backward(cfg) & f.any(dim=0)).any(dim=1))
    nodes[0] = bool(f[0].any())
    return cfg, cells, s, f, nodes


def save(pm, scores: Mapping[str, torch.Tensor], path, in_graph=None, format: Optional[str] = None) -> Path:
    """Write a circuit's edge scores and in-graph flags in EAP-IG/MIB's layout (or auto-circuit's).

    Args:
        pm: a :class:`funcpatch.PatchableModel` whose graph MIB can express
            (:func:`check_mib_graph`; others raise :class:`MibGraphError`).
        scores: PruneScores, dest module -> ``[heads?, n_in_srcs]``.
        path: the file to write.
        in_graph: which edges are in the circuit: None (all of them, as for a scores file),
            a bool dict shaped like ``scores``, or a collection of edges / edge names.
        format: ``"json"`` (EAP-IG's ``Graph.to_json``: ``cfg``, ``nodes``, ``edges`` keyed by
            MIB edge names), ``"pt"`` (EAP-IG's ``Graph.to_pt``: ``cfg``, ``src_nodes``,
            ``dst_nodes``, ``edges_scores [n_fwd, n_bwd]``, ``edges_in_graph``,
            ``nodes_in_graph [n_fwd]``) or ``"autocircuit"`` (``torch.save`` of the scores dict);
            None picks it by suffix (``.json`` / ``.pt``).

    Scores are stored as float32, as EAP-IG stores them. Returns the path.
    """
    path = Path(path)
    if format is None:
        format = _SUFFIX_FORMATS.get(path.suffix)
        if format is None:
            raise ValueError(f"cannot tell the format of {str(path)!r} from its suffix {path.suffix!r}: use a "
                             f"suffix in {sorted(_SUFFIX_FORMATS)} or pass format= one of {list(FORMATS)}")
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; valid: {list(FORMATS)}")
    if format == "autocircuit":
        check_prune_scores(pm, scores)
        if in_graph is not None:
            raise ValueError("auto-circuit's PruneScores files hold scores only: pass in_graph=None with "
                             "format='autocircuit', or use format='json' / 'pt'")
        torch.save({k: v.detach().cpu() for k, v in scores.items()}, path)
        return path
    cfg, cells, s, f, nodes = _matrices(pm, scores, in_graph)
    if format == "pt":
        srcs, dsts = _node_lists(cfg)
        torch.save({"cfg": cfg, "src_nodes": srcs, "dst_nodes": dsts, "edges_scores": s, "edges_in_graph": f,
                    "nodes_in_graph": nodes}, path)
        return path
    srcs, _ = _node_lists(cfg)
    node_dict = {n: {"in_graph": bool(nodes[i])} for i, n in enumerate(srcs)}
    node_dict["logits"] = {"in_graph": True}
    edge_dict = {name: {"score": float(s[r, c]), "in_graph": bool(f[r, c])} for _, name, r, c in cells}
    with open(path, "w") as fh:
        json.dump({"cfg": cfg, "nodes": node_dict, "edges": edge_dict}, fh)
    return path


def _check_cfg(pm, cfg, path) -> dict:
    ours = mib_cfg(pm)
    if not isinstance(cfg, Mapping):
        raise MibGraphError(f"{path}: 'cfg' must be a dict, got {type(cfg).__name__}")
    for k in ("n_layers", "n_heads", "parallel_attn_mlp", "d_model"):
        if k == "d_model" and k not in cfg:  # only neuron-level circuits need it
            continue
        theirs = cfg.get(k, False if k == "parallel_attn_mlp" else None)
        if (bool(theirs) if k == "parallel_attn_mlp" else theirs) != ours[k]:
            raise MibGraphError(f"{path}: the circuit is for a model with {k}={theirs!r}, this model has "
                                f"{k}={ours[k]!r}")
    return ours


def _refuse_finer(path, what: Iterable[str]) -> None:
    what = list(what)
    if what:
        raise MibGraphError(f"{path}: node- or neuron-level entries {what} are not supported; funcpatch reads "
                            "edge-level circuits (edge scores and in-graph flags)")


def _load_json(pm, path):
    with open(path) as fh:
        try:
            d = json.load(fh)
        except json.JSONDecodeError as e:
            raise MibGraphError(f"{path}: not valid JSON ({e})") from None
    missing = [k for k in ("cfg", "nodes", "edges") if not isinstance(d, dict) or k not in d]
    if missing:
        raise MibGraphError(f"{path}: an EAP-IG/MIB JSON circuit needs keys 'cfg', 'nodes', 'edges'; missing {missing}")
    cfg = _check_cfg(pm, d["cfg"], path)
    _refuse_finer(path, sorted({k for v in d["nodes"].values() if isinstance(v, dict) for k in v} - {"in_graph"}))
    cells = {name: (e, r, c) for e, name, r, c in _edge_cells(pm, cfg)}
    unknown = sorted(set(d["edges"]) - set(cells))
    absent = sorted(set(cells) - set(d["edges"]))
    if unknown or absent:
        raise MibGraphError(f"{path}: its edges do not match this model's MIB graph: {len(unknown)} unknown "
                            f"{unknown[:5]}, {len(absent)} missing {absent[:5]}")
    scores = {m.module_name: torch.zeros(m.mask_shape(None)) for m in pm.graph.dest_modules}
    flags = {k: torch.zeros_like(v, dtype=torch.bool) for k, v in scores.items()}
    for name, info in d["edges"].items():
        e = cells[name][0]
        if not isinstance(info, dict) or "in_graph" not in info:
            raise MibGraphError(f"{path}: edge {name!r} needs a dict with 'in_graph' (and 'score'), got {info!r}")
        # MIB's binary-circuit files may leave scores out: the flag is then the score
        scores[e.dest.module_name][e.patch_idx] = float(info.get("score", float(bool(info["in_graph"]))))
        flags[e.dest.module_name][e.patch_idx] = bool(info["in_graph"])
    return scores, flags


def _load_pt(pm, d, path):
    missing = [k for k in _PT_KEYS if k not in d]
    if missing:
        raise MibGraphError(f"{path}: an EAP-IG/MIB .pt circuit needs keys {list(_PT_KEYS)}; missing {missing}")
    cfg = _check_cfg(pm, d["cfg"], path)
    _refuse_finer(path, [k for k in ("nodes_scores", "neurons_in_graph", "neurons_scores") if d.get(k) is not None])
    srcs, dsts = _node_lists(cfg)
    if list(d["src_nodes"]) != srcs or list(d["dst_nodes"]) != dsts:
        raise MibGraphError(f"{path}: its src_nodes/dst_nodes are not EAP-IG's order for this model "
                            f"({len(srcs)} sources, {len(dsts)} destinations)")
    s, f = d["edges_scores"], d["edges_in_graph"]
    if tuple(s.shape) != (len(srcs), len(dsts)) or tuple(f.shape) != tuple(s.shape):
        raise MibGraphError(f"{path}: edges_scores {tuple(s.shape)} and edges_in_graph {tuple(f.shape)} must both "
                            f"be [{len(srcs)}, {len(dsts)}]")
    scores = {m.module_name: torch.zeros(m.mask_shape(None), dtype=s.dtype) for m in pm.graph.dest_modules}
    flags = {k: torch.zeros_like(v, dtype=torch.bool) for k, v in scores.items()}
    for e, _, r, c in _edge_cells(pm, cfg):
        scores[e.dest.module_name][e.patch_idx] = s[r, c]
        flags[e.dest.module_name][e.patch_idx] = bool(f[r, c])
    return scores, flags


def load(pm, path) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, torch.Tensor]]]:
    """Read a circuit file written by :func:`save`, by EAP-IG (``Graph.to_json`` / ``to_pt``)
    or by auto-circuit (``torch.save`` of its PruneScores).

    The kind is told by content: JSON text; a ``.pt`` dict with EAP-IG's keys; or one keyed
    by ``pm``'s destination modules (auto-circuit).

    Returns:
        ``(scores, in_graph)``: PruneScores (dest module -> ``[heads?, n_in_srcs]``) and the
        edges' in-graph flags as bool tensors of the same shapes (None for auto-circuit's
        files, which hold none). EAP-IG's node flags are not returned: its evaluation
        prunes any edge left without a connected node itself.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no circuit file at {str(path)!r}")
    with open(path, "rb") as fh:
        head = fh.read(64).lstrip()
    if path.suffix == ".json" or head.startswith(b"{"):
        return _load_json(pm, path)
    d = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(d, dict):
        raise MibGraphError(f"{path}: expected a dict (EAP-IG's .pt or auto-circuit's PruneScores), got "
                            f"{type(d).__name__}")
    if "edges_scores" in d:
        return _load_pt(pm, d, path)
    expected = {m.module_name for m in pm.graph.dest_modules}
    if set(d) & expected:  # auto-circuit: dest module -> scores
        check_prune_scores(pm, d)
        return {k: d[k] for k in expected}, None
    raise MibGraphError(f"{path}: neither EAP-IG's .pt circuit (keys {list(_PT_KEYS)}) nor auto-circuit's "
                        f"PruneScores for this model (keys = its destination modules); found keys {sorted(d)[:8]}")
