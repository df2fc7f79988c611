"""MIB's submission layout: one folder per task and model, named ``{task}_{model}``.

MIB's README (circuit track, "Submitting to the MIB Leaderboard") takes per folder either
one file of importance scores, or binary circuits, one with at most each of
:data:`SUBMISSION_PERCENTAGES` percent of the edges. :func:`save_submission` writes both,
in two trees as MIB's example submission repository does::

    DIR/importances/{task}_{model}/importances.json
    DIR/multiple_circuits/{task}_{model}/{percent}.json      # e.g. 0.1.json, 50.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Tuple, Union

import torch

from funcpatch.mib.evaluation import mib_circuit
from funcpatch.mib.formats import MibGraphError, load, save

__all__ = ["SUBMISSION_PERCENTAGES", "CIRCUIT_SUFFIXES", "save_submission", "load_circuit_folder"]

#: the circuit sizes of a submission of binary circuits, in percent of the edges (MIB's README)
SUBMISSION_PERCENTAGES = (0, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50)
#: files a circuit folder may hold
CIRCUIT_SUFFIXES = (".json", ".pt")


def save_submission(pm, scores: Mapping[str, torch.Tensor], out_dir, name: str) -> List[Path]:
    """Write ``scores`` in MIB's submission layout under ``out_dir`` (see the module doc).

    The binary circuit at ``p`` percent is MIB's circuit construction
    (:func:`funcpatch.mib.mib_circuit`) of ``int(p / 100 * n_edges)`` edges, so it has at
    most that many; every file also carries the scores (EAP-IG's ``Graph.from_json`` reads
    them). ``name`` is the folder name, ``{task}_{model}`` (e.g. ``ioi_gpt2``).

    Returns:
        the files written.
    """
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ValueError(f"name must be a folder name like 'ioi_gpt2' ({{task}}_{{model}}), got {name!r}")
    out_dir = Path(out_dir)
    scores_dir, circuits_dir = out_dir / "importances" / name, out_dir / "multiple_circuits" / name
    scores_dir.mkdir(parents=True, exist_ok=True)
    circuits_dir.mkdir(parents=True, exist_ok=True)
    files = [save(pm, scores, scores_dir / "importances.json")]
    for p in SUBMISSION_PERCENTAGES:
        flags = mib_circuit(pm, scores, int(p / 100 * pm.graph.n_edges))
        files.append(save(pm, scores, circuits_dir / f"{p:g}.json", in_graph=flags))
    return files


def load_circuit_folder(pm, folder) -> Tuple[str, Union[Dict[str, torch.Tensor], List[Dict[str, torch.Tensor]]]]:
    """Read one ``{task}_{model}`` folder of a MIB submission.

    Returns:
        ``("scores", PruneScores)`` for a folder with one circuit file (importance
        scores), or ``("circuits", [in-graph masks, ...])`` for a folder of binary
        circuits (every ``.json`` / ``.pt`` in it).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {str(folder)!r}")
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in CIRCUIT_SUFFIXES)
    if not files:
        subs = sorted(f.name for f in folder.iterdir() if f.is_dir())
        hint = (f"; it has folders {subs[:8]}: give the {{task}}_{{model}} folder that holds the circuit files"
                if subs else "")
        raise MibGraphError(f"{folder}: holds no circuit file ({', '.join(CIRCUIT_SUFFIXES)}){hint}")
    if len(files) == 1:
        return "scores", load(pm, files[0])[0]
    circuits = []
    for f in files:
        flags = load(pm, f)[1]
        if flags is None:
            raise MibGraphError(f"{f}: holds scores only (auto-circuit's format); a folder of several files must "
                                "hold binary circuits with in-graph flags")
        circuits.append(flags)
    return "circuits", circuits
