"""The ``funcpatch`` command: discover writes its files and prints the table; errors are one
line on stderr with a non-zero exit status, never a traceback."""

import contextlib
import io
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

REPO = Path(__file__).resolve().parent.parent
FILES = ("circuit.png", "faithfulness.png", "scores.safetensors", "edges.json", "summary.json")


def has_bridge():
    try:
        from transformer_lens.model_bridge import TransformerBridge  # noqa: F401
        return True
    except ImportError:
        return False


needs_bridge = pytest.mark.skipif(not has_bridge(), reason="no TransformerBridge in this TransformerLens")


def run_main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


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
    assert table[-1]["faithfulness"] == pytest.approx(1.0)
    zero = [r for r in table if r["circuit_edges"] == 0]
    assert all(r["faithfulness"] == pytest.approx(0.0, abs=1e-6) for r in zero)
    ps, fs = [r["percent"] for r in table], [r["faithfulness"] for r in table]
    assert summary["cpr"] == pytest.approx(metrics.cpr(ps, fs)) and summary["cmd"] == pytest.approx(metrics.cmd(ps, fs))
    # scores and the edge list agree, sorted by |score|
    from safetensors.torch import load_file
    scores = load_file(str(out_dir / "scores.safetensors"))
    edges = json.loads((out_dir / "edges.json").read_text())
    assert len(edges) == n == sum(v.numel() for v in scores.values())
    mags = [math.inf if isinstance(e["score"], str) else abs(e["score"]) for e in edges]
    assert mags == sorted(mags, reverse=True)
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
    assert summary["model"] == "induction" and summary["ablation"] == "RESAMPLE"


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
def test_discover_local_folder_and_ablation_case(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(zoo.model_dir("induction"), folder)  # a plain transformers folder with its dataset.json
    out = tmp_path / "out"
    code, stdout, stderr = run_main(["discover", "--model", str(folder), "--algo", "eap", "--ablation", "Zero",
                                     "--prompts", "8", "--batch-size", "8", "--out", str(out)])
    assert code == 0, stderr
    summary = check_outputs(out, stdout)
    assert summary["ablation"] == "ZERO" and summary["dataset"].endswith("dataset.json")
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
