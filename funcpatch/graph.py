"""The computation graph used for patching: source nodes, destination nodes, edges.

Nodes are named and numbered exactly as in the auto-circuit library so that circuits
written for it keep working. A *source* writes to the residual stream (the embedding,
an attention head, an MLP); a *destination* reads from it (a head's Q/K/V input, an
MLP's input, the final residual). Several nodes may live on one module (one per head);
the module's name keys its mask in :class:`funcpatch.PatchState`.

Factorized graph: every source feeds every destination in a later layer.
Residual graph: sources feed only the next residual checkpoint.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from itertools import count
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch


@dataclass(frozen=True)
class SrcNode:
    """A node whose output is recorded. ``src_idx`` orders all sources of a graph."""

    name: str
    module_name: str
    layer: int
    src_idx: int
    head_idx: Optional[int] = None
    head_dim: Optional[int] = None
    weight: Optional[str] = None
    weight_head_dim: Optional[int] = None

    def __repr__(self) -> str:
        return self.name


@dataclass(frozen=True)
class DestNode:
    """A node whose input is patched. Its incoming sources start at ``min_src_idx``."""

    name: str
    module_name: str
    layer: int
    min_src_idx: int = 0
    head_idx: Optional[int] = None
    head_dim: Optional[int] = None
    weight: Optional[str] = None
    weight_head_dim: Optional[int] = None

    def __repr__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Edge:
    """An edge ``src -> dest``, optionally at one token position ``seq_idx``."""

    src: SrcNode
    dest: DestNode
    seq_idx: Optional[int] = None

    @property
    def name(self) -> str:
        return f"{self.src.name}->{self.dest.name}"

    @property
    def patch_idx(self) -> Tuple[int, ...]:
        """Index of this edge in its destination module's mask ``[seq?, head?, src]``."""
        seq = () if self.seq_idx is None else (self.seq_idx,)
        head = () if self.dest.head_idx is None else (self.dest.head_idx,)
        return seq + head + (self.src.src_idx - self.dest.min_src_idx,)

    def prune_score(self, prune_scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """This edge's entry in a PruneScores dict (or any mask-shaped dict)."""
        return prune_scores[self.dest.module_name][self.patch_idx]

    def __repr__(self) -> str:
        return self.name if self.seq_idx is None else f"{self.name}@{self.seq_idx}"


@dataclass(frozen=True)
class DestModule:
    """All destinations on one module: they share one mask ``[seq?, heads?, n_in_srcs]``."""

    module_name: str
    layer: int
    head_dim: Optional[int]
    n_heads: Optional[int]
    in_srcs: Tuple[int, int]  # [start, stop) of the incoming sources' src_idx

    def mask_shape(self, seq_len: Optional[int]) -> Tuple[int, ...]:
        seq = () if seq_len is None else (seq_len,)
        heads = () if self.n_heads is None else (self.n_heads,)
        return seq + heads + (self.in_srcs[1] - self.in_srcs[0],)


@dataclass(frozen=True)
class SrcModule:
    """All sources on one module: their outputs fill ``src_idx`` in [start, stop)."""

    module_name: str
    head_dim: Optional[int]
    srcs: Tuple[int, int]


@dataclass(frozen=True)
class Graph:
    """Immutable graph. ``edges`` are ordered by (seq_idx, dest module, head, src_idx)."""

    srcs: Tuple[SrcNode, ...]
    dests: Tuple[DestNode, ...]
    edges: Tuple[Edge, ...]
    seq_len: Optional[int]
    factorized: bool
    dest_modules: Tuple[DestModule, ...]
    src_modules: Tuple[SrcModule, ...]
    _by_name: Dict[Tuple[str, Optional[int]], Edge] = field(repr=False, compare=False, default=None)

    @property
    def n_edges(self) -> int:
        return len(self.edges)

    @property
    def nodes(self) -> Tuple:
        return self.srcs + self.dests

    @property
    def edge_dict(self) -> Dict[Optional[int], List[Edge]]:
        """Edges by token position (key None when the graph is not token-specific)."""
        out: Dict[Optional[int], List[Edge]] = {}
        for e in self.edges:
            out.setdefault(e.seq_idx, []).append(e)
        return out

    def edge(self, name: str, seq_idx: Optional[int] = None) -> Edge:
        """The edge called ``name`` (``"A0.1->MLP 2"``), at ``seq_idx`` in token graphs."""
        key = (name, seq_idx)
        if key in self._by_name:
            return self._by_name[key]
        if self.seq_len is None and seq_idx is not None:
            raise KeyError(f"this graph is not token-specific (seq_len=None): pass seq_idx=None, not {seq_idx}")
        if self.seq_len is not None and (seq_idx is None or not 0 <= seq_idx < self.seq_len):
            raise KeyError(f"this graph has seq_len={self.seq_len}: pass seq_idx in [0, {self.seq_len}), got {seq_idx}")
        names = sorted({e.name for e in self.edges})
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"; close matches: {close}" if close else ""
        raise KeyError(f"no edge named {name!r} in this graph ({len(names)} edge names){hint}")

    def edges_named(self, names: Iterable) -> List[Edge]:
        """Resolve a collection of Edge objects and/or names (all positions for names)."""
        out = []
        for n in names:
            if isinstance(n, Edge):
                if self._by_name.get((n.name, n.seq_idx)) != n:
                    raise KeyError(f"edge {n!r} is not in this graph")
                out.append(n)
            elif self.seq_len is None:
                out.append(self.edge(n))
            else:
                self.edge(n, 0)  # raises a clear error for unknown names
                out.extend(self.edge(n, i) for i in range(self.seq_len))
        return out


def build_graph(srcs: Sequence[SrcNode], dests: Sequence[DestNode], factorized: bool,
                seq_len: Optional[int]) -> Graph:
    """Connect sources to destinations: factorized = any later layer, else the next layer."""
    srcs = tuple(sorted(srcs, key=lambda s: s.src_idx))
    assert [s.src_idx for s in srcs] == list(range(len(srcs))), "src_idx must be 0..n-1"
    assert all(a.layer <= b.layer for a, b in zip(srcs, srcs[1:])), "src_idx must follow layer order"

    def feeds(s: SrcNode, d: DestNode) -> bool:
        return s.layer < d.layer if factorized else s.layer + 1 == d.layer

    dest_modules: Dict[str, DestModule] = {}
    for d in dests:
        ins = [s.src_idx for s in srcs if feeds(s, d)]
        in_srcs = (ins[0], ins[-1] + 1) if ins else (0, 0)
        assert ins == list(range(*in_srcs)), f"incoming sources of {d.name} are not contiguous"
        assert d.min_src_idx == in_srcs[0] or not ins, f"{d.name}: min_src_idx mismatch"
        heads = [x for x in dests if x.module_name == d.module_name]
        dm = DestModule(d.module_name, d.layer, d.head_dim,
                        None if d.head_dim is None else len(heads), in_srcs)
        prev = dest_modules.setdefault(d.module_name, dm)
        assert prev == dm, f"destinations on {d.module_name} disagree"
    dest_order = {m: i for i, m in enumerate(dest_modules)}
    dests = tuple(sorted(dests, key=lambda d: (dest_order[d.module_name], d.head_idx or 0)))

    src_modules: Dict[str, List[int]] = {}
    for s in srcs:
        src_modules.setdefault(s.module_name, []).append(s.src_idx)
    src_mods = tuple(
        SrcModule(m, next(s.head_dim for s in srcs if s.module_name == m), (idx[0], idx[-1] + 1))
        for m, idx in src_modules.items()
    )

    positions = [None] if seq_len is None else list(range(seq_len))
    edges = tuple(Edge(s, d, i) for i in positions for d in dests for s in srcs if feeds(s, d))
    by_name = {(e.name, e.seq_idx): e for e in edges}
    return Graph(srcs, dests, edges, seq_len, factorized, tuple(dest_modules.values()), src_mods, by_name)


# ---------------------------------------------------------------------------------------
# Node sets. Names, layers and indices follow the auto-circuit library.


def transformer_nodes(n_layers: int, n_heads: int, *, factorized: bool, separate_qkv: bool = True,
                      attn_only: bool = False, parallel_attn_mlp: bool = False, n_kv_heads: Optional[int] = None,
                      grouped_kv: bool = False):
    """Sources and destinations of a transformer, named with TransformerLens hook names.

    Returns ``(srcs, dests)``. Module names are HookedTransformer hook points
    (``blocks.{i}.attn.hook_result`` ``[batch, pos, head, d_model]``, ...).

    Grouped-query attention (``n_kv_heads < n_heads``): by default every query head has
    its own K and V destinations ``A{l}.{h}.K/V`` (each reads its own copy of its group's
    input: the graph of MIB, EAP-IG and auto-circuit on ungrouped models); with
    ``grouped_kv`` there is one K and one V destination per key/value head,
    ``A{l}.kv{g}.K/V``.
    """
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv_heads} key/value heads evenly")
    if n_kv_heads != n_heads and not (factorized and separate_qkv):
        raise ValueError(f"grouped-query attention ({n_heads} query heads, {n_kv_heads} key/value heads) needs "
                         "factorized=True and separate_qkv=True: a head's single input would feed a key/value "
                         "head that other query heads share")
    if factorized:
        return _factorized_transformer(n_layers, n_heads, separate_qkv, attn_only, parallel_attn_mlp,
                                       n_kv_heads if grouped_kv else None)
    if parallel_attn_mlp:
        raise ValueError("the residual (factorized=False) graph needs sequential attention and MLP; "
                         "this model has parallel attention/MLP blocks: use factorized=True")
    return _residual_transformer(n_layers, n_heads, attn_only)


def _head_src(block: int, head: int, layer: int, idx: int) -> SrcNode:
    return SrcNode(f"A{block}.{head}", f"blocks.{block}.attn.hook_result", layer, idx,
                   head_idx=head, head_dim=2, weight=f"blocks.{block}.attn.W_O", weight_head_dim=0)


def _factorized_transformer(n_layers, n_heads, separate_qkv, attn_only, parallel, kv_groups=None):
    layers, idxs = count(), count()
    srcs = [SrcNode("Resid Start", "blocks.0.hook_resid_pre", next(layers), next(idxs), weight="embed.W_E")]
    for b in range(n_layers):
        layer = next(layers)
        srcs += [_head_src(b, h, layer, next(idxs)) for h in range(n_heads)]
        if not attn_only:
            srcs.append(SrcNode(f"MLP {b}", f"blocks.{b}.hook_mlp_out", layer if parallel else next(layers),
                                next(idxs), weight=f"blocks.{b}.mlp.W_out"))
    layers = count(1)
    dests = []
    for b in range(n_layers):
        layer = next(layers)
        if kv_groups is not None:  # one K and one V per key/value head
            for x in "QKV":
                heads = [(h, f"A{b}.{h}.{x}") for h in range(n_heads)] if x == "Q" else \
                    [(g, f"A{b}.kv{g}.{x}") for g in range(kv_groups)]
                dests += [DestNode(name, f"blocks.{b}.hook_{x.lower()}_input", layer, head_idx=h, head_dim=2,
                                   weight=f"blocks.{b}.attn.W_{x}", weight_head_dim=0) for h, name in heads]
        for h in range(n_heads if kv_groups is None else 0):
            if separate_qkv:
                dests += [DestNode(f"A{b}.{h}.{x}", f"blocks.{b}.hook_{x.lower()}_input", layer, head_idx=h,
                                   head_dim=2, weight=f"blocks.{b}.attn.W_{x}", weight_head_dim=0)
                          for x in "QKV"]
            else:
                dests.append(DestNode(f"A{b}.{h}", f"blocks.{b}.hook_attn_in", layer, head_idx=h, head_dim=2,
                                      weight=f"blocks.{b}.attn.W_QKV", weight_head_dim=0))
        if not attn_only:
            dests.append(DestNode(f"MLP {b}", f"blocks.{b}.hook_mlp_in", layer if parallel else next(layers),
                                  weight=f"blocks.{b}.mlp.W_in"))
    dests.append(DestNode("Resid End", f"blocks.{n_layers - 1}.hook_resid_post", next(layers), weight="unembed.W_U"))
    return srcs, dests


def _residual_transformer(n_layers, n_heads, attn_only):
    layers, idxs = count(), count()
    srcs, dests = [], []
    layer, first = next(layers), next(idxs)
    for b in range(n_layers):
        srcs.append(SrcNode("Resid Start" if b == 0 else f"Resid Post {b - 1}",
                            "blocks.0.hook_resid_pre" if b == 0 else f"blocks.{b - 1}.hook_resid_post",
                            layer, first))
        srcs += [_head_src(b, h, layer, next(idxs)) for h in range(n_heads)]
        if not attn_only:
            layer = next(layers)
            dests.append(DestNode(f"Resid Mid {b}", f"blocks.{b}.hook_resid_mid", layer, min_src_idx=first))
            first = next(idxs)
            srcs.append(SrcNode(f"Resid Mid {b}", f"blocks.{b}.hook_resid_mid", layer, first))
            srcs.append(SrcNode(f"MLP {b}", f"blocks.{b}.hook_mlp_out", layer, next(idxs),
                                weight=f"blocks.{b}.mlp.W_out"))
        layer = next(layers)
        dests.append(DestNode("Resid End" if b == n_layers - 1 else f"Resid Post {b}",
                              f"blocks.{b}.hook_resid_post", layer, min_src_idx=first))
        first = next(idxs)
    return srcs, dests


def micro_nodes(n_layers: int, *, factorized: bool):
    """Sources and destinations of :class:`funcpatch.MicroModel` (module paths as names)."""
    srcs, dests = [], []
    if factorized:
        layers, idxs = count(), count()
        srcs.append(SrcNode("Resid Start", "input", next(layers), next(idxs)))
        for b in range(n_layers):
            layer = next(layers)
            srcs += [SrcNode(f"B{b}.{e}", f"blocks.{b}.head_outputs", layer, next(idxs), head_idx=e, head_dim=2,
                             weight="weights", weight_head_dim=0) for e in (0, 1)]
        layers = count(1)
        for b in range(n_layers):
            layer = next(layers)
            dests += [DestNode(f"B{b}.{e}", f"blocks.{b}.head_inputs", layer, head_idx=e, head_dim=2)
                      for e in (0, 1)]
        dests.append(DestNode("Resid End", "output", next(layers)))
        return srcs, dests
    layers, idxs = count(), count()
    layer = next(layers)
    for b in range(n_layers):
        first = next(idxs)
        srcs.append(SrcNode("Resid Start" if b == 0 else f"Resid Post {b - 1}",
                            "input" if b == 0 else f"resids.{b - 1}", layer, first))
        srcs += [SrcNode(f"B{b}.{e}", f"blocks.{b}.head_outputs", layer, next(idxs), head_idx=e, head_dim=2,
                         weight="weights", weight_head_dim=0) for e in (0, 1)]
        last = b == n_layers - 1
        layer = next(layers)
        dests.append(DestNode("Resid End" if last else f"Resid Post {b}", "output" if last else f"resids.{b}",
                              layer, min_src_idx=first))
    return srcs, dests
