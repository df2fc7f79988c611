"""Patch values for each source node: what an edge carries when it is ablated."""

from __future__ import annotations

from enum import Enum
from typing import Dict, Literal, Optional, Union

import torch

from funcpatch import distributed
from funcpatch.data import PromptDataLoader
from funcpatch.forward import record_src_outs
from funcpatch.state import _param_device


class AblationType(Enum):
    """What replaces a source's output on an ablated edge.

    RESAMPLE: the source's output on the corrupt input.
    ZERO: zeros.
    TOKENWISE_MEAN_{CLEAN,CORRUPT,CLEAN_AND_CORRUPT}: per-position mean over the whole
        dataset's clean / corrupt / both prompts.
    BATCH_TOKENWISE_MEAN: per-position mean over the current batch.
    BATCH_ALL_TOK_MEAN: mean over the current batch and all positions.
    """

    RESAMPLE = 1
    ZERO = 2
    TOKENWISE_MEAN_CLEAN = 3
    TOKENWISE_MEAN_CORRUPT = 4
    TOKENWISE_MEAN_CLEAN_AND_CORRUPT = 5
    BATCH_TOKENWISE_MEAN = 6
    BATCH_ALL_TOK_MEAN = 7

    def __str__(self) -> str:
        return self.name.replace("_", " ").title()

    @property
    def mean_over_dataset(self) -> bool:
        return self in (AblationType.TOKENWISE_MEAN_CLEAN, AblationType.TOKENWISE_MEAN_CORRUPT,
                        AblationType.TOKENWISE_MEAN_CLEAN_AND_CORRUPT)

    @property
    def clean_dataset(self) -> bool:
        return self in (AblationType.TOKENWISE_MEAN_CLEAN, AblationType.TOKENWISE_MEAN_CLEAN_AND_CORRUPT)

    @property
    def corrupt_dataset(self) -> bool:
        return self in (AblationType.TOKENWISE_MEAN_CORRUPT, AblationType.TOKENWISE_MEAN_CLEAN_AND_CORRUPT)

    @property
    def batch_specific(self) -> bool:
        """Whether the values depend on which batch (clean or corrupt) they are computed on."""
        return self in (AblationType.RESAMPLE, AblationType.BATCH_TOKENWISE_MEAN, AblationType.BATCH_ALL_TOK_MEAN)


def enum_member(cls, x, what: str):
    """``x`` as a member of the enum ``cls`` (a member, or its name in any case)."""
    if isinstance(x, cls):
        return x
    try:
        return cls[str(x).upper()]
    except KeyError:
        raise ValueError(f"unknown {what} {x!r}; valid: {[m.name for m in cls]}") from None


def as_ablation_type(x: Union[AblationType, str]) -> AblationType:
    return enum_member(AblationType, x, "ablation type")


def _src_outs(pm, tokens: torch.Tensor, attention_mask=None) -> torch.Tensor:
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    if pm.forward.takes_logits_to_keep:  # only the sources are wanted: unembed one position, not all
        kwargs["logits_to_keep"] = 1
    with torch.no_grad():
        return record_src_outs(pm, tokens, **kwargs)[1]


def dataset_tokenwise_mean(pm, batches, ablation_type: AblationType) -> torch.Tensor:
    """The TOKENWISE_MEAN_* patch values over ``batches`` (a list of PromptPairBatch):
    ``[n_srcs, largest batch, seq, d_model]``, each prompt run with its own attention mask.

    Under a ``torch.distributed`` process group each rank runs its share of the batches
    and the per-batch sums are added in batch order, as one process adds them."""
    def sums(b):
        parts = ([(b.clean, b.attention_mask)] if ablation_type.clean_dataset else []) + \
                ([(b.corrupt, b.attention_mask if getattr(b, "corrupt_attention_mask", None) is None
                   else b.corrupt_attention_mask)] if ablation_type.corrupt_dataset else [])
        return [_src_outs(pm, x, mask).sum(dim=1, keepdim=True) for x, mask in parts]

    local = [sums(batches[i]) for i in distributed.my_batches(batches)]
    total = None
    for part in distributed.gather_in_order(local, len(batches), _param_device(pm)):
        for s in part:
            total = s if total is None else total + s
    n = sum(b.clean.shape[0] * (ablation_type.clean_dataset + ablation_type.corrupt_dataset) for b in batches)
    width = max(b.clean.shape[0] for b in batches)
    mean = total / n
    return mean.expand(mean.shape[0], width, *mean.shape[2:]).contiguous()


def src_ablations(pm, sample: Union[torch.Tensor, PromptDataLoader],
                  ablation_type: Union[AblationType, str] = AblationType.RESAMPLE,
                  attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Patch values for every source: ``[n_srcs, batch, seq, d_model]``.

    Args:
        sample: one batch of model inputs, or (for the TOKENWISE_MEAN types, which
            average over a whole dataset) a :class:`PromptDataLoader`.
        ablation_type: see :class:`AblationType`.
        attention_mask: ``[batch, seq]`` for a padded batch (a dataloader's batches
            carry their own).
    """
    ablation_type = as_ablation_type(ablation_type)
    if ablation_type.mean_over_dataset:
        if not isinstance(sample, PromptDataLoader):
            raise TypeError(f"{ablation_type.name} averages over a dataset: pass a PromptDataLoader, "
                            f"got {type(sample).__name__}")
        return dataset_tokenwise_mean(pm, list(sample), ablation_type)
    if not isinstance(sample, torch.Tensor):
        raise TypeError(f"{ablation_type.name} is computed on one batch: pass a tensor of model inputs, "
                        f"got {type(sample).__name__}")
    outs = _src_outs(pm, sample, attention_mask)
    if ablation_type == AblationType.RESAMPLE:
        return outs
    if ablation_type == AblationType.ZERO:
        return torch.zeros_like(outs)
    if ablation_type == AblationType.BATCH_TOKENWISE_MEAN:
        return outs.mean(dim=1, keepdim=True).expand_as(outs).contiguous()
    return outs.mean(dim=(1, 2), keepdim=True).expand_as(outs).contiguous()  # BATCH_ALL_TOK_MEAN


def batch_src_ablations(pm, dataloader: PromptDataLoader,
                        ablation_type: Union[AblationType, str] = AblationType.RESAMPLE,
                        clean_corrupt: Optional[Literal["clean", "corrupt"]] = None) -> Dict[int, torch.Tensor]:
    """:func:`src_ablations` for each batch of ``dataloader``, keyed by ``batch.key``.

    ``clean_corrupt`` picks the prompts the batch-specific types (RESAMPLE,
    BATCH_TOKENWISE_MEAN, BATCH_ALL_TOK_MEAN) are computed on; it must be None for
    the others, as in the seed library.
    """
    ablation_type = as_ablation_type(ablation_type)
    if ablation_type.batch_specific and clean_corrupt not in ("clean", "corrupt"):
        raise ValueError(f"{ablation_type.name} depends on the batch: pass clean_corrupt='clean' or 'corrupt', "
                         f"got {clean_corrupt!r}")
    if not ablation_type.batch_specific and clean_corrupt is not None:
        raise ValueError(f"{ablation_type.name} does not use clean_corrupt; pass None, got {clean_corrupt!r}")
    if ablation_type.mean_over_dataset:
        mean = src_ablations(pm, dataloader, ablation_type)
        return {b.key: mean[:, : b.clean.shape[0]] for b in dataloader}
    out = {}
    for b in dataloader:
        x = b.clean if ablation_type == AblationType.ZERO or clean_corrupt == "clean" else b.corrupt
        out[b.key] = src_ablations(pm, x, ablation_type)
    return out
