"""funcpatch.viz: files are written and readable, and the drawing follows the scores."""

import math
import sys

import pytest
import torch
from matplotlib.colors import to_rgba
from matplotlib.patches import FancyArrowPatch

import funcpatch as fp
from funcpatch import metrics, viz


def _scores(pm, seed=0):
    """Distinct scores of both signs, |score| in (0.1, 1.1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in fp.init_state(pm).masks.items():
        mag = torch.rand(v.shape, generator=g) + 0.1
        sign = torch.where(torch.rand(v.shape, generator=g) < 0.35, -1.0, 1.0)
        out[k] = mag * sign
    return out


@pytest.fixture(scope="module")
def micro():
    return fp.patchable(fp.MicroModel(n_layers=2))


@pytest.fixture(scope="module")
def micro_seq():
    return fp.patchable(fp.MicroModel(n_layers=2), seq_len=3)


def _edge_arrows(fig):
    ax = fig.axes[0]
    return {p.get_gid()[len("edge:"):]: p for p in ax.patches
            if isinstance(p, FancyArrowPatch) and (p.get_gid() or "").startswith("edge:")}


def _node_gids(fig):
    return {p.get_gid()[len("node:"):] for p in fig.axes[0].patches if (p.get_gid() or "").startswith("node:")}


def _scores_by_name(pm, scores):
    return {e.name: float(e.prune_score(scores)) for e in pm.graph.edges}


# ------------------------------------------------------------------------------ circuit diagram


def test_draw_circuit_widths_and_colours_follow_scores(micro):
    scores = _scores(micro)
    fig = viz.draw_circuit(micro, scores, n_edges=8)
    arrows = _edge_arrows(fig)
    by_name = _scores_by_name(micro, scores)
    top = sorted(by_name, key=lambda n: -abs(by_name[n]))[:8]
    assert set(arrows) == set(top)
    max_abs = max(abs(by_name[n]) for n in top)
    for name, arrow in arrows.items():
        s = by_name[name]
        assert arrow.get_linewidth() == pytest.approx(viz.edge_width(s, max_abs))
        want = viz.POS_COLOR if s > 0 else viz.NEG_COLOR
        assert to_rgba(arrow.get_edgecolor())[:3] == pytest.approx(to_rgba(want)[:3])
    # wider for larger |score|: widths sorted like |scores|
    ordered = sorted(arrows, key=lambda n: abs(by_name[n]))
    widths = [arrows[n].get_linewidth() for n in ordered]
    assert widths == sorted(widths) and widths[-1] == pytest.approx(viz.MAX_EDGE_WIDTH)
    assert widths[0] > viz.MIN_EDGE_WIDTH  # the weakest drawn edge still has a positive score
    assert {e.src.name for e in micro.graph.edges if e.name in top} <= _node_gids(fig)
    # both signs occur in this circuit, so both colours are tested
    assert {by_name[n] > 0 for n in top} == {True, False}


def test_draw_circuit_saves_png_and_svg(micro, tmp_path):
    scores = _scores(micro)
    png, svg = tmp_path / "c.png", tmp_path / "sub" / "c.svg"
    viz.draw_circuit(micro, scores, n_edges=5, path=png)
    viz.draw_circuit(micro, scores, n_edges=5, path=svg)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    text = svg.read_text()
    assert text.lstrip().startswith("<?xml") and text.count("<path") >= 5 + len(_node_gids(viz.draw_circuit(micro, scores, 5)))
    assert text.count('id="edge:') == 5
    with pytest.raises(ValueError, match="png"):
        viz.draw_circuit(micro, scores, n_edges=5, path=tmp_path / "c.jpeg")


def test_draw_circuit_transformer_ports_and_titles(any_lm):
    pm = fp.patchable(any_lm)
    scores = _scores(pm, seed=1)
    fig = viz.draw_circuit(pm, scores, n_edges=12, title="my circuit", faithfulness=0.8312, note="a note")
    arrows = _edge_arrows(fig)
    assert len(arrows) == 12
    # the title states the circuit's size and faithfulness
    assert fig.axes[0].get_title() == (f"my circuit\nCircuit: top 12 of {pm.n_edges} edges by |score|; "
                                       "faithfulness 0.83\na note")
    # Q/K/V destinations are drawn on their head: no node named "A0.0.Q"
    nodes = _node_gids(fig)
    assert not any(n.endswith((".Q", ".K", ".V")) for n in nodes)
    assert {"Resid Start", "Resid End", "A0.0"} <= nodes
    # Q, K and V arrows into one head end at three different heights
    for head in ("A1.0", "A1.1"):
        ends = {}
        for x in "QKV":
            name = f"A0.0->{head}.{x}"
            if name in {e.name for e in pm.graph.edges}:
                big = {k: torch.zeros_like(v) for k, v in scores.items()}
                e = pm.graph.edge(name)
                big[e.dest.module_name][e.patch_idx] = 1.0
                a = _edge_arrows(viz.draw_circuit(pm, big, n_edges=1))[name]
                ends[x] = a._path_original.vertices[-1][1]  # the end of the drawn curve
        if len(ends) == 3:
            assert ends["Q"] > ends["K"] > ends["V"]


def test_draw_circuit_infinite_scores_and_fewer_nonzero(micro):
    scores = {k: torch.zeros_like(v) for k, v in _scores(micro).items()}
    edges = micro.graph.edges
    for i, e in enumerate(edges[:3]):
        scores[e.dest.module_name][e.patch_idx] = [math.inf, 2.0, -1.0][i]
    fig = viz.draw_circuit(micro, scores, n_edges=10)  # only 3 non-zero edges
    arrows = _edge_arrows(fig)
    assert set(arrows) == {e.name for e in edges[:3]}
    assert arrows[edges[0].name].get_linewidth() == pytest.approx(viz.MAX_EDGE_WIDTH)
    assert arrows[edges[1].name].get_linewidth() == pytest.approx(viz.MAX_EDGE_WIDTH)
    assert arrows[edges[2].name].get_linewidth() == pytest.approx(viz.edge_width(-1.0, 2.0))
    assert to_rgba(arrows[edges[2].name].get_edgecolor())[:3] == pytest.approx(to_rgba(viz.NEG_COLOR)[:3])


def test_draw_circuit_token_graph_sums_positions(micro_seq):
    scores = {k: torch.zeros_like(v) for k, v in fp.init_state(micro_seq).masks.items()}
    name = micro_seq.graph.edges[0].name
    for pos, v in enumerate([0.5, -2.0, 0.25]):
        e = micro_seq.graph.edge(name, pos)
        scores[e.dest.module_name][e.patch_idx] = v
    other = micro_seq.graph.edges[-1]
    scores[other.dest.module_name][other.patch_idx] = 0.5
    merged = viz.circuit_edges(micro_seq, scores)
    assert [(e.name, e.seq_idx, e.score) for e in merged] == [(name, None, -1.25), (other.name, None, 0.5)]
    per_pos = viz.circuit_edges(micro_seq, scores, merge_positions=False)
    assert [(e.seq_idx, e.score) for e in per_pos[:2]] == [(1, -2.0), (0, 0.5)]
    arrows = _edge_arrows(viz.draw_circuit(micro_seq, scores, n_edges=2))
    assert to_rgba(arrows[name].get_edgecolor())[:3] == pytest.approx(to_rgba(viz.NEG_COLOR)[:3])


def test_draw_circuit_rejects_bad_scores(micro):
    scores = _scores(micro)
    with pytest.raises(ValueError, match="missing"):
        viz.draw_circuit(micro, {k: v for k, v in list(scores.items())[1:]})
    k = next(iter(scores))
    with pytest.raises(ValueError, match="shape"):
        viz.draw_circuit(micro, {**scores, k: scores[k].unsqueeze(0)})
    nan = {**scores, k: torch.full_like(scores[k], math.nan)}
    with pytest.raises(ValueError, match="NaN"):
        viz.draw_circuit(micro, nan)
    with pytest.raises(ValueError, match="n_edges"):
        viz.draw_circuit(micro, scores, n_edges=-1)


def test_figures_render_in_notebooks(micro):
    fig = viz.draw_circuit(micro, _scores(micro), 4)
    png = fig._repr_png_()
    assert png[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------ curves


def test_plot_faithfulness(tmp_path):
    ps = list(metrics.MIB_PERCENTAGES)
    f = [0, 0, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 1.0, 1.0]
    path = tmp_path / "f.png"
    fig = viz.plot_faithfulness(ps, f, path, label="eap")
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 10_000
    lines = [ln for ln in fig.axes[0].get_lines() if ln.get_marker() == "o"]
    assert len(lines) == 1
    assert list(lines[0].get_xdata()) == ps and list(lines[0].get_ydata()) == f
    assert f"CPR {metrics.cpr(ps, f):.3f}" in lines[0].get_label()
    assert fig.axes[0].get_xscale() == "log"
    fig = viz.plot_faithfulness(ps, {"a": f, "b": [1.0] * 10}, tmp_path / "f.svg")
    assert len([ln for ln in fig.axes[0].get_lines() if ln.get_marker() == "o"]) == 2
    assert "<path" in (tmp_path / "f.svg").read_text()
    with pytest.raises(ValueError, match="values"):
        viz.plot_faithfulness(ps, f[:-1])


def test_plot_roc(micro, tmp_path):
    scores = _scores(micro)
    ref = {k: torch.zeros_like(v, dtype=torch.bool) for k, v in scores.items()}
    for e in micro.graph.edges[:4]:
        ref[e.dest.module_name][e.patch_idx] = True
    fpr, tpr = metrics.roc(scores, ref)
    path = tmp_path / "roc.png"
    fig = viz.plot_roc(fpr, tpr, path, label="random")
    assert path.stat().st_size > 10_000
    curve = fig.axes[0].get_lines()[1]
    assert f"AUC {metrics.roc_auc(scores, ref):.3f}" in curve.get_label()
    with pytest.raises(ValueError):
        viz.plot_roc([0, 0.5, 1], [0, 1])


# ------------------------------------------------------------------------------ plotly Sankey


def test_draw_seq_graph_without_plotly_names_the_install(micro, monkeypatch):
    monkeypatch.setitem(sys.modules, "plotly", None)  # import plotly -> ImportError
    monkeypatch.setitem(sys.modules, "plotly.graph_objects", None)
    with pytest.raises(ImportError, match="pip install plotly"):
        viz.draw_seq_graph(micro, _scores(micro))


def test_draw_seq_graph_per_position(micro_seq, tmp_path):
    pytest.importorskip("plotly")
    scores = {k: torch.zeros_like(v) for k, v in fp.init_state(micro_seq).masks.items()}
    e0 = micro_seq.graph.edges[0]
    picks = [(e0.name, 0, 1.0), (e0.name, 2, -3.0), (micro_seq.graph.edges[-1].name, 2, 2.0)]
    for name, pos, v in picks:
        e = micro_seq.graph.edge(name, pos)
        scores[e.dest.module_name][e.patch_idx] = v
    path = tmp_path / "seq.html"
    fig = viz.draw_seq_graph(micro_seq, scores, seq_labels=["a", "b", "c"], path=path)
    assert [t.type for t in fig.data] == ["sankey", "sankey"]  # positions 0 and 2
    first, second = fig.data
    assert list(first.link.value) == [1.0]
    assert sorted(second.link.value) == [2.0, 3.0]
    colours = dict(zip(second.link.value, second.link.color))
    assert colours[3.0].startswith("rgba(214,39,40") and colours[2.0].startswith("rgba(31,95,191")
    assert first.domain.y[0] > second.domain.y[1]  # position 0 above position 2
    assert (second.domain.y[1] - second.domain.y[0]) > (first.domain.y[1] - first.domain.y[0])  # more |score|
    assert [a.text for a in fig.layout.annotations] == ["<b>a</b>", "<b>c</b>"]
    html = path.read_text()
    assert "plotly" in html.lower() and len(html) > 100_000
    all_pos = viz.draw_seq_graph(micro_seq, scores, show_all_seq_pos=True)
    assert len(all_pos.data) == 3
    with pytest.raises(ValueError, match="seq_labels"):
        viz.draw_seq_graph(micro_seq, scores, seq_labels=["a"])


def test_draw_seq_graph_plain_graph(micro):
    pytest.importorskip("plotly")
    fig = viz.draw_seq_graph(micro, _scores(micro), n_edges=6)
    assert len(fig.data) == 1 and len(fig.data[0].link.value) == 6


# ------------------------------------------------------------------------------ legibility


def _node_boxes(fig):
    """node name -> (x0, y0, x1, y1) of its box, in data coordinates."""
    out = {}
    for p in fig.axes[0].patches:
        gid = p.get_gid() or ""
        if gid.startswith("node:"):
            b = p.get_bbox()
            out[gid[len("node:"):]] = (b.x0, b.y0, b.x1, b.y1)
    return out


def _path_points(arrow, per_piece=40):
    """Dense points along an arrow's drawn path (data coordinates), every Bézier piece
    evaluated independently of funcpatch.viz."""
    import numpy as np
    pts = []
    for seg, _ in arrow.get_path().iter_bezier():
        pts.append(seg(np.linspace(0.0, 1.0, per_piece)))
    return np.concatenate(pts)


def _ioi_pm():
    from funcpatch import zoo
    hf, tok = zoo.load_hf("ioi")
    return fp.patchable(fp.models.from_hf(hf, tok))


@pytest.fixture(scope="module")
def ioi_pm():
    from conftest import has_bridge
    if not has_bridge():
        pytest.skip("no TransformerBridge")
    return _ioi_pm()


@pytest.mark.parametrize("n_edges", [10, 60, None])
def test_no_edge_passes_behind_an_unrelated_box(ioi_pm, n_edges):
    """Every drawn edge path (its Bézier curves sampled densely) stays out of every node
    box except its own source's and destination's (issue 11: "Resid Start -> A1.1.V read
    as MLP 0 -> A1.1")."""
    scores = _scores(ioi_pm, seed=3)
    fig = viz.draw_circuit(ioi_pm, scores, n_edges=n_edges)
    boxes = _node_boxes(fig)
    arrows = _edge_arrows(fig)
    assert len(arrows) == (n_edges or ioi_pm.n_edges)
    spans_columns = 0
    for name, arrow in arrows.items():
        e = ioi_pm.graph.edge(name)
        own = {viz.node_key(e.src), viz.node_key(e.dest)}
        pts = _path_points(arrow)
        for node, (x0, y0, x1, y1) in boxes.items():
            if node in own:
                continue
            inside = (pts[:, 0] > x0) & (pts[:, 0] < x1) & (pts[:, 1] > y0) & (pts[:, 1] < y1)
            assert not inside.any(), f"edge {name} passes behind node {node}"
        spans_columns += abs(e.src.layer - e.dest.layer) > 0 and "Resid" in name
    assert spans_columns > 0  # long edges were drawn, so routing was exercised


def test_each_label_sits_on_its_own_edge(ioi_pm):
    scores = _scores(ioi_pm, seed=4)
    fig = viz.draw_circuit(ioi_pm, scores, n_edges=12)
    arrows = _edge_arrows(fig)
    labels = {t.get_gid()[len("label:"):]: t for t in fig.axes[0].texts if (t.get_gid() or "").startswith("label:")}
    assert set(labels) == set(arrows)
    by_name = _scores_by_name(ioi_pm, scores)
    import numpy as np
    paths = {n: _path_points(a, per_piece=200) for n, a in arrows.items()}
    for name, text in labels.items():
        assert text.get_text() == f"{by_name[name]:.3g}"
        p = np.array(text.get_position())
        d_own = np.hypot(*(paths[name] - p).T).min()
        d_other = min(np.hypot(*(q - p).T).min() for n, q in paths.items() if n != name)
        assert d_own < 0.02, (name, d_own)  # on its own curve
        assert d_other > d_own, name  # and nearer to it than to any other edge
