"""Helpers of the fault-injection suite: ranks started by hand, logs, a tally of outcomes.

Ranks are started as plain processes with torch-style environment variables (RANK,
WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT), not through a launcher: the test then
holds every rank's pid and can kill, stop or signal one rank alone, and no launcher
tears the others down for it (so what the surviving ranks do is what is tested).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import child_env

TRAIN = [sys.executable, "-m", "ds_distil", "train"]


@dataclass
class Ranks:
    """A group of ``ds-distil train`` processes, one per rank, each logging to a file."""

    procs: list[subprocess.Popen]
    logs: list[Path]

    def log(self, rank: int) -> str:
        return self.logs[rank].read_text(errors="replace")

    def wait_for(self, pattern: str, rank: int = 0, timeout: float = 180) -> None:
        """Block until ``pattern`` (a regex) appears in ``rank``'s log; fail if the rank exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.log(rank), flags=re.M):
                return
            if self.procs[rank].poll() is not None:
                raise AssertionError(f"rank {rank} exited ({self.procs[rank].returncode}) before {pattern!r}:\n"
                                     f"{self.log(rank)[-4000:]}")
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"no {pattern!r} in rank {rank}'s log within {timeout} s:\n{self.log(rank)[-4000:]}")

    def send(self, rank: int, sig: int) -> None:
        os.kill(self.procs[rank].pid, sig)

    def wait(self, timeout: float = 240, ranks: list[int] | None = None) -> list[int]:
        """Exit statuses of ``ranks`` (default: all); one still running after ``timeout`` fails
        the test, with the Python stacks of its threads in the message."""
        deadline = time.monotonic() + timeout
        for rank in range(len(self.procs)) if ranks is None else ranks:
            try:
                self.procs[rank].wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.send(rank, signal.SIGABRT)  # faulthandler (PYTHONFAULTHANDLER=1) prints every stack
                time.sleep(2)
                self.kill()
                raise AssertionError(f"rank {rank} still running after {timeout} s:\n{self.log(rank)[-8000:]}")
        return [p.returncode for p in self.procs] if ranks is None else [self.procs[r].returncode for r in ranks]

    def kill(self) -> None:
        """SIGKILL every rank still alive (by pid: these processes only)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def start_ranks(config: Path, world_size: int, *overrides: str, log_dir: Path, env: dict | None = None) -> Ranks:
    """Start ``world_size`` ranks of ``ds-distil train`` on loopback with their own port."""
    from ds_distil.distributed import free_port

    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    procs, logs = [], []
    for rank in range(world_size):
        rank_env = child_env(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=world_size, MASTER_ADDR="127.0.0.1",
                             MASTER_PORT=port, PYTHONFAULTHANDLER=1, **(env or {}))
        log = log_dir / f"rank{rank}.log"
        with open(log, "w") as out:
            procs.append(subprocess.Popen([*TRAIN, "--config", str(config), *overrides], env=rank_env, stdout=out,
                                          stderr=subprocess.STDOUT, text=True))
        logs.append(log)
    return Ranks(procs, logs)


def run_train(config: Path, *overrides: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """One ``ds-distil train`` process (world of one); returns it whatever its exit status."""
    return subprocess.run([*TRAIN, "--config", str(config), *overrides], env=child_env(**(env or {})),
                          capture_output=True, text=True, timeout=timeout)


def metrics(output_dir: Path, group: str = "Train") -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["group"] == group]


def logged_steps(text: str) -> list[int]:
    """Optimizer steps of the console lines in a rank-0 log."""
    return [int(m) for m in re.findall(r"^step (\d+) \|", text, flags=re.M)]


def resumed_at(text: str) -> int:
    """The step a run resumed at, from its "resumed from ... at step N" line."""
    found = re.search(r"^resumed from \S+ at step (\d+)", text, flags=re.M)
    assert found, f"the run did not resume:\n{text[-3000:]}"
    return int(found.group(1))


@dataclass
class Tally:
    """What the suite tried and what came of it: the figures of the README's table."""

    bad_inputs: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    resumed: list[tuple[str, int]] = field(default_factory=list)  # (case, steps lost)
    silent: list[str] = field(default_factory=list)

    def bad_input(self, case: str, reported: bool) -> None:
        """A bad input tried; ``reported``: refused with a clear message before any work."""
        self.bad_inputs.append(case)
        if not reported:
            self.silent.append(case)

    def fault(self, case: str, detected: bool) -> None:
        """A fault injected; ``detected``: the run said what happened (message, status, skip count)."""
        self.faults.append(case)
        if not detected:
            self.silent.append(case)

    def resume(self, case: str, steps_lost: int) -> None:
        self.resumed.append((case, steps_lost))

    def table(self) -> str:
        lost = [n for _, n in self.resumed]
        return "\n".join([
            "| | count |",
            "|---|---|",
            f"| bad inputs tried (each refused with file, key, value and fix) | {len(self.bad_inputs)} |",
            f"| faults injected | {len(self.faults)} |",
            f"| runs that resumed | {len(self.resumed)} |",
            f"| steps lost per resume | {', '.join(map(str, lost)) or '-'} (max {max(lost, default=0)}) |",
            f"| silent failures | {len(self.silent)} {self.silent or ''} |",
        ])


def mount_tmpfs(path: Path, size: str) -> bool:
    """Mount a tmpfs of ``size`` at ``path`` (root only); False if this machine does not allow it."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def unmount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True, timeout=60)

