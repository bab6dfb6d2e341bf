"""torch.distributed for ``torchrun -m cka_geo compare|finetune``: the one place that touches it.

A run is distributed when the launcher's environment says so (``WORLD_SIZE`` > 1, with
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, as ``torchrun`` and
``srun`` + ``torchrun`` set them). A one-process run (no ``WORLD_SIZE``, or 1) never
imports or initialises :mod:`torch.distributed`, and every helper here is then the identity.

The process group is initialised once (:func:`init`): NCCL when the run's device is CUDA
(each rank on ``cuda:LOCAL_RANK``), gloo on the CPU, with a timeout
(``CKA_GEO_DIST_TIMEOUT`` seconds, default 600) after which a collective that a dead rank
never joins fails instead of waiting for ever. :func:`shutdown` destroys it (the CLI calls
it on exit).

Errors: a rank that fails raises its one-line error as in one process; the ranks that
meet it in :func:`gather` raise :class:`PeerFailed`, which the CLI exits with silently
(same exit code), so a failing job prints its line once. A rank that dies outside a
:func:`gather` is noticed by the launcher, which stops the others.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch

from cka_geo.errors import CkaGeoError, UsageError

#: Seconds a collective waits for the other ranks before failing (``CKA_GEO_DIST_TIMEOUT``).
DEFAULT_TIMEOUT_S = 600
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class PeerFailed(CkaGeoError):
    """Another rank failed; it printed the error (this rank exits with its code, silently)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Env:
    """What the launcher set: this process's rank, the number of ranks and the rank on this node."""

    rank: int
    world: int
    local_rank: int


_state: dict[str, Any] = {"env": None, "backend": None}


def launcher_env() -> Env | None:
    """The launcher's environment, or None for a one-process run (``WORLD_SIZE`` unset or 1).

    Raises:
        UsageError: ``WORLD_SIZE`` > 1 with a missing or malformed ``RANK``,
            ``LOCAL_RANK``, ``MASTER_ADDR`` or ``MASTER_PORT``.
    """
    world_text = os.environ.get("WORLD_SIZE", "").strip()
    if not world_text:
        return None
    values: dict[str, int] = {}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT"):
        text = os.environ.get(key, "").strip()
        if not text:
            if values.get("WORLD_SIZE", 2) == 1:
                return None
            raise UsageError(f"torch.distributed: WORLD_SIZE={world_text} but {key} is not set; launch with torchrun")
        try:
            values[key] = int(text)
        except ValueError:
            raise UsageError(f"torch.distributed: {key}={text!r} is not an integer") from None
    world, rank, local = values["WORLD_SIZE"], values["RANK"], values["LOCAL_RANK"]
    if world < 1:
        raise UsageError(f"torch.distributed: WORLD_SIZE={world} must be at least 1")
    if world == 1:
        return None
    if not 0 <= rank < world:
        raise UsageError(f"torch.distributed: RANK={rank} is not in [0, WORLD_SIZE={world})")
    if local < 0 or local > rank:
        raise UsageError(f"torch.distributed: LOCAL_RANK={local} is not in [0, RANK={rank}]")
    if not os.environ.get("MASTER_ADDR", "").strip():
        raise UsageError(f"torch.distributed: WORLD_SIZE={world} but MASTER_ADDR is not set; launch with torchrun")
    return Env(rank, world, local)


def active() -> bool:
    """Whether this process is one rank of an initialised multi-process run."""
    return _state["env"] is not None


def rank() -> int:
    """This process's rank (0 in a one-process run)."""
    env = _state["env"]
    return 0 if env is None else int(env.rank)


def world() -> int:
    """The number of ranks (1 in a one-process run)."""
    env = _state["env"]
    return 1 if env is None else int(env.world)


def is_main() -> bool:
    """Whether this process writes outputs and prints: rank 0, or a one-process run."""
    return rank() == 0


def say_once(line: str) -> bool:
    """Whether this process should print ``line``: False when another rank of the same
    ``torchrun`` job on this node printed the same line (every rank failing alike prints once).

    Always True outside torchrun. Needs no process group (it may be called before one exists
    or after a collective failed): the first rank to create a marker file named by the job
    (``TORCHELASTIC_RUN_ID``) and the line wins.
    """
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "").strip()
    if not run_id or not os.environ.get("WORLD_SIZE", "").strip() or os.environ["WORLD_SIZE"].strip() == "1":
        return True
    import hashlib
    import tempfile

    base = os.path.join(tempfile.gettempdir(), f"cka-geo-locks-{os.getuid()}")
    key = hashlib.sha256(f"{run_id}\0{os.environ.get('MASTER_PORT', '')}\0{line}".encode()).hexdigest()[:32]
    try:
        os.makedirs(base, mode=0o700, exist_ok=True)
        os.close(os.open(os.path.join(base, f"said-{key}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    except OSError:
        return True
    return True


def _timeout() -> datetime.timedelta:
    text = os.environ.get("CKA_GEO_DIST_TIMEOUT", "").strip()
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UsageError(f"CKA_GEO_DIST_TIMEOUT={text!r} is not a number of seconds") from None
    if not seconds > 0:
        raise UsageError(f"CKA_GEO_DIST_TIMEOUT={text!r} must be positive")
    return datetime.timedelta(seconds=seconds)


def init(device: torch.device | str) -> torch.device:
    """Join the launcher's process group (once) and return the device this rank uses.

    Args:
        device: The run's resolved device. CUDA without an index becomes
            ``cuda:LOCAL_RANK`` (an explicit ``cuda:N`` is kept); the backend is NCCL on
            CUDA, gloo on the CPU.

    Returns:
        ``device`` as this rank uses it; unchanged in a one-process run.

    Raises:
        UsageError: A bad launcher environment, or CUDA with fewer GPUs than local ranks.
    """
    dev = torch.device(device)
    env = launcher_env()
    if env is None:
        return dev
    if dev.type == "cuda" and dev.index is None:
        count = torch.cuda.device_count()
        if env.local_rank >= count:
            raise UsageError(f"torch.distributed: LOCAL_RANK={env.local_rank} but this node has {count} GPUs; "
                             "start at most one process per GPU (--nproc-per-node)")
        dev = torch.device("cuda", env.local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if _state["env"] is None:
        import torch.distributed as dist

        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, timeout=_timeout())
        _state["env"], _state["backend"] = env, backend
    elif _state["backend"] != backend:
        raise UsageError(f"torch.distributed: the process group uses {_state['backend']}, this run's device needs {backend}")
    return dev


def shutdown() -> None:
    """Leave the process group (after a last barrier when all went well); idempotent."""
    if _state["env"] is None:
        return
    import torch.distributed as dist

    _state["env"] = None
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (nothing in a one-process run)."""
    if active():
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of ``t`` (float64 kept), in place; ``t`` itself in a one-process run.

    The reduction order is the backend's: use :func:`gather` where bit-exact sums matter.
    """
    if active():
        import torch.distributed as dist

        if _state["backend"] == "nccl" and t.device.type != "cuda":
            moved = t.to(f"cuda:{torch.cuda.current_device()}")
            dist.all_reduce(moved)
            t.copy_(moved.to(t.device))
        else:
            dist.all_reduce(t)
    return t


def gather(payload: Any, error: BaseException | None = None) -> list[Any]:
    """Every rank's ``payload`` (pickled, on every rank, in rank order), or the first error.

    Each rank calls it exactly once per exchange, also after failing (with ``error``), so
    a failure travels instead of leaving the others waiting.

    Args:
        payload: What this rank contributes (CPU tensors, numbers, lists...).
        error: This rank's failure, or None.

    Returns:
        ``[payload of rank 0, payload of rank 1, ...]``; ``[payload]`` in one process.

    Raises:
        BaseException: ``error`` itself on the rank that failed.
        PeerFailed: On the other ranks, naming the failed rank and its message.
    """
    if not active():
        if error is not None:
            raise error
        return [payload]
    import torch.distributed as dist

    if error is not None:
        code = getattr(error, "exit_code", 1)
        sent: Any = ("error", f"{type(error).__name__}: {error}", code if isinstance(code, int) else 1)
    else:
        sent = ("ok", payload, 0)
    got: list[Any] = [None] * world()
    dist.all_gather_object(got, sent)
    if error is not None:
        raise error
    for r, (status, body, code) in enumerate(got):
        if status == "error":
            raise PeerFailed(f"rank {r} failed: {body}", exit_code=code)
    return [body for _status, body, _code in got]


__all__ = [
    "DEFAULT_TIMEOUT_S",
    "Env",
    "PeerFailed",
    "active",
    "all_reduce_sum",
    "barrier",
    "gather",
    "init",
    "is_main",
    "launcher_env",
    "rank",
    "say_once",
    "shutdown",
    "world",
]
