"""Data-parallel calibration: which process this is, and the few collectives calibration needs.

Several processes (`torchrun --nproc_per_node N`, `accelerate launch --multi_gpu --num_processes N`)
each calibrate on a share of the data and end with the same quantized model as one process:

* work is split in whole batches, interleaved: batch b of a run belongs to rank b % N, so a batch has
  the same rows (and the same forward pass) whatever N is;
* results come back in global batch order (`DataShard.gather`), and sums whose rounding depends on
  their order are folded in that order (`World.fold`), so they are bit-identical to one process;
* every collective waits at most `timeout_s` (`FAIR_DIST_TIMEOUT`, seconds, default 1800): if a rank
  dies or hangs, the others raise `DistributedError` naming the step instead of hanging.

`torch.distributed` is used when it is initialised (accelerate's `PartialState()` and `torchrun`
scripts usually do); `get_world()` initialises it from the launcher's environment (`WORLD_SIZE` > 1)
otherwise, with gloo on CPU and nccl on CUDA. One process needs none of it: `World()` is rank 0 of 1
and every collective is the identity.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

TIMEOUT_ENV = "FAIR_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0

__all__ = [
    "DataShard",
    "DistributedError",
    "World",
    "batch_seed",
    "get_world",
    "is_main_process",
    "rank",
    "shard_batches",
]


class DistributedError(RuntimeError):
    """A collective failed or timed out: another rank died, hung or disagrees."""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def env_timeout_s() -> float:
    """`FAIR_DIST_TIMEOUT` in seconds, else 1800."""
    value = os.environ.get(TIMEOUT_ENV)
    return DEFAULT_TIMEOUT_S if value in (None, "") else float(value)


def rank() -> int:
    """This process's rank: from torch.distributed when initialised, else the launcher's `RANK`, else 0."""
    return dist.get_rank() if _initialised() else _env_int("RANK", 0)


def is_main_process() -> bool:
    """True on rank 0 (and in a plain single process): the one process that writes files and pushes.

    Reads the launcher's environment without initialising anything, so export/pipeline code may call it
    at any time.
    """
    return rank() == 0


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world(timeout_s: float | None = None) -> World:
    """The current world; initialises torch.distributed from the environment if WORLD_SIZE > 1 and needed.

    timeout_s: how long any collective may wait (default `FAIR_DIST_TIMEOUT`, else 1800 s); also the
    rendezvous timeout when this call initialises the process group.
    """
    timeout_s = env_timeout_s() if timeout_s is None else float(timeout_s)
    if not _initialised() and _env_int("WORLD_SIZE", 1) > 1:
        _init_from_env(timeout_s)
    if not _initialised():
        return World(0, 1, timeout_s)
    return World(dist.get_rank(), dist.get_world_size(), timeout_s)


def _init_from_env(timeout_s: float) -> None:
    """init_process_group from RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (torchrun's variables)."""
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: "
                               "launch with torchrun or accelerate launch")
    backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
    logger.info("initialising torch.distributed (%s), rank %s of %s", backend, os.environ["RANK"],
                os.environ["WORLD_SIZE"])
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    except Exception as err:  # rendezvous timed out or the store died
        raise DistributedError(f"rank {os.environ['RANK']}: process group rendezvous failed within "
                               f"{timeout_s:g} s ({err})") from err


def shard_batches(n: int, batch_size: int, rank: int, size: int) -> list[tuple[int, int]]:
    """(start, stop) row ranges of the batches of `batch_size` over n rows that belong to `rank`.

    Batch b (rows b*batch_size .. min((b+1)*batch_size, n)) belongs to rank b % size.
    """
    if batch_size < 1 or size < 1 or not 0 <= rank < size:
        raise ValueError(f"bad sharding: batch_size={batch_size}, rank={rank}, size={size}")
    starts = range(rank * batch_size, n, size * batch_size)
    return [(s, min(s + batch_size, n)) for s in starts]


def batch_seed(seed: int, stage: str, index: int) -> int:
    """A 63-bit seed for batch `index` of `stage` that does not depend on which rank runs the batch."""
    digest = hashlib.sha256(f"{seed}:{stage}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class World:
    """Rank and size of the process group; collectives that wait at most `timeout_s` and name their step."""

    rank: int = 0
    size: int = 1
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _run(self, what: str, op: Callable[[], object]) -> None:
        """Launch an async collective and wait for it, turning failures into a DistributedError."""
        try:
            work = op()
            if work is not None:
                work.wait(timeout=timedelta(seconds=self.timeout_s))
        except DistributedError:
            raise
        except RuntimeError as err:
            raise DistributedError(
                f"rank {self.rank} of {self.size}: {what} failed or timed out after at most "
                f"{self.timeout_s:g} s; another rank probably died or hung (see its log). Cause: {err}"
            ) from err

    def _comm(self, t: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of t on a device the backend can reduce (CUDA for nccl, else CPU)."""
        backend = dist.get_backend()
        if backend == "nccl" and t.device.type != "cuda":
            return t.to(torch.device("cuda", torch.cuda.current_device())).contiguous()
        if backend in ("gloo", "mpi") and t.device.type != "cpu":
            return t.cpu().contiguous()
        return t.clone().contiguous()

    def all_reduce_sum(self, t: torch.Tensor, what: str = "all_reduce") -> torch.Tensor:
        """Sum of t over ranks (a new tensor on t's device); the summation order is the backend's."""
        return self._all_reduce(t, dist.ReduceOp.SUM, what)

    def all_reduce_max(self, t: torch.Tensor, what: str = "all_reduce_max") -> torch.Tensor:
        """Elementwise max of t over ranks: exact, so bit-identical to one process."""
        return self._all_reduce(t, dist.ReduceOp.MAX, what)

    def _all_reduce(self, t: torch.Tensor, op, what: str) -> torch.Tensor:
        if self.size == 1:
            return t.clone()
        buf = self._comm(t)
        self._run(what, lambda: dist.all_reduce(buf, op=op, async_op=True))
        return buf.to(t.device)

    def all_gather(self, t: torch.Tensor, what: str = "all_gather") -> list[torch.Tensor]:
        """[t of rank 0, t of rank 1, ...]; every rank passes the same shape and dtype."""
        if self.size == 1:
            return [t]
        buf = self._comm(t)
        out = [torch.empty_like(buf) for _ in range(self.size)]
        self._run(what, lambda: dist.all_gather(out, buf, async_op=True))
        return [o.to(t.device) for o in out]

    def gather_rows(self, t: torch.Tensor, what: str = "gather_rows") -> list[torch.Tensor]:
        """[t of rank 0, t of rank 1, ...] where the ranks' tensors may differ in their first dim only."""
        if self.size == 1:
            return [t]
        rows = torch.tensor([t.shape[0]], dtype=torch.int64)
        counts = [int(c) for c in self.all_gather(rows, what + " (row counts)")]
        padded = t.new_zeros((max(counts), *t.shape[1:]))  # (max rows, ...)
        padded[: t.shape[0]] = t
        return [g[:c] for g, c in zip(self.all_gather(padded, what), counts, strict=True)]

    def fold(self, acc: torch.Tensor | None, part: torch.Tensor, present: bool = True,
             what: str = "fold") -> torch.Tensor | None:
        """acc + part_0 + part_1 + ... added left to right in rank order, skipping ranks with present=False.

        `acc` (None to start) is updated in place and returned; its dtype is kept (float32 parts fold exactly
        into a float64 acc).

        Every rank passes a `part` of the same shape and dtype (zeros where it has nothing). With batch b on
        rank b % size, calling this once per round of batches adds the batches in global order, so a float
        sum is bit-identical to one process adding them one by one.
        """
        parts, flags = [part], [present]
        if self.size > 1:
            flag = torch.tensor([int(present)], dtype=torch.int64)
            flags = [bool(f) for f in self.all_gather(flag, what + " (presence)")]
            if not any(flags):
                return acc
            parts = self.all_gather(part, what)
        for p, f in zip(parts, flags, strict=True):
            if f:
                acc = p.clone() if acc is None else acc.add_(p)  # acc is this fold's own: updated in place
        return acc

    def barrier(self, what: str = "barrier") -> None:
        """Wait until every rank arrives (at most timeout_s); gloo names the ranks that did not."""
        if self.size == 1:
            return
        timeout = timedelta(seconds=self.timeout_s)
        if dist.get_backend() == "gloo":
            self._run(what, lambda: dist.monitored_barrier(timeout=timeout, wait_all_ranks=True))
        else:
            self._run(what, lambda: dist.barrier(async_op=True))

    def check_identical(self, values: torch.Tensor, what: str) -> None:
        """Raise DistributedError unless every rank holds the same `values` (e.g. checksums)."""
        if self.size == 1:
            return
        gathered = self.all_gather(values.detach().reshape(-1).to(torch.int64), what)
        differ = [r for r, g in enumerate(gathered) if not torch.equal(g, gathered[0])]
        if differ:
            raise DistributedError(f"rank {self.rank} of {self.size}: {what} differs between rank 0 and "
                                   f"rank(s) {differ}; the processes did not compute the same model")

    def check_settings(self, settings: dict[str, int], what: str) -> None:
        """Raise DistributedError naming each setting (int values) that differs between ranks."""
        if self.size == 1:
            return
        values = torch.tensor(list(settings.values()), dtype=torch.int64)
        gathered = self.all_gather(values, what)
        differ = [f"{name} ({', '.join(f'rank {r}: {int(g[i])}' for r, g in enumerate(gathered))})"
                  for i, name in enumerate(settings) if any(int(g[i]) != int(gathered[0][i]) for g in gathered)]
        if differ:
            raise DistributedError(f"rank {self.rank} of {self.size}: {what} differ between the processes: "
                                   f"{'; '.join(differ)}. Launch every process with the same config and text")

    def agree(self, flag: bool, what: str) -> bool:
        """`flag`, after checking that every rank has the same one."""
        self.check_identical(torch.tensor([int(flag)]), what)
        return flag


@dataclass(frozen=True)
class DataShard:
    """This rank's share of n samples cut into batches of `batch_size` (batch b on rank b % world.size)."""

    world: World
    num_samples: int
    batch_size: int

    @property
    def batches(self) -> list[tuple[int, int]]:
        return shard_batches(self.num_samples, self.batch_size, self.world.rank, self.world.size)

    @property
    def sample_ids(self) -> torch.Tensor:
        """Global index of each local row, (n_local,) int64."""
        ranges = [torch.arange(a, b) for a, b in self.batches]
        return torch.cat(ranges) if ranges else torch.zeros(0, dtype=torch.int64)

    @property
    def rounds(self) -> int:
        """Rounds of one batch per rank: ceil(batches / size)."""
        n_batches = -(-self.num_samples // self.batch_size)
        return -(-n_batches // self.world.size)

    def gather(self, local: torch.Tensor, dim: int = 0, what: str = "gather") -> torch.Tensor:
        """Every rank's rows (along `dim`) put back in global sample order: (..., num_samples, ...)."""
        moved = local.movedim(dim, 0)  # (n_local, ...)
        if moved.shape[0] != len(self.sample_ids):
            raise ValueError(f"{what}: {moved.shape[0]} local rows, this rank owns {len(self.sample_ids)}")
        out = moved.new_empty((self.num_samples, *moved.shape[1:]))
        for r, part in enumerate(self.world.gather_rows(moved, what)):
            ids = DataShard(World(r, self.world.size), self.num_samples, self.batch_size).sample_ids
            out[ids.to(out.device)] = part
        return out.movedim(0, dim)
