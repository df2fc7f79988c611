"""Plots of circuits and of their evaluation: pure functions that return figures.

- :func:`draw_circuit`: a static diagram of a circuit (matplotlib): nodes in columns by
  layer, the circuit's edges as arrows whose width follows ``|score|`` and whose colour
  gives the sign (:data:`POS_COLOR` for a positive score, :data:`NEG_COLOR` for a
  negative one, the convention of auto-circuit's diagrams).
- :func:`draw_seq_graph`: an interactive Sankey diagram per token position (plotly, an
  optional extra: ``pip install plotly``), like auto-circuit's ``draw_seq_graph``.
- :func:`plot_faithfulness`: faithfulness against circuit size (the MIB curve).
- :func:`plot_roc`: ROC curves of prune scores against a known circuit.

The matplotlib functions build a :class:`matplotlib.figure.Figure` on an Agg canvas
directly: they never import ``pyplot``, switch the global backend or keep figures
alive in pyplot's registry, so they work headless and in threads. ``path`` saves the
figure too; the format follows the extension (``.png``, ``.svg``, ``.pdf``).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from matplotlib.figure import Figure

from funcpatch.circuits import check_prune_scores

__all__ = [
    "POS_COLOR", "NEG_COLOR", "NODE_COLOR", "IDLE_NODE_COLOR", "MIN_EDGE_WIDTH", "MAX_EDGE_WIDTH",
    "CircuitEdge", "PlotFigure", "circuit_edges", "node_key", "edge_width", "edge_route",
    "draw_circuit", "draw_seq_graph", "plot_faithfulness", "plot_roc",
]

#: colour of an edge with a positive score (as in auto-circuit's diagrams: blue)
POS_COLOR = "#1f5fbf"
#: colour of an edge with a negative score (red)
NEG_COLOR = "#d62728"
#: fill of a node that the drawn circuit touches
NODE_COLOR = "#fde9b8"
#: fill of a node outside the drawn circuit
IDLE_NODE_COLOR = "#f2f2f2"
#: line widths (points) of the weakest and the strongest drawn edge
MIN_EDGE_WIDTH = 0.6
MAX_EDGE_WIDTH = 7.0

_FIG_FORMATS = ("png", "svg", "pdf")
PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------
# Selecting the edges to draw


@dataclass(frozen=True)
class CircuitEdge:
    """One drawn edge: its name, end nodes, position (None: all positions) and score."""

    name: str
    src: object  # SrcNode
    dest: object  # DestNode
    seq_idx: Optional[int]
    score: float


def _check_n_edges(n_edges, available: int) -> int:
    if n_edges is None:
        return available
    if isinstance(n_edges, bool) or not isinstance(n_edges, int) or n_edges < 0:
        raise ValueError(f"n_edges must be a non-negative int or None, got {n_edges!r}")
    return min(n_edges, available)


def circuit_edges(pm, prune_scores: Mapping[str, torch.Tensor], n_edges: Optional[int] = None, *,
                  merge_positions: bool = True) -> List[CircuitEdge]:
    """The ``n_edges`` edges with the highest ``|score|``, highest first.

    Exactly ``n_edges`` edges (ties are broken by graph order, unlike
    :func:`funcpatch.run_circuits`, which takes every tied edge); edges scored exactly 0
    are left out. ``None``: every edge with a non-zero score.

    Args:
        pm: the patchable model.
        prune_scores: PruneScores (dest module -> ``[seq?, heads?, n_in_srcs]``).
        n_edges: how many edges.
        merge_positions: in a token-specific graph (``seq_len``), sum each edge's scores
            over positions first (``seq_idx`` of the result is None); False keeps one
            edge per position.

    Raises:
        ValueError: keys/shapes that do not match ``pm``'s masks, NaN scores.
    """
    check_prune_scores(pm, prune_scores)
    flat: Dict[Tuple[str, Optional[int]], List] = {}
    merge = merge_positions and pm.graph.seq_len is not None
    cache = {k: v.detach().to(torch.float64).cpu() for k, v in prune_scores.items()}
    for e in pm.graph.edges:
        s = float(e.prune_score(cache))
        if math.isnan(s):
            raise ValueError(f"prune score of edge {e!r} is NaN; edges cannot be ranked by NaN scores")
        key = (e.name, None if merge else e.seq_idx)
        if key in flat:
            flat[key][3] += s
        else:
            flat[key] = [e.src, e.dest, key[1], s]
    items = [CircuitEdge(name, src, dest, seq, s) for (name, _), (src, dest, seq, s) in flat.items() if s != 0]
    n = _check_n_edges(n_edges, len(items))
    order = sorted(range(len(items)), key=lambda i: -abs(items[i].score))  # stable: graph order for ties
    return [items[i] for i in order[:n]]


def node_key(node) -> str:
    """The drawn node of a graph node: a head's Q/K/V inputs are drawn on the head itself."""
    name = node.name
    if name.startswith("A") and name[-2:] in (".Q", ".K", ".V"):
        return name[:-2]
    return name


def _port(node) -> Optional[str]:
    name = node.name
    if name.startswith("A") and name[-2:] in (".Q", ".K", ".V"):
        return name[-1]
    return None


def edge_width(score: float, max_abs: float) -> float:
    """Line width of an edge: linear in ``|score|`` from :data:`MIN_EDGE_WIDTH` (0) to
    :data:`MAX_EDGE_WIDTH` (``max_abs``); infinite scores get the maximum width."""
    a = abs(score)
    if math.isinf(a):
        return MAX_EDGE_WIDTH
    if not (max_abs > 0 and math.isfinite(max_abs)):
        return MIN_EDGE_WIDTH
    return MIN_EDGE_WIDTH + (MAX_EDGE_WIDTH - MIN_EDGE_WIDTH) * min(a / max_abs, 1.0)


def _max_finite(edges: Sequence[CircuitEdge]) -> float:
    finite = [abs(e.score) for e in edges if math.isfinite(e.score)]
    return max(finite) if finite else 0.0


def _layout(pm) -> Tuple[Dict[str, Tuple[int, int]], Dict[str, object], int]:
    """Node key -> (column, row); node key -> a representative node; rows of the tallest column."""
    layer_of: Dict[str, int] = {}
    rep: Dict[str, object] = {}
    for n in list(pm.graph.srcs) + list(pm.graph.dests):
        k = node_key(n)
        layer_of.setdefault(k, n.layer)  # sources first: a node's layer is where it writes
        rep.setdefault(k, n)
    layers = sorted(set(layer_of.values()))
    col = {layer: i for i, layer in enumerate(layers)}
    by_col: Dict[int, List[str]] = {}
    for k in layer_of:  # graph order: heads in index order
        by_col.setdefault(col[layer_of[k]], []).append(k)
    pos = {}
    tallest = max(len(v) for v in by_col.values())
    for c, keys in by_col.items():
        for r, k in enumerate(keys):
            pos[k] = (c, r - (len(keys) - 1) / 2.0)  # centred column
    return pos, rep, tallest


# --------------------------------------------------------------------------------------
# Matplotlib helpers


class PlotFigure(Figure):
    """A matplotlib Figure that shows itself as a PNG in notebooks (``_repr_png_``),
    without pyplot or ``%matplotlib inline``. Every plot of this module returns one."""

    def _repr_png_(self):
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=100)
        return buf.getvalue()


def _new_figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = PlotFigure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Optional[PathLike]) -> None:
    if path is None:
        return
    ext = os.path.splitext(os.fspath(path))[1].lower().lstrip(".")
    if ext not in _FIG_FORMATS:
        raise ValueError(f"cannot save a figure as {os.fspath(path)!r}: use a .png, .svg or .pdf file name")
    folder = os.path.dirname(os.fspath(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path, format=ext, dpi=150)


def _fmt_score(s: float) -> str:
    return "inf" if math.isinf(s) else f"{s:.3g}"


# --------------------------------------------------------------------------------------
# Circuit diagram


#: drawing units: column spacing, node box width and height (rows are 1 apart)
_DX, _BOX_W, _BOX_H = 3.0, 1.5, 0.62
#: the clearance a routed edge keeps from node boxes it passes (drawing units; a row is 1):
#: about half the widest line, so that a thick edge does not touch the box either
_CLEARANCE = 0.12
_PORT_OFF = {"Q": 0.2, "K": 0.0, "V": -0.2, None: 0.0}


def _free_y(want: float, boxes_y: Sequence[float]) -> float:
    """The height closest to ``want`` at which a horizontal line through a column misses
    every box of that column (box centres ``boxes_y``, height :data:`_BOX_H`)."""
    half = _BOX_H / 2 + _CLEARANCE
    blocked = sorted((y - half, y + half) for y in boxes_y)
    for lo, hi in blocked:
        if lo < want < hi:
            below, above = lo, hi
            # a neighbouring box may close the gap on either side: step over it
            while any(l2 < below < h2 for l2, h2 in blocked):
                below = min(l2 for l2, h2 in blocked if l2 < below < h2)
            while any(l2 < above < h2 for l2, h2 in blocked):
                above = max(h2 for l2, h2 in blocked if l2 < above < h2)
            return below if want - below <= above - want else above
    return want


def edge_route(start: Tuple[float, float], end: Tuple[float, float], columns: Sequence[Tuple[float, Sequence[float]]],
               lane: float = 0.0):
    """The drawn path of an edge from ``start`` (its source box's right side) to ``end``
    (a port on its destination box's left side), passing every column in between.

    ``columns``: ``(x centre, [box centre y, ...])`` of each column strictly between the
    two. The path crosses a column horizontally, at the height nearest the straight line
    (shifted by ``lane``) where it misses the column's boxes; between columns it is a
    cubic Bézier curve, which stays inside the box-free gap between the columns (a Bézier
    curve lies in the convex hull of its control points). So no edge passes behind a
    node box other than its own two.

    Returns:
        ``(vertices [(x, y), ...], codes)`` for a :class:`matplotlib.path.Path`.
    """
    from matplotlib.path import Path

    (x1, y1), (x2, y2) = start, end
    points = [(x1, y1)]
    for cx, ys in columns:
        t = (cx - x1) / (x2 - x1) if x2 != x1 else 0.5
        y = _free_y(y1 + t * (y2 - y1) + lane, ys)
        points += [(cx - _BOX_W / 2, y), (cx + _BOX_W / 2, y)]
    points.append((x2, y2))
    verts, codes = [points[0]], [Path.MOVETO]
    for i in range(0, len(points) - 1, 2):  # (a, b): a curve across a gap; then a line across a column
        (xa, ya), (xb, yb) = points[i], points[i + 1]
        d = (xb - xa) / 2
        verts += [(xa + d, ya), (xb - d, yb), (xb, yb)]
        codes += [Path.CURVE4] * 3
        if i + 2 < len(points):
            verts.append(points[i + 2])
            codes.append(Path.LINETO)
    return verts, codes


def _samples(verts, codes, per_piece: int = 24) -> List[Tuple[float, float]]:
    """Points along a routed path (:func:`edge_route`), on its curves and lines."""
    from matplotlib.path import Path

    out = [verts[0]]
    i = 1
    while i < len(verts):
        if codes[i] == Path.CURVE4:
            (xa, ya), (c1x, c1y), (c2x, c2y), (xb, yb) = verts[i - 1:i + 3]
            for j in range(1, per_piece + 1):
                t = j / per_piece
                u = 1 - t
                out.append((u ** 3 * xa + 3 * u * u * t * c1x + 3 * u * t * t * c2x + t ** 3 * xb,
                            u ** 3 * ya + 3 * u * u * t * c1y + 3 * u * t * t * c2y + t ** 3 * yb))
            i += 3
        else:
            (xa, ya), (xb, yb) = verts[i - 1], verts[i]
            out += [(xa + (xb - xa) * j / per_piece, ya + (yb - ya) * j / per_piece) for j in range(1, per_piece + 1)]
            i += 1
    return out


def _label_spots(routes: Sequence[List[Tuple[float, float]]], scale: Tuple[float, float]) -> List[Tuple[float, float]]:
    """A point on each route (sampled paths) for its label: greedily, the point of the
    route's middle part that is farthest from every other route (up to 0.25 inch) and
    from the labels placed so far (up to 0.4 inch; distances with x and y scaled by
    ``scale``, i.e. in inches as drawn), so that a label reads as its own edge's."""
    import numpy as np

    pts = [np.asarray(r, dtype=float) * scale for r in routes]  # inches
    spots: List[Tuple[float, float]] = []
    for i, route in enumerate(pts):
        n = len(route)
        cand = route[n // 5: n - n // 5]
        score = np.zeros(len(cand))
        others = [p for j, p in enumerate(pts) if j != i]
        for cap, targets in ((0.25, others), (0.4, [np.asarray(spots, dtype=float).reshape(-1, 2) * scale])):
            near = np.full(len(cand), cap)
            for t in targets:
                if len(t):
                    near = np.minimum(near, np.sqrt(((cand[:, None, :] - t[None, :, :]) ** 2).sum(-1)).min(1))
            score += near
        best = cand[int(np.argmax(score))] / scale
        spots.append((float(best[0]), float(best[1])))
    return spots


def _size_title(n_drawn: int, n_requested: Optional[int], n_total: int, faithfulness: Optional[float],
                seq: bool) -> str:
    size = f"{n_drawn} of {n_total} edges"
    if n_requested is not None and n_drawn < n_requested:
        size += f" ({n_requested - n_drawn} of the top {n_requested} score 0: not drawn)"
    if seq:
        size += ", summed over positions"
    faith = "faithfulness not given" if faithfulness is None else f"faithfulness {faithfulness:.2f}"
    return f"Circuit: top {size} by |score|; {faith}"


def draw_circuit(pm, prune_scores: Mapping[str, torch.Tensor], n_edges: Optional[int] = 20,
                 path: Optional[PathLike] = None, *, title: Optional[str] = None, show_all_nodes: bool = True,
                 label_edges: Optional[bool] = None, faithfulness: Optional[float] = None,
                 note: Optional[str] = None):
    """Draw the circuit of the ``n_edges`` highest-``|score|`` edges (static, matplotlib).

    Nodes stand in columns by layer (the embedding left, the output right); a head's
    Q, K and V inputs enter its box at three ports marked ``q``/``k``/``v`` on its left
    side. Each drawn edge is an arrow of width linear in ``|score|`` (see
    :func:`edge_width`) coloured :data:`POS_COLOR` (score > 0) or :data:`NEG_COLOR`
    (score < 0). An edge that spans several columns is routed around the boxes in
    between (:func:`edge_route`), never behind them. Edges of a token-specific graph are
    summed over positions (use :func:`draw_seq_graph` for the per-position view).

    Every arrow is a ``FancyArrowPatch`` whose ``gid`` is ``"edge:<name>"`` (also the
    element id in an SVG), node boxes have gid ``"node:<name>"`` and score labels
    ``"label:<name>"``; a label sits on its own edge, where the other edges are farthest.

    Args:
        pm: the patchable model.
        prune_scores: PruneScores.
        n_edges: circuit size (exactly that many edges; see :func:`circuit_edges`);
            None: every edge with a non-zero score.
        path: also save the figure there (``.png``, ``.svg`` or ``.pdf``).
        title: a first title line (e.g. the model and the method); the line below always
            states the circuit's size and ``faithfulness``.
        show_all_nodes: draw the graph's other nodes too, greyed out.
        label_edges: write each score on its arrow (default: when at most 12 edges).
        faithfulness: the circuit's faithfulness, for the title (None: "not given").
        note: a last title line (e.g. why this circuit was chosen).

    Returns:
        The :class:`matplotlib.figure.Figure`.
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch
    from matplotlib.path import Path

    edges = circuit_edges(pm, prune_scores, n_edges)
    pos, rep, tallest = _layout(pm)
    used = {node_key(e.src) for e in edges} | {node_key(e.dest) for e in edges}
    shown = [k for k in pos if show_all_nodes or k in used]
    n_cols = 1 + max(pos[k][0] for k in pos)
    fig = _new_figure((max(5.0, 1.2 + 1.55 * n_cols), max(3.0, 1.9 + 0.62 * tallest)))
    ax = fig.add_subplot()
    ax.set_axis_off()

    def xy(k):
        c, r = pos[k]
        return c * _DX, -r  # first head on top

    boxes_in_col: Dict[int, List[float]] = {}
    for k in shown:
        boxes_in_col.setdefault(pos[k][0], []).append(xy(k)[1])

    # nodes
    for k in shown:
        x, y = xy(k)
        on = k in used
        box = FancyBboxPatch((x - _BOX_W / 2, y - _BOX_H / 2), _BOX_W, _BOX_H,
                             boxstyle="round,pad=0.02,rounding_size=0.12",
                             facecolor=NODE_COLOR if on else IDLE_NODE_COLOR, edgecolor="#555555" if on else "#bbbbbb",
                             linewidth=1.0, zorder=3, gid=f"node:{k}")
        ax.add_patch(box)
        ax.text(x, y, k, ha="center", va="center", fontsize=8, color="black" if on else "#999999", zorder=4)
        if on and getattr(rep[k], "head_idx", None) is not None and any(_port(e.dest) for e in edges
                                                                         if node_key(e.dest) == k):
            for letter, off in (("q", 0.2), ("k", 0.0), ("v", -0.2)):
                ax.text(x - _BOX_W / 2 + 0.08, y + off, letter, ha="left", va="center", fontsize=5.5,
                        color="#666666", zorder=4)

    # edges, weakest first so that the strong ones lie on top
    max_abs = _max_finite(edges)
    show_labels = (len(edges) <= 12) if label_edges is None else bool(label_edges)
    routes = {}
    for rank, e in reversed(list(enumerate(edges))):
        (x1, y1), (x2, y2) = xy(node_key(e.src)), xy(node_key(e.dest))
        c1, c2 = pos[node_key(e.src)][0], pos[node_key(e.dest)][0]
        lane = 0.08 * ((rank % 3) - 1)  # parallel edges through one gap side by side
        verts, codes = edge_route((x1 + _BOX_W / 2, y1), (x2 - _BOX_W / 2, y2 + _PORT_OFF[_port(e.dest)]),
                                  [(c * _DX, boxes_in_col.get(c, [])) for c in range(c1 + 1, c2)], lane)
        colour = POS_COLOR if e.score > 0 else NEG_COLOR
        arrow = FancyArrowPatch(path=Path(verts, codes), arrowstyle="-|>",
                                mutation_scale=6 + edge_width(e.score, max_abs), linewidth=edge_width(e.score, max_abs),
                                color=colour, alpha=0.75, zorder=2 + (len(edges) - rank) / (len(edges) + 1),
                                gid=f"edge:{e.name}")
        ax.add_patch(arrow)
        routes[rank] = _samples(verts, codes)

    xs = [xy(k)[0] for k in pos]
    ys = [xy(k)[1] for k in pos]
    ax.set_xlim(min(xs) - _BOX_W, max(xs) + _BOX_W)
    ax.set_ylim(min(ys) - 1.0, max(ys) + 0.8)
    if show_labels and edges:
        w, h = fig.get_size_inches()
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        spots = _label_spots([routes[r] for r in range(len(edges))], (w / (x1 - x0), h / (y1 - y0)))
        for e, (lx, ly) in zip(edges, spots):
            colour = POS_COLOR if e.score > 0 else NEG_COLOR
            ax.text(lx, ly, _fmt_score(e.score), fontsize=6, color=colour, ha="center", va="center", zorder=5,
                    gid=f"label:{e.name}", bbox=dict(boxstyle="round,pad=0.1", fc="white", ec=colour, lw=0.4,
                                                     alpha=0.9))
    ax.set_aspect("auto")
    handles = [Line2D([], [], color=POS_COLOR, lw=3, label="score > 0"),
               Line2D([], [], color=NEG_COLOR, lw=3, label="score < 0")]
    ax.legend(handles=handles, loc="lower right", fontsize=7, frameon=False, ncols=2)
    lines = ([title] if title else []) + [_size_title(len(edges), n_edges, pm.graph.n_edges, faithfulness,
                                                      pm.graph.seq_len is not None)] + ([note] if note else [])
    ax.set_title("\n".join(lines), fontsize=10)
    _save(fig, path)
    return fig


# --------------------------------------------------------------------------------------
# Sankey per token position (plotly)


def _plotly():
    try:
        import plotly.graph_objects as go
    except ImportError as e:
        raise ImportError("draw_seq_graph needs plotly, an optional extra: pip install plotly "
                          "(or pip install 'funcpatch[plotly]')") from e
    return go


def _rgba(score: float, alpha: float = 0.45) -> str:
    return f"rgba({'31,95,191' if score > 0 else '214,39,40'},{alpha})"


def draw_seq_graph(pm, prune_scores: Mapping[str, torch.Tensor], n_edges: Optional[int] = None, *,
                   seq_labels: Optional[Sequence[str]] = None, show_all_seq_pos: bool = False,
                   path: Optional[PathLike] = None, width: Optional[int] = None, height: Optional[int] = None):
    """An interactive Sankey diagram of the circuit, one per token position (plotly).

    Like auto-circuit's ``draw_seq_graph``: in a token-specific graph (``seq_len``) each
    position with a drawn edge gets its own Sankey, stacked top to bottom in position
    order, its height proportional to the position's total ``|score|``; nodes stand at
    ``x`` by layer and ``y`` by head; a link's value is the edge's ``|score|`` and its
    colour the sign (blue > 0, red < 0). A graph without positions gives one Sankey.

    Args:
        pm: the patchable model.
        prune_scores: PruneScores.
        n_edges: the highest-``|score|`` edges to draw, over all positions (None: every
            edge with a non-zero score).
        seq_labels: a label per position (e.g. the dataloader's ``seq_labels``).
        show_all_seq_pos: give positions without a drawn edge an (empty) panel too.
        path: save there: ``.html`` (self-contained) or an image extension (needs
            plotly's image export, ``pip install kaleido``).
        width, height: pixels (defaults scale with layers and panels).

    Returns:
        A ``plotly.graph_objects.Figure``.

    Raises:
        ImportError: plotly is not installed (``pip install plotly``).
    """
    go = _plotly()
    seq_len = pm.graph.seq_len
    if seq_labels is not None:
        seq_labels = list(seq_labels)
        if seq_len is not None and len(seq_labels) != seq_len:
            raise ValueError(f"seq_labels has {len(seq_labels)} labels but the graph has seq_len={seq_len}")
    edges = circuit_edges(pm, prune_scores, n_edges, merge_positions=False)
    finite = _max_finite(edges)
    inf_value = finite * 2 if finite > 0 else 1.0  # an infinite score is drawn as twice the largest finite one
    pos, rep, tallest = _layout(pm)
    n_cols = 1 + max(c for c, _ in pos.values())
    rows = [r for _, r in pos.values()]
    rmin, rmax = min(rows), max(rows)

    by_pos: Dict[Optional[int], List[CircuitEdge]] = {}
    for e in edges:
        by_pos.setdefault(e.seq_idx, []).append(e)
    positions = sorted(by_pos, key=lambda s: -1 if s is None else s)
    if show_all_seq_pos and seq_len is not None:
        positions = list(range(seq_len))
    if not positions:
        positions = [None]

    def value(e):
        return inf_value if math.isinf(e.score) else abs(e.score)

    weights = {p: sum(value(e) for e in by_pos.get(p, [])) for p in positions}
    total = sum(weights.values()) or 1.0
    floor = total / (4 * len(positions))  # every panel stays visible
    heights = {p: max(w, floor) for p, w in weights.items()}
    margin = 0.04 if len(positions) > 1 else 0.0
    avail = 1.0 - margin * (len(positions) - 1)
    h_total = sum(heights.values())
    domains, top = {}, 1.0
    for p in positions:
        h = avail * heights[p] / h_total
        domains[p] = (max(top - h, 0.0), min(top, 1.0))
        top = top - h - margin

    sankeys = []
    for p in positions:
        es = by_pos.get(p, [])
        keys = list(dict.fromkeys([node_key(e.src) for e in es] + [node_key(e.dest) for e in es]))
        index = {k: i for i, k in enumerate(keys)}
        node = dict(
            label=keys,
            x=[0.02 + 0.96 * pos[k][0] / max(n_cols - 1, 1) for k in keys],
            y=[0.5 if rmax == rmin else 0.05 + 0.9 * (pos[k][1] - rmin) / (rmax - rmin) for k in keys],
            pad=8, thickness=12, color="rgba(120,120,120,0.8)",
        )
        link = dict(
            source=[index[node_key(e.src)] for e in es],
            target=[index[node_key(e.dest)] for e in es],
            value=[value(e) for e in es],
            color=[_rgba(e.score) for e in es],
            label=[f"{e.name}: {_fmt_score(e.score)}" for e in es],
            customdata=[e.score if math.isfinite(e.score) else None for e in es],
        )
        sankeys.append(go.Sankey(arrangement="fixed", node=node, link=link,
                                 domain=dict(x=[0.08 if seq_labels else 0.0, 1.0], y=list(domains[p])),
                                 name="all positions" if p is None else f"position {p}"))
    fig = go.Figure(data=sankeys)
    fig.update_layout(width=width or max(600, 160 * n_cols), height=height or max(350, 220 * len(positions)),
                      margin=dict(l=10, r=10, t=40, b=10),
                      title=f"Circuit: top {len(edges)} edges by |score| "
                            f"({'per token position' if seq_len is not None else 'all positions'})")
    if seq_labels is not None:
        for p in positions:
            if p is None:
                continue
            lo, hi = domains[p]
            fig.add_annotation(x=0.0, y=(lo + hi) / 2, xref="paper", yref="paper", showarrow=False,
                               text=f"<b>{seq_labels[p]}</b>", xanchor="left")
    if path is not None:
        p = os.fspath(path)
        folder = os.path.dirname(p)
        if folder:
            os.makedirs(folder, exist_ok=True)
        if p.lower().endswith(".html"):
            fig.write_html(p, include_plotlyjs=True)
        else:
            try:
                fig.write_image(p)
            except (ImportError, ValueError, RuntimeError) as e:
                raise RuntimeError(f"cannot write {p!r}: plotly's image export failed ({e}); save as .html, "
                                   "or pip install kaleido") from e
    return fig


# --------------------------------------------------------------------------------------
# Curves


def _curves(values, what: str) -> Dict[Optional[str], List[float]]:
    if isinstance(values, Mapping):
        out = {str(k): _floats(v, f"{what}[{k!r}]") for k, v in values.items()}
        if not out:
            raise ValueError(f"{what} is empty")
        return out
    return {None: _floats(values, what)}


def _floats(xs, what: str) -> List[float]:
    if isinstance(xs, torch.Tensor):
        xs = xs.detach().cpu().reshape(-1).tolist()
    try:
        out = [float(x) for x in xs]
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be a sequence of numbers") from e
    if not out:
        raise ValueError(f"{what} is empty")
    return out


def plot_faithfulness(percentages: Sequence[float], f, path: Optional[PathLike] = None, *,
                      label: Optional[str] = None, title: Optional[str] = None, log_x: bool = True):
    """The MIB faithfulness curve: faithfulness against circuit size (% of edges).

    Args:
        percentages: circuit sizes in percent of all edges (e.g.
            :data:`funcpatch.metrics.MIB_PERCENTAGES`), increasing.
        f: the faithfulness at each percentage; or a dict ``{label: values}`` for
            several curves (e.g. one per algorithm) on the same percentages.
        path: also save the figure there (``.png``, ``.svg``, ``.pdf``).
        label: legend label of a single curve (the CPR and CMD are appended to it).
        title: the title.
        log_x: logarithmic percentage axis (default; the MIB sizes span 0.1 .. 100).

    Returns:
        The :class:`matplotlib.figure.Figure`.
    """
    from funcpatch.metrics import cmd, cpr

    ps = _floats(percentages, "percentages")
    curves = _curves(f, "f")
    for name, ys in curves.items():
        if len(ys) != len(ps):
            raise ValueError(f"{'f' if name is None else repr(name)} has {len(ys)} values but percentages has {len(ps)}")
    if log_x and any(p <= 0 for p in ps):
        raise ValueError("log_x needs positive percentages; pass log_x=False to plot 0%")
    fig = _new_figure((6.0, 3.8))
    ax = fig.add_subplot()
    ax.axhline(1.0, color="#888888", lw=0.8, ls="--", zorder=1)
    ax.axhline(0.0, color="#888888", lw=0.8, ls=":", zorder=1)
    for name, ys in curves.items():
        try:
            extra = f"CPR {cpr(ps, ys):.3f}, CMD {cmd(ps, ys):.3f}"
        except ValueError:
            extra = ""
        text = name if name is not None else label
        text = f"{text} ({extra})" if text and extra else (text or extra or None)
        ax.plot(ps, ys, marker="o", ms=4, lw=1.6, label=text, zorder=3)
    if log_x:
        ax.set_xscale("log")
        ax.set_xticks(ps, [f"{p:g}" for p in ps])
        ax.minorticks_off()
    ax.set_xlabel("circuit size (% of edges)")
    ax.set_ylabel("faithfulness")
    ax.grid(alpha=0.3)
    if any(line.get_label() and not line.get_label().startswith("_") for line in ax.get_lines()):
        ax.legend(fontsize=8, loc="best")
    ax.set_title(title if title is not None else "Faithfulness against circuit size", fontsize=10)
    _save(fig, path)
    return fig


def plot_roc(fpr, tpr, path: Optional[PathLike] = None, *, label: Optional[str] = None,
             title: Optional[str] = None):
    """ROC curve(s) of prune scores against a known circuit.

    Args:
        fpr, tpr: false and true positive rates (e.g. from
            :func:`funcpatch.metrics.roc`), from (0, 0) to (1, 1); or two dicts
            ``{label: values}`` with the same keys for several curves.
        path: also save the figure there (``.png``, ``.svg``, ``.pdf``).
        label: legend label of a single curve (the area under it is appended).
        title: the title.

    Returns:
        The :class:`matplotlib.figure.Figure`.
    """
    fprs, tprs = _curves(fpr, "fpr"), _curves(tpr, "tpr")
    if set(fprs) != set(tprs):
        raise ValueError(f"fpr and tpr must hold the same curves, got {sorted(map(str, fprs))} and "
                         f"{sorted(map(str, tprs))}")
    fig = _new_figure((4.6, 4.4))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#999999", lw=0.8, ls="--", label="chance")
    for name in fprs:
        xs, ys = fprs[name], tprs[name]
        if len(xs) != len(ys):
            raise ValueError(f"fpr has {len(xs)} values but tpr has {len(ys)}")
        if any(not 0 <= v <= 1 for v in xs + ys):
            raise ValueError("rates must lie in [0, 1]")
        auc = sum((x2 - x1) * (y1 + y2) / 2 for x1, x2, y1, y2 in zip(xs, xs[1:], ys, ys[1:]))
        text = name if name is not None else label
        ax.plot(xs, ys, lw=1.8, label=f"{text} (AUC {auc:.3f})" if text else f"AUC {auc:.3f}")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title if title is not None else "ROC against the reference circuit", fontsize=10)
    _save(fig, path)
    return fig
