"""Prune algorithms: each returns PruneScores (dest module -> score tensor shaped like its mask).

A higher ``|score|`` means a more important edge; :func:`funcpatch.run_circuits` turns
scores into circuits of a given size.

- gradients over the masks: :func:`mask_gradient`, :func:`eap`, :func:`eap_ig`
- exact single-edge effects: :func:`exact_patching`
- search: :func:`acdc`
- learned masks: :func:`subnetwork_probing`, :func:`circuit_probing`
- baselines: :func:`activation_magnitude`, :func:`random_scores`, :func:`ground_truth`
"""

from funcpatch.algos.acdc import (ACDC_FAITHFULNESS_TARGETS, AcdcRun, AcdcSelfCheckError, acdc, acdc_edge_order,
                                  acdc_runs, acdc_taus)
from funcpatch.algos.exact import exact_patching
from funcpatch.algos.mask_gradient import (ANSWER_FUNCTIONS, EAP_IG_ENDPOINTS, EAP_IG_VARIANTS, GRAD_FUNCTIONS, answer_loss, eap,
                                           eap_ig, mask_gradient, token_values)
from funcpatch.algos.probing import (SP_FAITHFULNESS_TARGETS, SP_INIT_VAL, ProbingResult, circuit_probing,
                                     subnetwork_probing, subnetwork_probing_run)
from funcpatch.algos.simple import activation_magnitude, ground_truth, random_scores

__all__ = [
    "ACDC_FAITHFULNESS_TARGETS", "ANSWER_FUNCTIONS", "AcdcRun", "AcdcSelfCheckError", "EAP_IG_ENDPOINTS", "EAP_IG_VARIANTS",
    "GRAD_FUNCTIONS", "ProbingResult", "SP_FAITHFULNESS_TARGETS", "SP_INIT_VAL", "acdc", "acdc_edge_order",
    "acdc_runs", "acdc_taus", "activation_magnitude", "answer_loss", "circuit_probing", "eap", "eap_ig",
    "exact_patching", "ground_truth", "mask_gradient", "random_scores", "subnetwork_probing",
    "subnetwork_probing_run", "token_values",
]
