"""The process group: who am I, which device is mine, and the few collectives the loop needs.

torchrun (or srun + torchrun) sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
MASTER_PORT, and every process it starts joins the process group; a plain `python -m lstm_dist.train`
has none of them and is a world of one, with no process group at all. The backend is NCCL when this process drives a GPU, gloo otherwise. Every
collective here is a no-op in a world of one, so the training loop never branches on it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from lstm_dist.common.errors import EveryRankError, UserError, first_line
from lstm_dist.config import TrainConfig, choices

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group exists (launched by torchrun), whatever the world size."""
        return dist.is_available() and dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer; launch with torchrun, which sets it") from None


def read_env() -> tuple[int, int, int, int]:
    """(rank, world, local_rank, local_world) from torchrun's environment; (0, 1, 0, 1) without it."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank if world > 1 else 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if not (0 <= rank < world) or not (0 <= local_rank < local_world):
        raise UserError(f"inconsistent launch environment RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local_rank} "
                        f"LOCAL_WORLD_SIZE={local_world}; start workers with torchrun")
    return rank, world, local_rank, local_world


# The values of `train.device`, read from the config (the one place they are written); the command-line
# tools offer the same ones as `--device`.
DEVICES = choices("train.device")


def master_port() -> int:
    """MASTER_PORT as a port number, for a process group joined through MASTER_ADDR/MASTER_PORT.

    Raises UserError (naming the variable) when MASTER_ADDR or MASTER_PORT is unset, or MASTER_PORT is
    not a TCP port number.
    """
    addr, raw = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    missing = [name for name, value in (("MASTER_ADDR", addr), ("MASTER_PORT", raw)) if not value]
    if missing:
        raise UserError(f"a process group needs MASTER_ADDR and MASTER_PORT, but {' and '.join(missing)} "
                        f"{'is' if len(missing) == 1 else 'are'} not set; launch with torchrun (which sets both), "
                        f"set {' and '.join(missing)}, or unset MASTER_ADDR and WORLD_SIZE for a run in one process")
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise UserError(f"MASTER_PORT={raw!r} is not a TCP port number; set it to a free port from 1024 to 65535")
    return int(raw)


def listen_failure(exc: BaseException, port: int, what: str,
                   fix: str = "set MASTER_PORT to a free port") -> UserError | None:
    """The one-line error for a TCP store that could not listen on `port`, or None for any other error.

    `exc` is what torch raised creating the store (a DistNetworkError or RuntimeError whose message says
    `failed to listen` / `EADDRINUSE`); `what` names the store in the message (`the rendezvous`). A port in
    use is said as such; any other failure to listen (a port below 1024 without the right to it, ...)
    gives the first line of torch's message. Either way the line ends with `fix` (another MASTER_PORT).
    """
    text = str(exc)
    if "EADDRINUSE" in text or "ddress already in use" in text:
        return UserError(f"port {port} (MASTER_PORT) is in use on this node, by another job or program, so "
                         f"{what} cannot listen there; {fix}")
    if "failed to listen" in text or "failed to bind" in text:
        return UserError(f"{what} cannot listen on port {port} (MASTER_PORT): {first_line(exc)}; {fix}")
    return None


def gpu_index(local_rank: int, local_world: int, visible: int, assigned: bool) -> int:
    """The index, among the `visible` CUDA devices, of local rank `local_rank`'s GPU, for `local_world`
    processes on this node; `assigned` says whether CUDA_VISIBLE_DEVICES is set. Two layouts work:

    - every process sees the node's GPUs (torchrun's `--nproc_per_node`, `visible` >= `local_world`):
      GPU `local_rank`;
    - each process was given one GPU of its own (`visible` is 1 and CUDA_VISIBLE_DEVICES is set, as
      Slurm's `--gpus-per-task=1` or a per-process launcher sets it): GPU 0 whatever the local rank.

    Raises UserError for anything else: more processes than visible GPUs, or one GPU that every process
    sees (CUDA_VISIBLE_DEVICES unset), where the processes would not each get a GPU of their own.
    """
    if visible >= max(local_world, local_rank + 1):
        return local_rank
    if visible == 1 and assigned:
        return 0
    raise UserError(f"local rank {local_rank} of {local_world} processes on this node sees {visible} GPU(s), "
                    f"not one of its own; start at most {visible} process(es) per node (--nproc_per_node), or give "
                    "each process one GPU (CUDA_VISIBLE_DEVICES, Slurm's --gpus-per-task=1)")


def pick_device(preference: str, local_rank: int = 0, setting: str = "train.device=",
                local_world: int = 1) -> torch.device:
    """This process's device: the CPU, or its GPU among those visible (`gpu_index`; `auto`: CUDA when
    one is visible), for local rank `local_rank` of `local_world` processes on this node.

    `setting` names the option in the one-line error, as the user wrote it (`train.device=` for the
    trainer, `--device ` for the command-line tools). Raises UserError for an unknown preference,
    `cuda` where none is visible, or GPUs that do not go round (`gpu_index`).
    """
    if preference not in DEVICES:
        raise UserError(f"{setting}{preference} is not one of {', '.join(DEVICES)}")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"{setting}cuda but no CUDA GPU is visible; use {setting}auto or {setting}cpu")
    assigned = bool(os.environ.get("CUDA_VISIBLE_DEVICES", "").strip())
    return torch.device("cuda", gpu_index(local_rank, local_world, torch.cuda.device_count(), assigned))


def cpu_threads(requested: int, local_world: int) -> int:
    """Torch intra-op threads for one of `local_world` processes on this machine: `requested`, or
    with 0 this process's share of the cores it may run on."""
    return requested or max(1, len(os.sched_getaffinity(0)) // local_world)


@contextlib.contextmanager
def setup(device_preference: str = TrainConfig.device, timeout_minutes: float = TrainConfig.collective_timeout / 60,
          setting: str = "train.device=") -> Iterator[DistEnv]:
    """Join the process group (when launched by torchrun) and tear it down on every way out.

    `device_preference` is a value of `train.device` (see `pick_device`); `timeout_minutes` is how long a
    collective waits for the slowest rank, by default `train.collective_timeout`'s default.

    Outside torchrun, MASTER_ADDR in the environment also makes a process group (a world of one unless
    RANK/WORLD_SIZE say otherwise); then MASTER_PORT must be set, and a port another program holds is a
    UserError naming it (see `listen_failure`), never a traceback.
    """
    rank, world, local_rank, local_world = read_env()
    device = pick_device(device_preference, local_rank, setting, local_world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    started = False
    # Under torchrun (MASTER_ADDR is set) there is always a process group, a world of one included,
    # so that one-GPU runs take the same NCCL/DDP path as sixteen.
    launched = world > 1 or "MASTER_ADDR" in os.environ
    if launched and not dist.is_initialized():
        port = master_port()
        backend = "nccl" if device.type == "cuda" else "gloo"
        # rank and world as read above (RANK and WORLD_SIZE may be unset for a world of one).
        kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(minutes=timeout_minutes),
                                  "rank": rank, "world_size": world}
        if device.type == "cuda":
            kwargs["device_id"] = device  # binds NCCL to this GPU at once; no guessing in collectives
        try:
            dist.init_process_group(**kwargs)
        except dist.DistNetworkError as exc:
            # Rank 0 listens on MASTER_PORT unless torchrun shares its own store (its default). In a world
            # of one nobody waits for this process: one line. With more ranks torch's own error stands, so
            # that torchrun stops the ranks waiting to connect at once instead of after their timeout.
            failure = listen_failure(exc, port, "the process group's store") if world == 1 else None
            if failure is None:
                raise
            raise failure from None
        started = True
    try:
        yield DistEnv(rank, world, local_rank, local_world, device)
        if started:
            dist.barrier()  # a normal exit: leave together, so no rank tears down while another still talks
    finally:
        if started and dist.is_initialized():
            dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks, in place; returns it."""
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if _active():
        dist.barrier()


def gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's `obj` as a list on rank 0 (None elsewhere). Objects are pickled between our own processes."""
    if not _active():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, as a list indexed by rank, on every rank."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def placement() -> str:
    """Which host each rank runs on, as rank 0 tells it: 'node1: rank 0; node2: rank 1' ('' on other ranks)."""
    hosts = gather_objects(socket.gethostname())
    if hosts is None:
        return ""
    by_host: dict[str, list[list[int]]] = {}  # host -> runs of consecutive ranks [first, last]
    for rank, host in enumerate(hosts):
        runs = by_host.setdefault(host, [])
        if runs and runs[-1][1] == rank - 1:
            runs[-1][1] = rank
        else:
            runs.append([rank, rank])
    parts = []
    for host, runs in by_host.items():
        many = len(runs) > 1 or runs[0][0] != runs[0][1]
        spans = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
        parts.append(f"{host}: rank{'s' if many else ''} {spans}")
    return "; ".join(parts)


def on_every_rank(fn: Callable[[], T]) -> T:
    """Run `fn` (no collectives inside) on every rank; if any rank met a user error, every rank raises
    it together as an EveryRankError (the lowest rank's message), so that no rank waits for one that left."""
    result, error = None, None
    try:
        result = fn()
    except UserError as exc:
        error = str(exc)
    first = next((e for e in all_objects(error) if e is not None), None)
    if first is not None:
        raise EveryRankError(first)
    return result  # type: ignore[return-value]
