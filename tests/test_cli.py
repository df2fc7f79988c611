"""The ``funcpatch`` command: discover writes its files and prints the table; errors are one
line on stderr with a non-zero exit status, never a traceback."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from funcpatch import cli, metrics, zoo  # noqa: E402
from conftest import has_bridge, run_main  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FILES = ("circuit.png", "faithfulness.png", "scores.safetensors", "edges.json", "summary.json")


needs_bridge = pytest.mark.skipif(not has_bridge(), reason="no TransformerBridge in this TransformerLens")


def assert_one_line_error(code, err, *needles):
    assert code != 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("funcpatch")
    for n in needles:
        assert n.lower() in lines[0].lower(), lines[0]


def check_outputs(out_dir: Path, stdout: str):
    for name in FILES:
        assert (out_dir / name).is_file(), name
    for png in ("circuit.png", "faithfulness.png"):
        data = (out_dir / png).read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) > 10_000
    summary = json.loads((out_dir / "summary.json").read_text())
    n = summary["n_edges"]
    # the table: one row per MIB percentage, then CPR and CMD
    for p in metrics.MIB_PERCENTAGES:
        assert f"{p:g}%" in stdout
    assert "CPR" in stdout and "CMD" in stdout
    assert f"CPR {summary['cpr']:.3f}" in stdout
    table = summary["table"]
    assert [r["percent"] for r in table] == list(metrics.MIB_PERCENTAGES)
    assert [r["edges"] for r in table] == metrics.mib_edge_counts(n)
    assert all(r["circuit_edges"] == r["edges"] for r in table)  # exact sizes
    assert summary["task_check"] == {"ok": True, "problem": None}
    assert table[-1]["faithfulness"] == pytest.approx(1.0)
    zero = [r for r in table if r["edges"] == 0]
    assert zero and all(r["faithfulness"] == pytest.approx(0.0, abs=1e-6) for r in zero)
    ps, fs = [r["percent"] for r in table], [r["faithfulness"] for r in table]
    assert summary["cpr"] == pytest.approx(metrics.cpr(ps, fs)) and summary["cmd"] == pytest.approx(metrics.cmd(ps, fs))
    # scores and the edge list agree, sorted by |score|; scores are JSON numbers or null
    from safetensors import safe_open
    from safetensors.torch import load_file
    scores = load_file(str(out_dir / "scores.safetensors"))
    edges = json.loads((out_dir / "edges.json").read_text())
    assert len(edges) == n == sum(v.numel() for v in scores.values())
    assert all(isinstance(e["score"], float) or (e["score"] is None and e["nonfinite"] in ("inf", "-inf", "nan"))
               for e in edges)
    mags = [math.inf if e["score"] is None else abs(e["score"]) for e in edges]
    assert mags == sorted(mags, reverse=True)
    # the file has the usual permissions, and names the sources along the last axis
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out_dir / "scores.safetensors").st_mode & 0o777 == 0o666 & ~umask
    with safe_open(str(out_dir / "scores.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ablation"] == summary["ablation"]
    for k, v in scores.items():
        srcs = json.loads(meta[f"srcs:{k}"])
        assert len(srcs) == v.shape[-1]
    assert {e["src"] for e in edges} == {s for k in scores for s in json.loads(meta[f"srcs:{k}"])}
    # a complete set: no marker, no temporary folder left next to it
    assert not (out_dir / cli.INCOMPLETE_MARKER).exists()
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(cli.OUTPUT_FILES)
    assert [e["rank"] for e in edges] == list(range(1, n + 1))
    assert all(e["edge"] == f"{e['src']}->{e['dest']}" for e in edges)
    top = sorted(torch.cat([v.reshape(-1) for v in scores.values()]).abs().tolist(), reverse=True)
    assert mags[:5] == pytest.approx(top[:5])
    return summary


# ------------------------------------------------------------------------------ discover


@pytest.fixture(scope="module")
def eap_run(tmp_path_factory):
    if not has_bridge():
        pytest.skip("no TransformerBridge in this TransformerLens")
    out = tmp_path_factory.mktemp("discover") / "out"
    code, stdout, stderr = run_main(["discover", "--algo", "eap", "--prompts", "16", "--batch-size", "16",
                                     "--edges", "12", "--out", str(out), "--quiet"])
    return code, stdout, stderr, out


def test_discover_in_process(eap_run):
    code, stdout, stderr, out = eap_run
    assert code == 0, stderr
    assert stderr.strip() == "", stderr  # --quiet: no progress bars, no status lines
    summary = check_outputs(out, stdout)
    assert summary["algo"] == "eap" and summary["n_train"] == summary["n_test"] == 16
    assert summary["drawn_edges"] == 12
    assert summary["model"] == "induction" and summary["ablation"] == "resample"  # as the CLI names it


@needs_bridge
def test_discover_zoo_model_with_grouped_query_attention(tmp_path):
    """The Llama zoo model (4 query heads sharing 2 key/value heads): its graph has one K and
    one V destination per query head, and EAP's top edges are its reference circuit."""
    out = tmp_path / "out"
    code, stdout, stderr = run_main(["discover", "--model", "induction_gqa", "--algo", "eap", "--prompts", "16",
                                     "--batch-size", "16", "--out", str(out), "--quiet"])
    assert code == 0, stderr
    summary = check_outputs(out, stdout)
    assert summary["model"] == "induction_gqa" and summary["m_full"] > 2.0
    edges = json.loads((out / "edges.json").read_text())
    dests = {e["dest"] for e in edges}
    assert {f"A1.{h}.{x}" for h in range(4) for x in "QKV"} <= dests and not any(".kv" in d for d in dests)
    assert summary["n_edges"] == 110
    ref = json.loads((zoo.model_dir("induction_gqa") / "reference_circuit.json").read_text())["edges"]
    assert {e["edge"] for e in edges[:len(ref)]} == set(ref)


@needs_bridge
def test_discover_grouped_kv_graph(tmp_path):
    """--grouped-kv: one K and one V destination per key/value head, recorded in summary.json,
    and EAP's top edges are the grouped reference circuit."""
    out = tmp_path / "out"
    code, stdout, stderr = run_main(["discover", "--model", "induction_gqa", "--grouped-kv", "--algo", "eap",
                                     "--prompts", "16", "--batch-size", "16", "--out", str(out), "--quiet"])
    assert code == 0, stderr
    summary = check_outputs(out, stdout)
    assert summary["grouped_kv"] is True and summary["n_edges"] == 82
    edges = json.loads((out / "edges.json").read_text())
    dests = {e["dest"] for e in edges}
    assert {f"A1.kv{g}.{x}" for g in range(2) for x in "KV"} <= dests and "A1.0.K" not in dests
    ref = json.loads((zoo.model_dir("induction_gqa") / "reference_circuit_grouped_kv.json").read_text())["edges"]
    assert {e["edge"] for e in edges[:len(ref)]} == set(ref)

@needs_bridge
def test_discover_local_folder_and_ablation_case(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(zoo.model_dir("induction"), folder)  # a plain transformers folder with its dataset.json
    out = tmp_path / "out"
    code, stdout, stderr = run_main(["discover", "--model", str(folder), "--algo", "eap", "--ablation", "Zero",
                                     "--prompts", "8", "--batch-size", "8", "--out", str(out)])
    assert code == 0, stderr
    summary = check_outputs(out, stdout)
    assert summary["ablation"] == "zero" and summary["dataset"].endswith("dataset.json")
    assert "[1/4]" in stderr and "Traceback" not in stderr  # status lines without --quiet


@needs_bridge
@pytest.mark.slow
def test_discover_subprocess_defaults(tmp_path):
    """``python -m funcpatch discover`` with its defaults, as a user runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("FUNCPATCH_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "funcpatch", "discover", "--out", "tmp"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "it/s" in proc.stderr or "s/it" in proc.stderr  # tqdm progress bars
    summary = check_outputs(tmp_path / "tmp", proc.stdout)
    assert summary["algo"] == cli.DEFAULT_ALGO and summary["model"] == cli.DEFAULT_MODEL


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("argv, needles", [
    ([], ["command"]),
    (["frobnicate"], ["invalid choice"]),
    (["discover", "--algo", "nope"], ["--algo", "eap"]),
    (["discover", "--ablation", "sideways"], ["--ablation", "resample"]),
    (["discover", "--model", "no-such-model"], ["no-such-model", "induction"]),
    (["discover", "--edges", "many"], ["--edges", "invalid int"]),
    (["discover", "--edges", "0"], ["--edges"]),
    (["discover", "--prompts", "1"], ["--prompts"]),
    (["discover", "--samples", "0"], ["--samples"]),
    (["discover", "--sp-epochs", "0"], ["--sp-epochs", ">= 1"]),
    (["discover", "--sp-lambda", "-1"], ["--sp-lambda", ">= 0"]),
    (["discover", "--sp-lambda", "nan"], ["--sp-lambda", "finite"]),
    (["discover", "--bogus-flag"], ["unrecognized"]),
])
def test_bad_arguments_one_line(argv, needles):
    code, stdout, stderr = run_main(argv)
    assert_one_line_error(code, stderr, *needles)
    assert code == 2
    assert stdout == ""


def test_missing_and_broken_files(tmp_path):
    code, _, err = run_main(["discover", "--dataset", str(tmp_path / "no_such_file.json")])
    assert_one_line_error(code, err, "not found", "no_such_file.json")
    code, _, err = run_main(["discover", "--model", str(tmp_path)])
    assert_one_line_error(code, err, "config.json")
    (tmp_path / "config.json").write_text("{}")
    code, _, err = run_main(["discover", "--model", str(tmp_path)])
    assert_one_line_error(code, err, "dataset.json", "--dataset")
    out_file = tmp_path / "a_file"
    out_file.write_text("x")
    code, _, err = run_main(["discover", "--out", str(out_file)])
    assert_one_line_error(code, err, "not a folder")


@needs_bridge
def test_broken_dataset_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"prompts": [{"clean": "t1 t2", "corrupt": "t3 t4", "answers": ["t5"]}]}')
    code, _, err = run_main(["discover", "--dataset", str(bad), "--quiet"])
    assert_one_line_error(code, err, "wrong_answers")
    assert code == 1


@needs_bridge
def test_model_without_hooks_one_line(tmp_path):
    """OPT's bridge has no per-head attention hooks: a clear one-line error."""
    from transformers import OPTConfig, OPTForCausalLM
    folder = tmp_path / "opt"
    torch.manual_seed(0)
    OPTForCausalLM(OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64, vocab_size=64,
                             max_position_embeddings=32, word_embed_proj_dim=32)).save_pretrained(folder)
    src = zoo.model_dir("induction")
    for f in ("tokenizer.json", "tokenizer_config.json", "dataset.json"):
        shutil.copy(src / f, folder / f)
    code, _, err = run_main(["discover", "--model", str(folder), "--quiet", "--out", str(tmp_path / "o")])
    assert_one_line_error(code, err, "MissingHooksError", "use_attn_result")
    assert code == 1
    assert not (tmp_path / "o").exists()


def test_debug_env_shows_traceback(monkeypatch):
    monkeypatch.setenv("FUNCPATCH_DEBUG", "1")
    with pytest.raises(cli.CLIError):
        cli.main(["discover", "--algo", "nope"])


def test_subprocess_bad_argument_no_traceback():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("FUNCPATCH_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "funcpatch", "discover", "--ablation", "nope"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert_one_line_error(proc.returncode, proc.stderr, "--ablation")


# ------------------------------------------------------------------------------ zoo, help, helpers


def test_zoo_lists_models_and_tasks():
    code, out, err = run_main(["zoo"])
    assert code == 0 and err == ""
    for name in zoo.list_models():
        assert name in out and zoo.info(name)["task"] in out
    assert "LlamaForCausalLM (n_layer 2, n_head 4, n_kv_head 2, d_model 64)" in out  # induction_gqa's GQA


def test_help_and_version():
    code, out, _ = run_main(["discover", "--help"])
    assert code == 0 and "--ablation" in out and "--algo" in out
    code, out, _ = run_main(["--version"])
    assert code == 0 and out.startswith("funcpatch")


def test_ablation_names_any_case():
    from funcpatch.ablation import AblationType
    for name in AblationType.__members__:
        for variant in (name, name.lower(), name.title(), name.lower().replace("_", "-")):
            assert cli._ablation_type(variant) is AblationType[name]


def test_algorithms_listed():
    algos = cli.available_algorithms()
    assert {"eap", "eap_ig", "acdc", "exact"} <= set(algos)


# ------------------------------------------------------------------------------ issue 11


def _discover(out, *args):
    code, stdout, stderr = run_main(["discover", "--out", str(out), "--quiet", *args])
    assert code == 0, stderr
    return stdout, json.loads((Path(out) / "summary.json").read_text())


@needs_bridge
@pytest.mark.parametrize("ablation", [a.lower() for a in __import__("funcpatch").AblationType.__members__])
def test_every_ablation_type_through_the_cli(tmp_path, ablation):
    """The tokenwise-mean types used to crash after scoring (a list where a
    PromptDataLoader was needed)."""
    stdout, summary = _discover(tmp_path / "o", "--algo", "EAP", "--ablation", ablation.upper(), "--prompts", "4",
                                "--batch-size", "4", "--edges", "3")
    assert summary["ablation"] == ablation and summary["algo"] == "eap"
    assert all(r["circuit_edges"] == r["edges"] for r in summary["table"])
    assert "CPR" in stdout or "task check failed" in stdout


@needs_bridge
def test_discover_circuits_have_exactly_their_size(tmp_path):
    """activation_magnitude gives every destination of a source the same score: ties. Each
    row's logit difference is that of the circuit of exactly its first `edges` edges in
    edges.json's rank order (evaluated here with explicit 0/1 scores), and ties are
    ranked in the graph's edge order."""
    import funcpatch as fp
    from funcpatch.datasets import load_datasets_from_json

    out = tmp_path / "o"
    _, summary = _discover(out, "--algo", "activation_magnitude", "--prompts", "8", "--batch-size", "8")
    edges = json.loads((out / "edges.json").read_text())
    hf, tok = zoo.load_hf("induction")
    pm = fp.patchable(fp.models.from_hf(hf, tok), slice_output="last_seq")
    order = {(e.name, e.seq_idx): i for i, e in enumerate(pm.graph.edges)}
    for a, b in zip(edges, edges[1:]):  # ties in graph order
        if a["score"] == b["score"]:
            assert order[(a["edge"], None)] < order[(b["edge"], None)]
    tied = [r["edges"] for r in summary["table"] if 0 < r["edges"] < len(edges)
            and edges[r["edges"] - 1]["score"] == edges[r["edges"]]["score"]]
    assert tied  # the test covers sizes that cut through a group of tied scores
    # the drawn circuit (no --edges): the smallest evaluated one with faithfulness >= 0.8
    good = [r for r in summary["table"] if r["edges"] > 0 and r["faithfulness"] >= 0.8]
    assert summary["drawn_edges"] == good[0]["edges"]
    assert summary["drawn_faithfulness"] == good[0]["faithfulness"]
    _, test = load_datasets_from_json(tok, zoo.dataset_path("induction"), batch_size=8, train_test_size=(8, 8),
                                      random_seed=0)
    for c in tied:
        top = fp.algos.ground_truth(pm, [r["edge"] for r in edges[:c]])
        outs = fp.run_circuits(pm, test, [c], top, patch_type="tree_patch", progress=False)
        assert list(outs) == [c]
        ld = torch.cat([metrics.logit_diff(outs[c][b.key], b.answers, b.wrong_answers, per_prompt=True)
                        for b in test]).mean()
        row = next(r for r in summary["table"] if r["edges"] == c)
        assert row["logit_diff"] == pytest.approx(float(ld), abs=1e-4)


def test_task_check_rule():
    assert cli.task_check(20.4, -20.9) is None
    assert cli.task_check(2.0, 0.0) is None  # gap 2 >= 10% of 2
    assert "does not beat" in cli.task_check(0.017, 0.021)  # the random model of the issue
    assert "does not beat" in cli.task_check(1.0, 1.0)
    assert "less than 10%" in cli.task_check(10.0, 9.5)  # gap 0.5 < 1.95


@needs_bridge
def test_task_check_failure_is_reported_not_a_cpr(tmp_path):
    """Answers and wrong answers swapped: the full model is worse than the empty circuit."""
    data = json.loads(zoo.dataset_path("induction").read_text())
    for p in data["prompts"]:
        p["answers"], p["wrong_answers"] = p["wrong_answers"], p["answers"]
    path = tmp_path / "swapped.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "o"
    stdout, summary = _discover(out, "--algo", "random", "--dataset", str(path), "--prompts", "8",
                                "--batch-size", "8")
    assert summary["m_full"] < summary["m_empty"]
    assert summary["task_check"]["ok"] is False and "does not beat" in summary["task_check"]["problem"]
    assert summary["cpr"] is None and summary["cmd"] is None
    assert all(r["faithfulness"] is None for r in summary["table"])
    assert "task check failed" in stdout and not any(line.startswith("CPR") for line in stdout.splitlines())
    assert (out / "circuit.png").is_file() and not (out / "faithfulness.png").exists()


def test_out_checked_before_any_work(tmp_path, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("work started before --out was checked")

    monkeypatch.setattr(cli, "load_model", no_work)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    code, _, err = run_main(["discover", "--out", str(a_file / "sub"), "--quiet"])
    assert_one_line_error(code, err, "--out", "not a folder")
    code, _, err = run_main(["discover", "--out", "/proc/funcpatch-no-such/out", "--quiet"])
    assert_one_line_error(code, err, "--out", "not writable")
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        code, _, err = run_main(["discover", "--out", str(ro / "out"), "--quiet"])
        assert_one_line_error(code, err, "--out", "not writable")


@needs_bridge
def test_interrupted_run_leaves_the_previous_set_or_a_marker(tmp_path, monkeypatch):
    out = tmp_path / "o"
    args = ["--algo", "random", "--prompts", "4", "--batch-size", "4", "--edges", "3"]
    _discover(out, *args)
    before = {f: (out / f).read_bytes() for f in cli.OUTPUT_FILES}

    from funcpatch import viz

    def broken(*a, **k):
        raise RuntimeError("disk full")

    with monkeypatch.context() as m:  # fails while writing: the previous set stays, complete
        m.setattr(viz, "plot_faithfulness", broken)
        code, _, err = run_main(["discover", "--out", str(out), "--quiet", *args, "--seed", "1"])
    assert code == 1 and "disk full" in err
    assert {f: (out / f).read_bytes() for f in cli.OUTPUT_FILES} == before
    assert sorted(p.name for p in out.iterdir()) == sorted(cli.OUTPUT_FILES)  # no temporary folder left

    calls = []
    real_replace = os.replace

    def interrupted(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(src, dst)

    with monkeypatch.context() as m:  # interrupted while moving the files in: marked
        m.setattr(cli.os, "replace", interrupted)
        code, _, err = run_main(["discover", "--out", str(out), "--quiet", *args, "--seed", "1"])
    assert code == 130
    assert "interrupted" in (out / cli.INCOMPLETE_MARKER).read_text()
    _discover(out, *args)  # the next complete run removes the marker
    assert sorted(p.name for p in out.iterdir()) == sorted(cli.OUTPUT_FILES)


@needs_bridge
@pytest.mark.slow
@pytest.mark.parametrize("model", ["induction", "ioi"])
def test_subnetwork_probing_beats_random(tmp_path, model):
    """Issue 11: from the CLI, subnetwork probing's CPR was random's (0.250 on induction)."""
    small = ["--model", model, "--prompts", "16", "--batch-size", "16", "--edges", "5"]
    _, sp = _discover(tmp_path / "sp", "--algo", "subnetwork_probing", *small)
    _, rnd = _discover(tmp_path / "rnd", "--algo", "random", *small)
    assert sp["cpr"] >= rnd["cpr"] + 0.2, (sp["cpr"], rnd["cpr"])


def test_help_describes_each_algorithm_and_algo_any_case():
    code, out, _ = run_main(["discover", "--help"])
    assert code == 0
    for a in cli.available_algorithms().values():
        assert a.help in " ".join(out.split()), a.name
    algos = cli.available_algorithms()
    for name in algos:
        for variant in (name, name.upper(), name.title(), name.replace("_", "-")):
            assert cli._algo_name(variant, algos) == name


def test_zoo_prints_real_paths():
    code, out, _ = run_main(["zoo"])
    assert code == 0
    paths = [Path(tok) for line in out.splitlines() for tok in line.split() if tok.startswith("/")]
    assert len(paths) == 2 * len(zoo.list_models())
    assert all(p.exists() for p in paths)
    for name in zoo.list_models():
        assert zoo.model_dir(name).resolve() in paths and zoo.dataset_path(name).resolve() in paths


def test_edges_json_infinite_scores_are_null_and_keep_their_rank():
    """ACDC scores its kept edges inf: JSON has no infinity, so null (never the string "inf")."""
    import funcpatch as fp
    pm = fp.patchable(fp.MicroModel(n_layers=2))
    scores = {k: torch.full_like(v, 0.5) for k, v in fp.init_state(pm).masks.items()}
    e_inf, e_neg, e_big = pm.graph.edges[5], pm.graph.edges[2], pm.graph.edges[0]
    scores[e_inf.dest.module_name][e_inf.patch_idx] = math.inf
    scores[e_neg.dest.module_name][e_neg.patch_idx] = -math.inf
    scores[e_big.dest.module_name][e_big.patch_idx] = -3.0
    rows = json.loads(json.dumps(cli._edges_json(pm, scores), allow_nan=False))
    assert [r["rank"] for r in rows] == list(range(1, pm.n_edges + 1))
    assert [(r["edge"], r["score"], r.get("nonfinite")) for r in rows[:3]] == [
        (e_neg.name, None, "-inf"), (e_inf.name, None, "inf"), (e_big.name, -3.0, None)]  # ties: graph order
    assert all(r["score"] == 0.5 for r in rows[3:])
