"""funcpatch: functional edge patching and circuit discovery over torch.func."""

from funcpatch import algos, metrics, mib, models
from funcpatch.ablation import AblationType, batch_src_ablations, src_ablations
from funcpatch.circuits import CircuitOutputs, PatchType, circuit_masks, run_circuits
from funcpatch.data import PromptDataLoader, PromptDataset, PromptPairBatch
from funcpatch.datasets import load_datasets_from_json
from funcpatch.forward import patched_forward, record_src_outs
from funcpatch.edge_counts import (EdgeCounts, PruneScores, TestEdges, desc_prune_scores, edge_counts_util,
                                   prune_scores_threshold)
from funcpatch.graph import DestNode, Edge, Graph, SrcNode
from funcpatch.intervene import TargetError, intervene, targets
from funcpatch.patches import (AddPatch, CustomPatch, Patch, PatchError, ProbePatch, RecordPatch, ReplacePatch,
                               TensorSlice, ZeroPatch)
from funcpatch.models import MicroModel
from funcpatch.patchable import PatchableModel, patchable
from funcpatch.backends import MissingHooksError
from funcpatch.state import (MaskNoise, PatchState, edge_masks, effective_mask, init_state, mask_fn_mode,
                             patch_mode, sample_mask_noise, set_all_masks)

__all__ = [
    "AddPatch", "CustomPatch", "EdgeCounts", "Patch", "PatchError", "ProbePatch", "PruneScores", "RecordPatch",
    "ReplacePatch", "TargetError", "TensorSlice", "TestEdges", "ZeroPatch", "desc_prune_scores", "edge_counts_util",
    "intervene", "metrics", "mib", "prune_scores_threshold", "targets", "algos", "CircuitOutputs", "PatchType",
    "circuit_masks", "run_circuits",
    "AblationType", "DestNode", "MissingHooksError", "Edge", "Graph", "MaskNoise", "MicroModel", "PatchState", "PatchableModel",
    "PromptDataLoader", "PromptDataset", "PromptPairBatch", "SrcNode", "batch_src_ablations", "edge_masks",
    "effective_mask", "init_state", "load_datasets_from_json", "mask_fn_mode", "models", "patch_mode", "patchable",
    "patched_forward",
    "record_src_outs", "sample_mask_noise", "set_all_masks", "src_ablations",
]
