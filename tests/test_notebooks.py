"""Every notebook in notebooks/ runs top to bottom without an error (nbclient, a fresh kernel
of this interpreter: jupyter_client runs the kernel spec's ``python`` as sys.executable)."""

import re
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
TIMEOUT_S = 300  # per cell; each notebook takes < 60 s on a 2-core CPU
# What a reader should not see: progress bars and widgets, tokenizer-config warnings.
NOISE = ("it/s]", "s/it]", "IProgress not found", "TqdmWarning", "bos_token_id must be", "eos_token_id must be",
         "Loading weights")
PRIVATE = re.compile(r"from funcpatch[\w.]* import [^\n]*\b_\w|\b(fp|funcpatch)(\.\w+)*\._\w")


def noise(nb) -> list:
    """Outputs that are errors, stderr, widgets or known noise: ``[(cell index, what)]``."""
    found = []
    for i, c in enumerate(nb.cells):
        for o in c.get("outputs", []) if c.cell_type == "code" else []:
            data = o.get("data", {})
            text = "".join(o.get("text", "")) + str(data.get("text/plain", ""))
            if o.output_type == "error":
                found.append((i, f"error {o.ename}: {o.evalue}"))
            elif o.get("name") == "stderr":
                found.append((i, f"stderr: {text[:200]}"))
            elif "application/vnd.jupyter.widget-view+json" in data:
                found.append((i, "a widget"))
            found += [(i, f"noise {n!r}") for n in NOISE if n in text]
    return found


def test_notebooks_exist():
    names = {p.name for p in PATHS}
    assert {"quickstart.ipynb", "per_prompt_vmap.ipynb", "torch_func.ipynb"} <= names, names


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebooks_ship_executed_and_quiet(path):
    # regenerate with scripts/execute_notebooks.py
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), f"{path.name}: not executed in order"
    assert sum(bool(c.outputs) for c in code) >= len(code) - 1, f"{path.name}: cells without outputs"
    assert not noise(nb), f"{path.name}: {noise(nb)}"
    private = [m.group(0) for c in code for m in PRIVATE.finditer(c.source)]
    assert not private, f"{path.name} uses private names: {private}"


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("MPLBACKEND", "Agg")  # headless; figures still show through _repr_png_
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})  # files land in tmp
    t0 = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:  # the message holds the cell and its traceback
        pytest.fail(f"{path.name}: {e}", pytrace=False)
    assert not noise(nb), f"{path.name}: {noise(nb)}"
    print(f"{path.name}: {time.perf_counter() - t0:.1f} s")
