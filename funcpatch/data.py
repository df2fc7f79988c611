"""Clean/corrupt prompt pairs and the batches they are served in.

A task is a set of prompt pairs: a *clean* prompt on which the model shows the behaviour,
a *corrupt* prompt of the same length on which it does not, the correct answer token(s)
and the wrong answer token(s). Batches carry a stable integer ``key`` so per-batch
ablations (``batch_src_ablations``) can be looked up again.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset

Answers = Union[torch.Tensor, List[torch.Tensor]]


@dataclass(frozen=True)
class PromptPair:
    clean: torch.Tensor  # [seq]
    corrupt: torch.Tensor  # [seq]
    answers: torch.Tensor  # [n_answers]
    wrong_answers: torch.Tensor  # [n_wrong]
    attention_mask: Optional[torch.Tensor] = None  # [seq], 1 = real token (clean prompt)
    corrupt_attention_mask: Optional[torch.Tensor] = None  # [seq] (corrupt prompt)


@dataclass(frozen=True)
class PromptPairBatch:
    """One batch of prompt pairs.

    ``clean``/``corrupt``: ``[batch, seq]`` token ids. ``answers``/``wrong_answers``:
    ``[batch, n]`` when every prompt has the same number of answers, else a list of
    ``[n_i]`` tensors. ``attention_mask``: ``[batch, seq]`` (1 = real token) or None.

    When prompts were left-padded (``load_datasets_from_json`` with prompts of different
    lengths), ``attention_mask`` is the clean prompts' mask and ``corrupt_attention_mask``
    the corrupt prompts' mask (``[batch, seq]``); they differ where a clean prompt and its
    corrupt prompt had different lengths. Both are None when nothing was padded.
    """

    key: int
    batch_diverge_idx: int
    clean: torch.Tensor
    corrupt: torch.Tensor
    answers: Answers
    wrong_answers: Answers
    attention_mask: Optional[torch.Tensor] = None
    corrupt_attention_mask: Optional[torch.Tensor] = None


def _as_1d_long(x, what: str, i: int) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() == 0:
        t = t.reshape(1)
    if t.dim() != 1:
        raise ValueError(f"{what}[{i}] must be a 1-d tensor of token ids, got shape {tuple(t.shape)}")
    return t.long()


def _as_prompt(x, what: str, i: int) -> torch.Tensor:
    """A prompt: ``[seq]`` token ids (long), or ``[seq, d_in]`` float input vectors, the
    inputs of a model that takes no tokens (:class:`funcpatch.MicroModel`), kept as they are."""
    t = torch.as_tensor(x)
    if t.is_floating_point() and t.dim() >= 2:
        return t
    return _as_1d_long(t, what, i)


class PromptDataset(Dataset):
    """Prompt pairs from token tensors (or, for models that take vectors, float inputs).

    Args:
        clean, corrupt: ``[n_prompts, seq]`` token tensors, or sequences of ``[seq]``
            tensors; or float inputs ``[n_prompts, seq, d_in]`` / sequences of ``[seq, d_in]``
            (MicroModel, the seed library's ``micro_model_inputs.json``).
        answers, wrong_answers: per prompt a token id or a 1-d tensor of ids.
        attention_mask, corrupt_attention_mask: optional, like ``clean``/``corrupt``
            (1 = real token, 0 = padding), for left-padded prompts.
    """

    def __init__(self, clean, corrupt, answers, wrong_answers, attention_mask=None,
                 corrupt_attention_mask=None):
        n = len(clean)
        for name, seq in (("corrupt", corrupt), ("answers", answers), ("wrong_answers", wrong_answers)):
            if len(seq) != n:
                raise ValueError(f"{name} has {len(seq)} entries but clean has {n}; they must match")
        self.clean = [_as_prompt(c, "clean", i) for i, c in enumerate(clean)]
        self.corrupt = [_as_prompt(c, "corrupt", i) for i, c in enumerate(corrupt)]
        for i, (c, k) in enumerate(zip(self.clean, self.corrupt)):
            if c.shape != k.shape:
                raise ValueError(
                    f"prompt {i}: clean has shape {tuple(c.shape)} but corrupt has {tuple(k.shape)}; "
                    "clean and corrupt prompts must have the same length"
                )
        kinds = {(c.dtype, c.shape[1:]) for c in self.clean + self.corrupt}
        if len(kinds) > 1:
            raise ValueError(f"prompts mix kinds {sorted(map(str, kinds))} (dtype, shape after seq): all must be "
                             "token ids, or all float vectors of one width")
        self.answers = [_as_1d_long(a, "answers", i) for i, a in enumerate(answers)]
        self.wrong_answers = [_as_1d_long(a, "wrong_answers", i) for i, a in enumerate(wrong_answers)]
        self.attention_mask = self._masks(attention_mask, "attention_mask", self.clean)
        self.corrupt_attention_mask = self._masks(corrupt_attention_mask, "corrupt_attention_mask", self.corrupt)

    @staticmethod
    def _masks(masks, what: str, prompts: List[torch.Tensor]) -> Optional[List[torch.Tensor]]:
        if masks is None:
            return None
        if len(masks) != len(prompts):
            raise ValueError(f"{what} has {len(masks)} entries but there are {len(prompts)} prompts")
        out = [_as_1d_long(m, what, i) for i, m in enumerate(masks)]
        for i, (m, p) in enumerate(zip(out, prompts)):
            if m.shape != p.shape[:1]:
                raise ValueError(f"{what}[{i}] has {m.numel()} entries but its prompt has {p.shape[0]} positions")
        return out

    def __len__(self) -> int:
        return len(self.clean)

    def __getitem__(self, idx: int) -> PromptPair:
        mask = None if self.attention_mask is None else self.attention_mask[idx]
        cmask = None if self.corrupt_attention_mask is None else self.corrupt_attention_mask[idx]
        return PromptPair(self.clean[idx], self.corrupt[idx], self.answers[idx], self.wrong_answers[idx],
                          mask, cmask)


def _stack_or_list(ts: Sequence[torch.Tensor]) -> Answers:
    if all(t.shape == ts[0].shape for t in ts):
        return torch.stack(list(ts))
    return list(ts)


def batch_key(clean: torch.Tensor, corrupt: torch.Tensor) -> int:
    """A key that depends only on the tokens (not on Python's hash seed)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(clean.detach().cpu().contiguous().numpy().tobytes())  # via the CPU: CUDA tensors have no numpy view
    h.update(corrupt.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(h.digest(), "little")


def collate_prompt_pairs(pairs: Sequence[PromptPair], diverge_idx: int = 0) -> PromptPairBatch:
    lengths = {p.clean.shape[0] for p in pairs}
    if len(lengths) != 1:
        raise ValueError(f"prompts in one batch must have one length, got lengths {sorted(lengths)}")
    clean = torch.stack([p.clean for p in pairs])
    corrupt = torch.stack([p.corrupt for p in pairs])
    return PromptPairBatch(
        key=batch_key(clean, corrupt),
        batch_diverge_idx=diverge_idx,
        clean=clean,
        corrupt=corrupt,
        answers=_stack_or_list([p.answers for p in pairs]),
        wrong_answers=_stack_or_list([p.wrong_answers for p in pairs]),
        attention_mask=_stack_masks([p.attention_mask for p in pairs], "attention_mask"),
        corrupt_attention_mask=_stack_masks([p.corrupt_attention_mask for p in pairs], "corrupt_attention_mask"),
    )


def batch_rows(batch: PromptPairBatch, rows: slice) -> PromptPairBatch:
    """The prompts ``rows`` of ``batch`` (a contiguous share of it), as a batch with the same key."""
    def cut(x):
        return None if x is None else x[rows]
    return dataclasses.replace(batch, clean=batch.clean[rows], corrupt=batch.corrupt[rows],
                               answers=cut(batch.answers), wrong_answers=cut(batch.wrong_answers),
                               attention_mask=cut(batch.attention_mask),
                               corrupt_attention_mask=cut(batch.corrupt_attention_mask))


def _stack_masks(masks: Sequence[Optional[torch.Tensor]], what: str) -> Optional[torch.Tensor]:
    """``[batch, seq]`` from per-pair masks, or None when no pair has one."""
    n_none = sum(m is None for m in masks)
    if n_none == len(masks):
        return None
    if n_none:
        raise ValueError(f"{n_none} of {len(masks)} prompt pairs in the batch have no {what}; all or none must")
    return torch.stack(list(masks))


class PromptDataLoader(DataLoader):
    """A DataLoader of :class:`PromptPairBatch` with the task's metadata.

    Args:
        dataset: a :class:`PromptDataset` (or a Subset of one).
        seq_len: prompt length when every prompt has the same length (needed for
            token-specific graphs), else None.
        diverge_idx: first position where clean and corrupt prompts differ (the shared
            prefix before it can be computed once).
        seq_labels: optional names of the token positions (for plots).
        word_idxs: optional named positions.
        prefix: optional ``[diverge_idx]`` token ids that every prompt shared and that were
            cut off (``load_datasets_from_json(..., tail_divergence=True)``): the full prompt
            is ``prefix`` followed by the batch's tokens. None when nothing was cut.
        batch_size, shuffle, ...: passed on to ``torch.utils.data.DataLoader``.
    """

    def __init__(self, dataset, seq_len: Optional[int], diverge_idx: int = 0, seq_labels=None,
                 word_idxs=None, prefix: Optional[torch.Tensor] = None, **kwargs):
        if len(dataset) == 0:
            raise ValueError("the dataset is empty: a PromptDataLoader needs at least one prompt pair")
        kwargs.setdefault("collate_fn", lambda pairs: collate_prompt_pairs(pairs, diverge_idx))
        super().__init__(dataset, **kwargs)
        self.seq_len = seq_len
        self.diverge_idx = diverge_idx
        self.seq_labels = seq_labels
        self.word_idxs = word_idxs or {}
        self.prefix = prefix
