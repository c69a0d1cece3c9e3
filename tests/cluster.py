"""Real launchers on loopback for the multi-process and cluster tests.

Everything here starts real programs: a private sshd for DeepSpeed's pdsh runner, Open
MPI's mpirun, and a SLURM cluster (munged, slurmctld and two slurmd "nodes" n1, n2 on
this machine). Daemons run in the foreground as our children, are stopped by pid at
the end of the session and keep all their state under temporary directories; every wait
is bounded. Facts behind the choices: /work/shared/CLUSTER.md.

Test modules import the fixtures they use::

    from cluster import deepspeed_ops, slurm_cluster, ssh_loopback  # noqa: F401 (fixtures)

and run a command (the probe today, ``ds-distil train`` later) with:

- :func:`run_deepspeed_pdsh` -- ``deepspeed --hostfile`` over ssh to two host aliases;
- :func:`run_mpirun` -- ``mpirun -np N`` (Open MPI or MPICH);
- :meth:`SlurmCluster.sbatch` + :meth:`SlurmCluster.wait_job` -- the scripts in slurm/,
  with ``DS_DISTIL_CMD`` naming the command each rank runs (or ``--wrap`` for a bare
  srun); :meth:`SlurmCluster.start_requeued_now` restarts a requeued job at once.

Every rank gets :func:`child_env` (plus what the test adds): the environment the
``deepspeed_ops`` fixture warmed DeepSpeed's JIT op with.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from ds_distil.distributed import free_port
from ds_distil.hostfile import write_deepspeed_env, write_hostfile

REPO_ROOT = Path(__file__).resolve().parent.parent
PROBE = REPO_ROOT / "tests" / "dist_probe.py"
SLURM_SCRIPTS = REPO_ROOT / "slurm"
CPU_DS_CONFIG = REPO_ROOT / "ds_configs" / "cpu_bf16.json"
# The interpreter running the tests: its bin/ holds deepspeed, ds-distil and ninja.
VENV_BIN = Path(os.path.abspath(sys.executable)).parent  # not resolve(): a venv python is a symlink
SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")

# Variables of an enclosing launcher or job that must not leak into the ranks we start
# (pytest itself may run inside a SLURM job or under mpirun on a real cluster).
_LAUNCHER_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "OMPI_", "PMI_", "PMIX_", "DS_DISTIL_")
_RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK",
              "CROSS_SIZE", "LOCAL_SIZE", "DS_ENV_FILE")
# Variables the pdsh runner must carry to the ranks (it forwards nothing else by default).
FORWARD_TO_RANKS = ("PATH", "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "GLOO_SOCKET_IFNAME",
                    "OMP_NUM_THREADS", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


# ---------------------------------------------------------------------------- basics

def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def find_tool(name: str) -> str | None:
    """``name`` on PATH or in the sbin directories (daemons live there; PATH may omit them)."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def require_tools(*names: str) -> dict[str, str]:
    """Paths of the tools a test needs. Missing ones fail in CI (CI=true) and skip elsewhere:
    `make test` installs them (Makefile APT_PACKAGES), so in CI a missing one is a bug."""
    found = {name: find_tool(name) for name in names}
    missing = sorted(name for name, path in found.items() if path is None)
    if missing:
        message = f"not installed: {', '.join(missing)} (make system-deps installs them)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return found


def torch_extensions_dir() -> str | None:
    """Where the ranks' DeepSpeed JIT ops are cached: $TORCH_EXTENSIONS_DIR, else the venv's.

    The shared default (~/.cache/torch_extensions/py311_cpu) is also used by every other
    checkout and venv of this user; ninja rebuilds an op whenever its compile command
    changes, and that command names the venv's source path, so two venvs rebuild each
    other's op back and forth (about a minute each time on two cores).
    """
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    if sys.prefix != sys.base_prefix:
        return str(Path(sys.prefix) / "torch_extensions")
    return None


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every launcher and rank the tests start.

    Same PATH (venv first: its ninja and python) and TORCH_EXTENSIONS_DIR (see
    :func:`torch_extensions_dir`) everywhere, so no rank rebuilds a JIT op; CPU
    accelerator; gloo on loopback; one thread per rank (two cores are shared by all ranks).
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(_LAUNCHER_PREFIXES) and k not in _RANK_VARS}
    env.update({
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
        "DS_ACCELERATOR": "cpu",
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    })
    extensions = torch_extensions_dir()
    if extensions:
        env["TORCH_EXTENSIONS_DIR"] = extensions
    env.update(extra or {})
    return env


def probe_command(*args: str) -> list[str]:
    """The probe as a rank command: ``python tests/dist_probe.py ARGS``."""
    return [str(VENV_BIN / "python"), str(PROBE), *args]


def wait_for(check: Callable[[], object], timeout: float, what: str, interval: float = 0.2,
             details: Callable[[], str] = lambda: ""):
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{details()}")
        time.sleep(interval)


@dataclass
class Finished:
    """A command that ran to its end (or was killed at its time limit)."""

    cmd: list[str]
    returncode: int
    output: str

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.output.splitlines()[-n:])


def run_bounded(cmd: list[str], *, env: dict[str, str], timeout: float, cwd: Path | None = None) -> Finished:
    """Run ``cmd`` in its own session; at ``timeout`` SIGKILL the whole session.

    SIGKILL and never SIGINT/SIGTERM: DeepSpeed's pdsh-mode runner answers those by
    running ``pkill -f <its command>`` on every host, here this machine.
    """
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return Finished(cmd, proc.returncode, out)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{shlex.join(cmd)} did not finish within {timeout:.0f} s; output:\n{out[-6000:]}")


def read_probe(out_dir: Path) -> list[dict]:
    """The records the probe ranks appended to ``out_dir/ranks.jsonl`` (empty if none yet)."""
    import json

    path = Path(out_dir) / "ranks.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def kill_probe_ranks(out_dir: Path) -> None:
    """SIGKILL probe ranks that outlived a failed test (ranks started over ssh are not in
    the launcher's session). Only pids the probe recorded, and only if still the probe."""
    for record in read_probe(out_dir):
        pid = record.get("pid")
        try:
            if pid and "dist_probe" in Path(f"/proc/{pid}/cmdline").read_text():
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass


def alive(pid: int) -> bool:
    """True unless ``pid`` is gone or a zombie (``kill -0`` succeeds on zombies)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM a daemon we started, then SIGKILL if it does not go; reaps it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 20.0) -> None:
    def listening() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode} while starting")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0
    wait_for(listening, timeout, f"{what} to listen on 127.0.0.1:{port}")


# ---------------------------------------------------------- shared session objects

_SHARED: dict[str, object] = {}


def _shared(request, name: str, start: Callable[[], object], stop: Callable[[object], None]):
    """One object per test session even if several modules import the fixture."""
    if name not in _SHARED:
        obj = start()
        _SHARED[name] = obj

        def finish() -> None:
            stop(_SHARED.pop(name))
        request.addfinalizer(finish)
    return _SHARED[name]


def warm_deepspeed_ops(env: dict[str, str], timeout: float = 600) -> None:
    """Compile (or load from the cache) DeepSpeed's CPU shared-memory comm op once.

    Every CPU rank loads it in init_distributed; compiling takes ~35 s on two cores, and
    ranks compiling concurrently would serialise on torch's build lock and could hit
    the launch timeouts.
    """
    code = ("from deepspeed.comm.torch import build_shm_op\n"
            "assert build_shm_op() is not None, 'deepspeed_shm_comm is not compatible'\n")
    done = run_bounded([str(VENV_BIN / "python"), "-c", code], env=env, timeout=timeout)
    assert done.returncode == 0, f"building DeepSpeed's shm comm op failed:\n{done.tail()}"


@pytest.fixture(scope="session")
def deepspeed_ops(request) -> dict[str, str]:
    """DeepSpeed's JIT op is built; returns the environment to give every rank."""
    def start() -> dict[str, str]:
        env = child_env()
        warm_deepspeed_ops(env)
        return env
    return dict(_shared(request, "deepspeed_ops", start, lambda env: None))


# ------------------------------------------------------------------------------ ssh

@dataclass
class SshLoopback:
    """A private sshd on 127.0.0.1 and an ``ssh`` that reaches it under any host name.

    Nothing outside ``root`` changes (no ~/.ssh edits): an ``ssh`` wrapper first on PATH
    adds ``-F root/ssh_config``, which sends every host alias (``node-a``, ``node-b``)
    to 127.0.0.1 on our port with our key and known_hosts. pdsh and DeepSpeed's ssh
    check both find that wrapper on PATH.
    """

    root: Path
    port: int
    proc: subprocess.Popen
    bin_dir: Path

    @classmethod
    def start(cls, root: Path) -> "SshLoopback":
        tools = require_tools("sshd", "ssh", "ssh-keygen", "pdsh")
        root.mkdir(parents=True, exist_ok=True)
        for key in ("host_key", "id_key"):
            subprocess.run([tools["ssh-keygen"], "-q", "-t", "ed25519", "-N", "", "-f", str(root / key)],
                           check=True, timeout=30)
        (root / "authorized_keys").write_text((root / "id_key.pub").read_text())
        port = free_port()
        (root / "sshd_config").write_text("\n".join([
            f"ListenAddress 127.0.0.1:{port}", f"HostKey {root / 'host_key'}",
            f"PidFile {root / 'sshd.pid'}", f"AuthorizedKeysFile {root / 'authorized_keys'}",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "PrintMotd no",
            "MaxStartups 50", ""]))
        (root / "known_hosts").write_text(f"ds-distil-loopback {(root / 'host_key.pub').read_text()}")
        (root / "ssh_config").write_text("\n".join([
            "Host *", "  HostName 127.0.0.1", f"  Port {port}", "  User root",
            f"  IdentityFile {root / 'id_key'}", "  IdentitiesOnly yes",
            f"  UserKnownHostsFile {root / 'known_hosts'}", "  HostKeyAlias ds-distil-loopback",
            "  StrictHostKeyChecking yes", "  BatchMode yes", ""]))
        bin_dir = root / "bin"
        bin_dir.mkdir(exist_ok=True)
        wrapper = bin_dir / "ssh"
        wrapper.write_text(f"#!/bin/sh\nexec {tools['ssh']} -F {root / 'ssh_config'} \"$@\"\n")
        wrapper.chmod(0o755)
        # sshd refuses to start without its privilege-separation directory.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        with open(root / "sshd.log", "w") as log:
            proc = subprocess.Popen([tools["sshd"], "-D", "-e", "-f", str(root / "sshd_config")],
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        ssh = cls(root, port, proc, bin_dir)
        wait_port(port, proc, "sshd")
        check = run_bounded([str(wrapper), "node-a", "true"], env=ssh.env(child_env()), timeout=30)
        if check.returncode != 0:
            ssh.stop()
            pytest.fail(f"ssh to the private sshd failed: {check.tail()}\n{(root / 'sshd.log').read_text()}")
        return ssh

    def env(self, base: dict[str, str]) -> dict[str, str]:
        return {**base, "PATH": f"{self.bin_dir}{os.pathsep}{base['PATH']}"}

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture(scope="session")
def ssh_loopback(request, tmp_path_factory) -> SshLoopback:
    return _shared(request, "ssh", lambda: SshLoopback.start(tmp_path_factory.mktemp("sshd")),
                   lambda ssh: ssh.stop())


def run_deepspeed_pdsh(ssh: SshLoopback, rank_cmd: list[str], work_dir: Path, *,
                       env: dict[str, str], hosts: dict[str, int] | None = None,
                       deepspeed_args: tuple[str, ...] = (), timeout: float = 180) -> Finished:
    """``deepspeed --hostfile`` through the default pdsh runner, over ssh to host aliases.

    ``rank_cmd`` is a python script and its arguments (the launcher runs it with its own
    python and adds ``--local_rank``), or pass ``deepspeed_args=("--no_python",
    "--no_local_rank")`` and a full command such as ``["ds-distil", "train", ...]``.
    Only variables listed in FORWARD_TO_RANKS (plus DS_DISTIL_PROBE_TAG*) reach the
    ranks, through a .deepspeed_env named by DS_ENV_FILE.
    """
    hosts = hosts or {"node-a": 1, "node-b": 1}
    work_dir.mkdir(parents=True, exist_ok=True)
    hostfile = work_dir / "hostfile"
    write_hostfile(hosts, hostfile)
    env = ssh.env(env)
    names = FORWARD_TO_RANKS + tuple(k for k in env if k.startswith("DS_DISTIL_PROBE_TAG"))
    env_file = work_dir / "deepspeed_env"
    write_deepspeed_env(env_file, names, env)
    env["DS_ENV_FILE"] = str(env_file)
    cmd = [str(VENV_BIN / "deepspeed"), "--hostfile", str(hostfile), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "--ssh_port", str(ssh.port), *deepspeed_args, *rank_cmd]
    return run_bounded(cmd, env=env, timeout=timeout, cwd=work_dir)


def run_mpirun(nprocs: int, rank_cmd: list[str], *, env: dict[str, str], flavour: str = "openmpi",
               timeout: float = 120) -> Finished:
    """``mpirun -np N`` on loopback, Open MPI (``flavour="openmpi"``) or MPICH (``"mpich"``).

    Ranks find RANK etc. in OMPI_COMM_WORLD_* or PMI_*; MASTER_ADDR/PORT are exported
    explicitly (DeepSpeed's own MPI discovery would pick a non-loopback address).
    """
    tool = {"openmpi": "mpirun.openmpi", "mpich": "mpirun.mpich"}[flavour]
    mpirun = require_tools(tool)[tool]
    env = {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    names = [name for name in ("MASTER_ADDR", "MASTER_PORT", *FORWARD_TO_RANKS) if name in env]
    if flavour == "openmpi":
        # --noprefix: mpirun called by its absolute path acts as if given --prefix /usr and
        # puts /usr/bin first on the ranks' PATH; its ninja then differs from the venv's
        # and every rank would rebuild DeepSpeed's JIT op.
        cmd = [mpirun, "--noprefix", "--allow-run-as-root", "--oversubscribe", "-np", str(nprocs),
               "--mca", "btl", "self,tcp", "--mca", "btl_tcp_if_include", "lo",
               "--mca", "oob_tcp_if_include", "lo", *[a for n in names for a in ("-x", n)]]
    else:
        cmd = [mpirun, "-np", str(nprocs), "-iface", "lo", "-genvlist", ",".join(names)]
    return run_bounded([*cmd, *rank_cmd], env=env, timeout=timeout)


# ---------------------------------------------------------------------------- SLURM

@dataclass
class SlurmCluster:
    """munged + slurmctld + one slurmd per fake node, all on 127.0.0.1.

    Each node advertises ``cpus`` CPUs and ``gpus`` GPUs (GRES backed by /dev/zero-like
    files, so ``--gpus-per-node`` works and sets SLURM_GPUS_ON_NODE as on a cluster).
    """

    root: Path
    munge_dir: Path
    nodes: tuple[str, ...] = ("n1", "n2")
    cpus: int = 2
    gpus: int = 2
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)

    TOOLS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo",
             "squeue", "srun")

    @classmethod
    def start(cls, root: Path, **kwargs) -> "SlurmCluster":
        tools = require_tools(*cls.TOOLS)
        # munged runs as the munge user, which cannot enter pytest's 0700 directories.
        munge_dir = Path(tempfile.mkdtemp(prefix="ds-distil-munge-"))
        cluster = cls(root=root, munge_dir=munge_dir, tools=tools, **kwargs)
        try:
            cluster._start_munge()
            cluster._write_config()
            cluster._start_daemons()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.munge_dir / "munge.sock"

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """``base`` plus SLURM_CONF, for sbatch/scontrol and everything the jobs run."""
        return {**base, "SLURM_CONF": str(self.conf)}

    def _start_munge(self) -> None:
        import pwd

        munge = pwd.getpwnam("munge")
        os.chown(self.munge_dir, munge.pw_uid, munge.pw_gid)
        self.munge_dir.chmod(0o711)  # clients (root) must reach the socket
        as_munge = {"user": munge.pw_uid, "group": munge.pw_gid, "extra_groups": []}
        key = self.munge_dir / "munge.key"
        subprocess.run([self.tools["mungekey"], "--create", "--keyfile", str(key)], check=True,
                       timeout=30, **as_munge)
        self.procs["munged"] = subprocess.Popen(
            [self.tools["munged"], "--foreground", f"--socket={self.munge_socket}", f"--key-file={key}",
             f"--pid-file={self.munge_dir / 'munged.pid'}", f"--log-file={self.munge_dir / 'munged.log'}",
             f"--seed-file={self.munge_dir / 'munged.seed'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, **as_munge)
        wait_for(lambda: self.munge_socket.exists() or self.procs["munged"].poll() is not None,
                 20, "munged's socket")
        if self.procs["munged"].poll() is not None:
            log = self.munge_dir / "munged.log"
            pytest.fail(f"munged exited: {log.read_text() if log.exists() else ''}")

    def _write_config(self) -> None:
        r = self.root
        for node in self.nodes:
            (r / f"spool-{node}").mkdir(parents=True, exist_ok=True)
            (r / f"tmp-{node}").mkdir(parents=True, exist_ok=True)
        (r / "state").mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        self.ctld_port = free_port()
        self.node_ports = {node: free_port() for node in self.nodes}
        lines = [
            "ClusterName=dsdistil", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={self.ctld_port}",
            "SlurmUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SchedulerParameters=batch_sched_delay=0", "SlurmdParameters=config_overrides",
            "ReturnToService=2", "MinJobAge=600", "KillWait=5", "GresTypes=gpu",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool-%n'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}", f"SlurmdLogFile={r / 'slurmd-%n.log'}",
            f"TmpFS={r / 'tmp-%n'}",
        ]
        for node, port in self.node_ports.items():
            lines.append(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus} Gres=gpu:{self.gpus} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        # GPUs need device files; character devices that exist everywhere stand in for them.
        devices = ["/dev/zero", "/dev/full", "/dev/null", "/dev/random", "/dev/urandom"][: self.gpus]
        (r / "gres.conf").write_text("AutoDetect=off\n" + "".join(f"Name=gpu File={d}\n" for d in devices))

    def _start_daemons(self) -> None:
        env = self.env(child_env())

        def daemon(name: str, *args: str) -> None:
            with open(self.root / f"{name}.out", "w") as out:  # start-up errors before the log opens
                self.procs[name] = subprocess.Popen([*args, "-D", "-f", str(self.conf)], env=env, stdout=out,
                                                    stderr=subprocess.STDOUT, start_new_session=True)
        daemon("slurmctld", self.tools["slurmctld"], "-i")
        wait_port(self.ctld_port, self.procs["slurmctld"], "slurmctld")
        for node in self.nodes:
            daemon(f"slurmd-{node}", self.tools["slurmd"], "-N", node)
        wait_for(self._all_idle, 30, "the SLURM nodes to be idle", details=self.diagnostics)

    def _all_idle(self) -> bool:
        states = self.run("sinfo", "-h", "-N", "-o", "%N %t").stdout.split("\n")
        idle = {line.split()[0] for line in states if line.strip().endswith("idle")}
        return idle >= set(self.nodes)

    def run(self, tool: str, *args: str, timeout: float = 30, check: bool = False) -> subprocess.CompletedProcess:
        """Run a SLURM client command (bounded) against this cluster."""
        done = subprocess.run([self.tools.get(tool, tool), *args], env=self.env(child_env()),
                              capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            pytest.fail(f"{tool} {' '.join(args)} failed ({done.returncode}): {done.stderr}")
        return done

    def sbatch(self, script: Path | None, args: list[str], *, options: list[str], env: dict[str, str],
               cwd: Path) -> str:
        """Submit ``script args`` (or, with ``script=None``, ``--wrap`` in ``options``) from
        ``cwd`` with ``env``, which sbatch exports to the job. Returns the job id."""
        target = [str(script), *map(str, args)] if script is not None else []
        done = subprocess.run([self.tools["sbatch"], "--parsable", *options, *target],
                              env=self.env(env), cwd=cwd, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            pytest.fail(f"sbatch failed ({done.returncode}): {done.stderr}")
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, StdOut, ...)."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)

    def wait_job(self, job_id: str, states=TERMINAL_STATES, timeout: float = 120) -> dict[str, str]:
        """Wait until the job is in one of ``states``; returns its fields."""
        def reached():
            info = self.job(job_id)
            return info if info.get("JobState") in states else None
        return wait_for(reached, timeout, f"job {job_id} to reach {sorted(states)}",
                        details=lambda: self.job_report(job_id))

    def start_requeued_now(self, job_id: str) -> None:
        """Start a requeued (PENDING) job now instead of after SLURM's ~2 minute delay.

        Not before the nodes have cleaned up the previous run: slurmd refuses ("Job
        credential revoked") a launch whose credential was made in the same second as
        the revocation, and the job then fails instead of restarting.
        """
        wait_for(self._all_idle, 30, "the nodes to finish the previous run", details=self.diagnostics)
        time.sleep(1.1)  # credential times have a one-second resolution
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=True)

    def job_log(self, job_id: str) -> str:
        path = self.job(job_id).get("StdOut", "")
        return Path(path).read_text() if path and Path(path).exists() else f"(no log at {path!r})"

    def job_report(self, job_id: str) -> str:
        return f"job: {self.job(job_id)}\nlog:\n{self.job_log(job_id)[-5000:]}\n{self.diagnostics()}"

    def diagnostics(self) -> str:
        tails = []
        for name in ["slurmctld.log", *(f"slurmd-{n}.log" for n in self.nodes)]:
            path = self.root / name
            if path.exists():
                tails.append(f"--- {name}\n" + "\n".join(path.read_text().splitlines()[-15:]))
        return "\n".join(tails)

    def stop(self) -> None:
        """Cancel what still runs, then stop the daemons (slurmds first) by pid."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            try:
                self.run("scancel", "--full", "--user=root", timeout=10)
                wait_for(lambda: not self.run("squeue", "-h", "-t", "RUNNING,COMPLETING", timeout=10).stdout.strip(),
                         20, "jobs to end")
            except (subprocess.SubprocessError, pytest.fail.Exception):
                pass
        for name in sorted(self.procs, key=lambda n: (n == "munged", n == "slurmctld")):
            stop_process(self.procs[name])
        shutil.rmtree(self.munge_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_cluster(request, tmp_path_factory) -> SlurmCluster:
    """A two-node SLURM cluster on loopback for the whole session."""
    return _shared(request, "slurm", lambda: SlurmCluster.start(tmp_path_factory.mktemp("slurm")),
                   lambda cluster: cluster.stop())
