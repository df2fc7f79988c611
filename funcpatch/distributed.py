"""Data parallelism over ``torch.distributed``: which work is this rank's, and how the
ranks' results are combined into the single-process result.

With an initialised process group (``torchrun --nproc-per-node K``, gloo on CPUs or
NCCL on GPUs) the algorithms split their work:

- over batches (:func:`my_batches`): rank ``r`` of ``W`` takes batches ``r, r + W, ...``;
  the per-batch results are gathered back into dataloader order
  (:func:`gather_in_order`) and summed there exactly as one process sums them, so the
  result is the same bits on every rank and in a single process;
- over the prompts of one batch (:func:`my_rows`, for ACDC's first batch and the
  training steps of probing): contiguous row ranges; partial sums are gathered and added
  in rank order (:func:`sum_in_rank_order`), so every rank takes the same discrete
  decisions (ACDC's accept test, probing's masks).

Where an algorithm sums per-batch results, the edit is local: loop over
``batches[i] for i in my_batches(batches)``, then ``gather_in_order`` before the sum (see
``funcpatch.algos.exact``). ``fp.mib.evaluate`` (issue 12, its own loop over batches)
needs the same two lines in its ``score`` (per-batch metric values) and ``_means``
(per-batch sums).

Without a process group (or with one rank) every function is the identity: nothing
changes. Objects travel through ``all_gather_object`` with their tensors on the CPU and
come back on ``device``, so the same code runs on gloo and NCCL.
"""

from __future__ import annotations

import os
from typing import Any, List, Optional, Sequence, Tuple, TypeVar

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree

T = TypeVar("T")

__all__ = ["rank_world", "init_from_env", "is_main", "my_batches", "gather_in_order", "my_rows", "sum_in_rank_order",
           "payload_bytes"]


def rank_world() -> Tuple[int, int]:
    """``(rank, world size)`` of the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> bool:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE``
    > 1), with NCCL when CUDA is available, else gloo; nothing otherwise or when a group
    already exists. Returns whether a group is now initialised."""
    if not dist.is_available():
        return False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.is_initialized()


def is_main() -> bool:
    """Whether this process prints and writes: rank 0, or the only process."""
    return rank_world()[0] == 0


def _indices(n: int) -> List[int]:
    rank, world = rank_world()
    return list(range(rank, n, world))


def my_batches(batches: Sequence) -> List[int]:
    """Indices of the batches (prompt-pair batches with a ``key``) this rank computes:
    ``rank, rank + world, ...``. Under a process group, checks first that every rank has
    the same batches in the same order (a dataloader shuffled with different seeds would
    silently mix data)."""
    n = len(batches)
    if rank_world()[1] > 1:
        keys = [getattr(b, "key", None) for b in batches]
        every = _all_gather(keys, None)
        if any(k != keys for k in every):
            raise ValueError("the ranks iterate different batches (their keys differ): give every rank the same "
                             "dataloader, shuffled with the same seed or not at all")
    return _indices(n)


def _to(obj: Any, device: Optional[torch.device]) -> Any:
    return pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, obj)


def _all_gather(obj: Any, device: Optional[torch.device]) -> List[Any]:
    """Every rank's ``obj``, in rank order, tensors on ``device`` (CPU when None)."""
    _, world = rank_world()
    out: List[Any] = [None] * world
    dist.all_gather_object(out, _to(obj, torch.device("cpu")))
    return [_to(o, device) for o in out]


def gather_in_order(local: Sequence[T], n: int, device: Optional[torch.device] = None) -> List[T]:
    """All ``n`` per-batch results, in batch order, on every rank.

    Args:
        local: this rank's results, for the batches :func:`my_batches` gave it, in that order.
        n: the number of batches.
        device: where the gathered tensors go (the model's device).
    """
    rank, world = rank_world()
    if world == 1:
        return list(local)
    if len(local) != len(_indices(n)):
        raise ValueError(f"rank {rank} holds {len(local)} results but computes {len(_indices(n))} of {n} batches")
    per_rank = _all_gather(list(local), device)
    return [per_rank[i % world][i // world] for i in range(n)]


def my_rows(n: int, what: str = "batch", allow_empty: bool = False) -> slice:
    """This rank's contiguous share of ``n`` prompts (the first ``n % world`` ranks get one more).

    With fewer prompts than ranks some shares are empty: allowed with ``allow_empty``,
    else a ValueError that names ``what``."""
    rank, world = rank_world()
    if n < world and not allow_empty:
        raise ValueError(f"the {what} has {n} prompts but {world} ranks share it: give it at least {world} "
                         f"prompts, or run on at most {n} ranks")
    size, extra = divmod(n, world)
    start = rank * size + min(rank, extra)
    return slice(start, start + size + (rank < extra))


def sum_in_rank_order(x: T, device: Optional[torch.device] = None) -> T:
    """The sum over ranks of ``x`` (a tensor or a pytree of tensors), added in rank order
    (the same bits on every rank). Identity without a process group."""
    if rank_world()[1] == 1:
        return x
    parts = _all_gather(x, device)
    total = parts[0]
    for p in parts[1:]:
        total = pytree.tree_map(lambda a, b: a + b, total, p)
    return total


def payload_bytes(obj: Any) -> int:
    """Bytes of tensor data in ``obj`` (what :func:`gather_in_order` moves per rank)."""
    return sum(x.numel() * x.element_size() for x in pytree.tree_leaves(obj) if isinstance(x, torch.Tensor))
