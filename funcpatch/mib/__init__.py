"""The field's circuit formats and evaluation: EAP-IG and MIB's circuit track.

- :func:`save` / :func:`load`: EAP-IG/MIB circuit files (JSON, ``.pt``) and auto-circuit's
  PruneScores files (:mod:`funcpatch.mib.formats`);
- :func:`evaluate`: MIB's ``evaluate_area_under_curve``; :func:`evaluate_circuits` for
  given binary circuits (:mod:`funcpatch.mib.evaluation`);
- :func:`save_submission` / :func:`load_circuit_folder`: MIB's submission layout
  (:mod:`funcpatch.mib.submission`).
"""

from funcpatch.mib.evaluation import (FRACTIONS, INTERVENTIONS, METRICS, MibResults, evaluate, evaluate_circuits,
                                      mib_circuit)
from funcpatch.mib.formats import (FORMATS, MibGraphError, check_mib_graph, from_mib_name, load, mib_cfg, save,
                                   to_mib_name)
from funcpatch.mib.submission import SUBMISSION_PERCENTAGES, load_circuit_folder, save_submission

__all__ = ["FORMATS", "FRACTIONS", "INTERVENTIONS", "METRICS", "SUBMISSION_PERCENTAGES", "MibGraphError", "MibResults",
           "check_mib_graph", "evaluate", "evaluate_circuits", "from_mib_name", "load", "load_circuit_folder",
           "mib_cfg", "mib_circuit", "save", "save_submission", "to_mib_name"]
