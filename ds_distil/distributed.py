"""Process-group set-up: the one module that discovers ranks and touches torch.distributed.

ds-distil runs under four launchers and one code path serves them all:

- the ``deepspeed`` launcher (local, pdsh/ssh, ``--no_ssh`` per node): it sets RANK,
  LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT itself;
- ``mpirun`` (Open MPI or MPICH): we map OMPI_COMM_WORLD_* / PMI_* ourselves rather than
  let DeepSpeed's mpi4py discovery do it, because that discovery takes the first address
  of ``hostname -I`` as master (not loopback) and derives local ranks from processor
  names, which two "hosts" on one machine share;
- ``srun`` with one task per rank: DeepSpeed reads no SLURM_* variable, so we map
  SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS and take the first host of the allocation;
- a plain ``python``/``ds-distil`` process: a world of one on 127.0.0.1.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from ds_distil.errors import UserError

REQUIRED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# Exit status of a rank that checkpointed because the job is about to end (EX_TEMPFAIL):
# the slurm/ scripts requeue the job on it, and the requeued job resumes.
EXIT_PREEMPTED = 75


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port that is free on loopback right now (for single-process runs and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """The first host name of a SLURM node list such as ``node[01-04],gpu7``."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                             capture_output=True, text=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # No scontrol on this node: expand the first entry by hand.
    first = nodelist.split(",")[0]
    if "[" in first:
        prefix, rest = first.split("[", 1)
        first = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return first


def slurm_node_addr(host: str) -> str:
    """The address SLURM reaches ``host`` at (its NodeAddr), or ``host`` itself.

    NodeAddr is what the other nodes can connect to; it differs from the node name on
    clusters with a separate management name, and on the loopback test cluster.
    """
    try:
        out = subprocess.run(["scontrol", "show", "node", host], check=True,
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return host
    for field in out.split():
        if field.startswith("NodeAddr="):
            return field[len("NodeAddr="):] or host
    return host


def discover_launcher_env(environ: dict | None = None) -> str:
    """Fill RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT from the launcher's variables.

    Returns the launcher's name. Variables already set are never overwritten.
    """
    env = os.environ if environ is None else environ
    if all(k in env for k in REQUIRED):
        return "env"

    def put(key: str, value) -> None:
        env.setdefault(key, str(value))

    if "OMPI_COMM_WORLD_RANK" in env:
        launcher = "openmpi"
        put("RANK", env["OMPI_COMM_WORLD_RANK"])
        put("WORLD_SIZE", env["OMPI_COMM_WORLD_SIZE"])
        put("LOCAL_RANK", env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"))
    elif "PMI_RANK" in env:
        launcher = "mpich"
        put("RANK", env["PMI_RANK"])
        put("WORLD_SIZE", env["PMI_SIZE"])
        put("LOCAL_RANK", env.get("MPI_LOCALRANKID", "0"))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        launcher = "srun"
        put("RANK", env["SLURM_PROCID"])
        put("WORLD_SIZE", env["SLURM_NTASKS"])
        put("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
        if "MASTER_ADDR" not in env and "SLURM_JOB_NODELIST" in env:
            put("MASTER_ADDR", slurm_node_addr(first_slurm_host(env["SLURM_JOB_NODELIST"])))
    else:
        launcher = "single"
        put("RANK", 0)
        put("WORLD_SIZE", 1)
        put("LOCAL_RANK", 0)
        put("MASTER_ADDR", "127.0.0.1")
        put("MASTER_PORT", free_port())

    missing = [k for k in REQUIRED if k not in env]
    if missing:
        raise UserError(f"launched by {launcher} but {', '.join(missing)} is not set: export "
                        "MASTER_ADDR (the first node's address) and MASTER_PORT (e.g. 29500) "
                        "to every rank (mpirun -x MASTER_ADDR -x MASTER_PORT)")
    return launcher


def setup_distributed(timeout_s: float = 600.0) -> DistInfo:
    """Discover ranks, then initialise torch.distributed through DeepSpeed's comm layer.

    ``timeout_s`` bounds every collective: a rank that died makes the others fail after
    this long instead of hanging forever.
    """
    import deepspeed
    import torch

    launcher = discover_launcher_env()
    deepspeed.init_distributed(auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_s),
                               verbose=False)
    info = DistInfo(rank=int(os.environ["RANK"]), local_rank=int(os.environ["LOCAL_RANK"]),
                    world_size=int(os.environ["WORLD_SIZE"]), launcher=launcher)
    actual = torch.distributed.get_world_size()
    if actual != info.world_size:
        raise RuntimeError(f"WORLD_SIZE={info.world_size} but the process group has {actual} ranks")
    release_shm_allreduce_buffer(info.rank, info.world_size)
    return info


def shm_allreduce_buffer(rank: int) -> Path:
    """The /dev/shm file of DeepSpeed's CPU shared-memory all-reduce for ``rank`` of this job."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
                               f"{os.environ.get('MASTER_PORT')}_{rank}")


def release_shm_allreduce_buffer(rank: int, world_size: int) -> None:
    """Unlink this rank's DeepSpeed shared-memory all-reduce buffer once every rank has mapped it.

    On CPU, DeepSpeed's comm layer gives each rank of a node a 69 MB /dev/shm file that the
    others map at initialisation, and never removes it: every run leaked ranks x 69 MB of
    RAM until reboot (a test suite or a sweep of runs filled /dev/shm). The mappings are all
    made inside ``init_distributed``, so after one barrier the names are no longer needed:
    unlinked now, the memory goes back when the processes exit, even when they are killed.
    """
    import torch

    own = shm_allreduce_buffer(rank)
    if world_size > 1:
        # The buffer exists on every rank or on none (DeepSpeed uses it only when all
        # ranks share a node), but the barrier must not depend on it: always take it on CPU.
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != "cpu":
            return
        torch.distributed.barrier()
    own.unlink(missing_ok=True)


def teardown_distributed() -> None:
    """Destroy the process group and let gloo's threads wind down.

    gloo's worker thread can race interpreter shutdown ("terminate called without an
    active exception", rc 134 on 10-20% of runs); destroying the group and pausing
    briefly before exit avoids it.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
        time.sleep(0.5)


def all_reduce_sum(tensor):
    """Sum ``tensor`` over all ranks in place (a no-op in a world of one); returns it."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class PreemptionSignal:
    """Turns SIGUSR1 (SLURM's warning before the time limit) into an agreed stop.

    The signal reaches ranks at different moments, possibly mid-step, so the handler only
    sets a flag; :meth:`requested` (call it at optimizer-step boundaries, on every rank)
    all-reduces the flags so that all ranks stop after the same step, save the
    checkpoint together and exit with :data:`EXIT_PREEMPTED`. Each call is a collective
    and a host sync: a few per minute are enough given SLURM's minutes of warning.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR1,)):
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "PreemptionSignal":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def requested(self) -> bool:
        """True on every rank once any rank has received the signal (a collective)."""
        import torch
        import torch.distributed as dist

        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.received is not None
        device = "cpu"
        if dist.get_backend() != "gloo":  # nccl & co. reduce device tensors only
            from deepspeed.accelerator import get_accelerator

            device = get_accelerator().current_device_name()
        flag = torch.tensor([0.0 if self.received is None else 1.0], device=device)
        all_reduce_sum(flag)
        return flag.item() > 0
