"""The few collectives sdf-ray uses, behind a small protocol, with a real, a single-process and a fake backend.

``LocalCollectives`` is the single-process implementation (unit tests, 1 worker); ``TorchCollectives``
uses the default ``torch.distributed`` process group that Ray Train sets up (NCCL on GPU, gloo on CPU);
``FakeCollectives`` plays one rank of a simulated world in a single process (tests).
Every call here is a sync point between ranks: callers must make the same calls in the same order on
every rank, whatever their local data looked like.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist


class Collectives(Protocol):
    rank: int
    world_size: int

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        """In-place sum across ranks (enqueued on the device stream; no host sync)."""

    def all_gather_rows(self, tensor_NX: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's tensor (row counts may differ), in rank order, on every rank."""

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable object, in rank order."""


class LocalCollectives:
    """World of one: every collective is the identity."""

    rank = 0
    world_size = 1

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        return None

    def all_gather_rows(self, tensor_NX: torch.Tensor) -> list[torch.Tensor]:
        return [tensor_NX]

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]


class FakeCollectives:
    """Rank ``rank`` of a simulated world of ``world_size`` ranks, in one process (fairseq2's ``FakeGang`` idea).

    Every other rank mirrors this one (it holds the same tensor or object, as after an identical step) unless
    ``peers`` scripts it: ``peers[r][i]`` is what rank ``r`` adds to this process's ``i``-th
    ``all_reduce_sum_`` (``None``, or a list that ran out: it mirrors). "Rank 1 of 2 sees rank 0's bad vote"::

        FakeCollectives(rank=1, world_size=2, peers={0: [torch.tensor([0.0, 1.0])]})
    """

    def __init__(self, rank: int = 0, world_size: int = 1,
                 peers: Mapping[int, Sequence[torch.Tensor | None]] | None = None) -> None:
        peers = dict(peers or {})
        assert 0 <= rank < world_size, f"rank {rank} is not in a world of {world_size}"
        assert all(0 <= r < world_size and r != rank for r in peers), f"peers {sorted(peers)} are not other ranks"
        self.rank = rank
        self.world_size = world_size
        self.peers = peers
        self.num_all_reduces = 0

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        local = tensor.clone()
        for r in range(self.world_size):
            if r == self.rank:
                continue
            script = self.peers.get(r, ())
            given = script[self.num_all_reduces] if self.num_all_reduces < len(script) else None
            tensor.add_(local if given is None else given.to(tensor))
        self.num_all_reduces += 1

    def all_gather_rows(self, tensor_NX: torch.Tensor) -> list[torch.Tensor]:
        return [tensor_NX.clone() for _ in range(self.world_size)]

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj] * self.world_size


class TorchCollectives:
    """Collectives over the default process group."""

    def __init__(self) -> None:
        assert dist.is_available() and dist.is_initialized(), "torch.distributed is not initialised"
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def all_reduce_sum_(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)

    def all_gather_rows(self, tensor_NX: torch.Tensor) -> list[torch.Tensor]:
        # all_gather needs equal shapes: pad to the longest shard, then trim (shards differ by <= 1 row).
        counts = self.all_gather_object(int(tensor_NX.shape[0]))
        padded = torch.zeros((max(counts), *tensor_NX.shape[1:]), dtype=tensor_NX.dtype, device=tensor_NX.device)
        padded[: tensor_NX.shape[0]] = tensor_NX
        out = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(out, padded)
        return [t[:n] for t, n in zip(out, counts)]

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def default_collectives() -> Collectives:
    """TorchCollectives when a process group exists, else LocalCollectives."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchCollectives()
    return LocalCollectives()
