"""``funcpatch discover --mib-out`` and ``funcpatch evaluate``: evaluate runs on the files
discover wrote, in each format, and the MIB layout holds circuits of MIB's sizes."""

import json
import re

import pytest

import funcpatch as fp
from conftest import has_bridge, run_main  # noqa: E402



pytestmark = pytest.mark.skipif(not has_bridge(), reason="no TransformerBridge in this TransformerLens")


SMALL = ["--model", "ioi", "--prompts", "8", "--batch-size", "8", "--quiet"]


@pytest.fixture(scope="module")
def discovered(tmp_path_factory):
    d = tmp_path_factory.mktemp("disc")
    code, out, err = run_main(["discover", *SMALL, "--samples", "2", "--out", str(d / "out"),
                               "--mib-out", str(d / "mib")])
    assert code == 0, err
    return d, json.loads((d / "out" / "summary.json").read_text())


def _table(out):
    rows = re.findall(r"^\s*([\d.]+)% +(\d+) +(-?[\d.]+)$", out, flags=re.M)
    cpr, cmd = re.search(r"CPR (-?[\d.]+).*CMD (-?[\d.]+)", out).groups()
    return [(float(p), int(n), float(f)) for p, n, f in rows], float(cpr), float(cmd)


def test_discover_mib_out_layout(discovered):
    d, summary = discovered
    assert summary["endpoint"] == "corrupt"  # EAP-IG's code's interpolation points by default
    name = "ioi_ioi"
    assert (d / "mib" / "importances" / name / "importances.json").is_file()
    n_edges = summary["n_edges"]
    files = sorted((d / "mib" / "multiple_circuits" / name).iterdir())
    assert sorted(f.name for f in files) == sorted(f"{p:g}.json" for p in fp.mib.SUBMISSION_PERCENTAGES)
    for f in files:
        flags = json.loads(f.read_text())["edges"]
        assert len(flags) == n_edges
        assert sum(v["in_graph"] for v in flags.values()) <= float(f.stem) / 100 * n_edges  # "at most p%"


def test_evaluate_runs_on_what_discover_wrote(discovered):
    d, summary = discovered
    tables = {}
    for which in ("out/scores.safetensors", "mib/importances/ioi_ioi/importances.json",
                  "mib/importances/ioi_ioi"):
        code, out, err = run_main(["evaluate", str(d / which), *SMALL])
        assert code == 0, err
        tables[which] = _table(out)
    rows, cpr, cmd = tables["out/scores.safetensors"]
    assert [p for p, _, _ in rows] == [100 * f for f in fp.mib.FRACTIONS]
    assert rows[-1][1] == summary["n_edges"] and rows[-1][2] == 1.0
    assert 0 <= cmd <= 1 and cpr <= 1
    # the same scores in funcpatch's and MIB's files: the same evaluation
    assert len(set(map(repr, tables.values()))) == 1


def test_evaluate_a_folder_of_binary_circuits(discovered):
    d, summary = discovered
    code, out, err = run_main(["evaluate", str(d / "mib" / "multiple_circuits" / "ioi_ioi"), *SMALL,
                               "--intervention", "zero"])
    assert code == 0, err
    rows, _, _ = _table(out)
    assert len(rows) == len(fp.mib.SUBMISSION_PERCENTAGES)
    assert [n for _, n, _ in rows] == sorted(n for _, n, _ in rows)


@pytest.mark.parametrize("argv, needle", [
    (["evaluate", "nowhere.json", "--model", "ioi"], "circuit file not found"),
    (["evaluate", "x.json", "--model", "ioi", "--intervention", "resample"], "unknown --intervention"),
    (["evaluate", "x.json", "--model", "ioi", "--metric", "kl"], "unknown --metric"),
    (["evaluate", "x.json", "--model", "nope"], "neither a zoo model"),
])
def test_evaluate_errors_are_one_line(argv, needle):
    code, out, err = run_main(argv)
    assert code != 0 and needle in err and len(err.strip().splitlines()) == 1, err


def test_evaluate_refuses_a_submission_root(discovered):
    d, _ = discovered
    code, _, err = run_main(["evaluate", str(d / "mib"), *SMALL])
    assert code == 1 and "folder that holds the circuit files" in err
