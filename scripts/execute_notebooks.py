"""Execute the notebooks in notebooks/ and save them with their outputs (what ships).

    python scripts/execute_notebooks.py [notebooks/name.ipynb ...]

Each runs top to bottom in a fresh kernel of this interpreter, in a temporary working
directory (files a notebook writes do not land in the repository), offline. Afterwards
run tests/test_notebooks.py: it checks that the saved outputs hold no errors and no
progress-bar or tokenizer-warning noise.
"""

import os
import sys
import tempfile
from pathlib import Path

import nbclient
import nbformat

ROOT = Path(__file__).resolve().parent.parent


def execute(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as tmp:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": tmp}}).execute()
    nbformat.write(nb, path)


def main(argv) -> None:
    os.environ.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # the kernel imports this checkout's funcpatch
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    paths = [Path(p) for p in argv] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    for p in paths:
        print(p.name, flush=True)
        execute(p)


if __name__ == "__main__":
    main(sys.argv[1:])
