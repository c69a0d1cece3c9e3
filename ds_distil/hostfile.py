"""Write and check DeepSpeed hostfiles (``HOST slots=N``, one host per line).

DeepSpeed treats a missing hostfile as "run on this node only" and logs a warning,
so a typo in a path silently turns a 16-node job into a 1-node one. Here a missing or
malformed hostfile is an error that names the file and the line.

    ds-distil hostfile --check hostfiles/two_nodes
    ds-distil hostfile --from-slurm --slots 8 --output logs/hostfile-$SLURM_JOB_ID

``--from-slurm`` expands ``$SLURM_JOB_NODELIST`` with ``scontrol show hostnames`` (the
order is SLURM's, which is also the node rank order of ``srun``); ``--slots`` is the
number of GPUs per node (default ``$SLURM_GPUS_ON_NODE``).

    ds-distil hostfile --write-env .deepspeed_env [--forward PATH,DS_ACCELERATOR,...]

writes the environment file DeepSpeed's pdsh runner exports on every node (it forwards
nothing else but PYTHON*/MLFLOW*/UCX*/MV2* variables).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

from ds_distil.errors import UserError, require_output_path

# A host name or IPv4 address as pdsh and ssh accept them.
_HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_VAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# What ranks on other nodes need from the launching shell when DeepSpeed starts them over
# pdsh/ssh (a fresh login environment otherwise). Only the variables that are set go in.
DEFAULT_FORWARD = ("PATH", "LD_LIBRARY_PATH", "VIRTUAL_ENV", "CUDA_HOME", "DS_ACCELERATOR",
                   "TORCH_EXTENSIONS_DIR", "HF_HOME", "HF_HUB_OFFLINE", "NCCL_SOCKET_IFNAME",
                   "GLOO_SOCKET_IFNAME", "NCCL_DEBUG", "OMP_NUM_THREADS")


def parse_hostfile(text: str, source: str = "hostfile") -> dict[str, int]:
    """Hosts and their slot counts, in file order. Every bad line is reported at once."""
    hosts: dict[str, int] = {}
    first_line: dict[str, int] = {}
    problems = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{lineno}"
        fields = line.split()
        if len(fields) != 2 or not fields[1].startswith("slots="):
            problems.append(f"{where}: expected 'HOST slots=N', got {raw.strip()!r}")
            continue
        host, slots_text = fields[0], fields[1][len("slots="):]
        if not _HOST_RE.match(host):
            problems.append(f"{where}: {host!r} is not a host name")
            continue
        try:
            slots = int(slots_text)
        except ValueError:
            problems.append(f"{where}: slots={slots_text} is not an integer: give the GPUs on {host}")
            continue
        if slots < 1:
            problems.append(f"{where}: slots={slots_text} on {host} must be at least 1")
            continue
        if host in hosts:
            problems.append(f"{where}: {host} is already listed on line {first_line[host]}: "
                            "list each host once")
            continue
        hosts[host] = slots
        first_line[host] = lineno
    if not hosts and not problems:
        problems.append(f"{source}: no hosts listed: add one line 'HOST slots=N' per node")
    if problems:
        raise UserError(*problems)
    return hosts


def read_hostfile(path: str | Path) -> dict[str, int]:
    """Parse the hostfile at ``path``; a missing file is an error, never a single-node run."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: hostfile not found (DeepSpeed would silently run on this node "
                        "only): fix the path or write one with `ds-distil hostfile --from-slurm`") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read the hostfile: {err}") from None
    return parse_hostfile(text, str(path))


def format_hostfile(hosts: dict[str, int]) -> str:
    return "".join(f"{host} slots={slots}\n" for host, slots in hosts.items())


def write_hostfile(hosts: dict[str, int], path: str | Path) -> None:
    """Write atomically: ranks on other nodes may read the file while it is written."""
    path = Path(path)
    text = format_hostfile(hosts)
    parse_hostfile(text, str(path))  # never write what we would refuse to read
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_deepspeed_env(path: str | Path, names=DEFAULT_FORWARD, environ=None) -> dict[str, str]:
    """Write a ``.deepspeed_env`` (``KEY=VALUE`` lines) with those of ``names`` that are set.

    DeepSpeed's runner crashes on blank or comment lines and cannot carry a newline in a
    value, so neither is ever written. Returns what was written.
    """
    env = os.environ if environ is None else environ
    chosen = {name: env[name] for name in names if name in env}
    bad = [name for name, value in chosen.items() if "\n" in value or "\r" in value]
    if bad:
        raise UserError(f"{', '.join(bad)} contains a newline, which a .deepspeed_env cannot carry: "
                        "leave it out of --forward")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{name}={value}\n" for name, value in chosen.items()))
    return chosen


def slurm_hostnames(nodelist: str | None = None) -> list[str]:
    """The host names of a SLURM node list (default: this job's), in SLURM's order."""
    nodelist = nodelist or os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise UserError("SLURM_JOB_NODELIST is not set: run inside a SLURM allocation "
                        "(sbatch, salloc) or pass --nodelist")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=60)
    except FileNotFoundError:
        raise UserError("scontrol not found on PATH: run on a SLURM node") from None
    except subprocess.TimeoutExpired:
        raise UserError("scontrol show hostnames did not answer within 60 s: is slurmctld up?") from None
    if out.returncode != 0:
        raise UserError(f"scontrol show hostnames {nodelist!r} failed: {out.stderr.strip()}")
    hosts = out.stdout.split()
    if not hosts:
        raise UserError(f"scontrol show hostnames {nodelist!r} listed no host")
    return hosts


def hostfile_from_slurm(slots: int, nodelist: str | None = None) -> dict[str, int]:
    if slots < 1:
        raise UserError(f"--slots {slots}: give the number of GPUs per node (at least 1)")
    return {host: slots for host in slurm_hostnames(nodelist)}


def describe(hosts: dict[str, int]) -> str:
    listing = ", ".join(f"{h}={s}" for h, s in hosts.items())
    return f"{len(hosts)} host(s), {sum(hosts.values())} slot(s): {listing}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", metavar="FILE", help="check a hostfile and print its hosts")
    mode.add_argument("--from-slurm", action="store_true",
                      help="write a hostfile for this SLURM allocation ($SLURM_JOB_NODELIST)")
    mode.add_argument("--write-env", metavar="FILE",
                      help="write a .deepspeed_env for the pdsh runner with the --forward variables")
    parser.add_argument("--forward", default=",".join(DEFAULT_FORWARD),
                        help="comma-separated variables for --write-env (default: %(default)s)")
    parser.add_argument("--slots", type=int, default=None,
                        help="slots (GPUs) per node for --from-slurm (default: $SLURM_GPUS_ON_NODE)")
    parser.add_argument("--nodelist", default=None,
                        help="SLURM node list to expand instead of $SLURM_JOB_NODELIST")
    parser.add_argument("--output", default="-", help="where --from-slurm writes (default: stdout)")


def run(args: argparse.Namespace) -> int:
    if args.check is not None:
        if not args.check.strip():
            raise UserError("--check: empty; give the hostfile's path")
        if Path(args.check).is_dir():
            raise UserError(f"--check {args.check} is a directory; give the hostfile's path")
        print(f"{args.check}: {describe(read_hostfile(args.check))}")
        return 0
    if args.write_env is not None:
        require_output_path(args.write_env, "--write-env", "file")
        names = [n.strip() for n in args.forward.split(",") if n.strip()]
        bad = [n for n in names if not _VAR_RE.match(n)]
        if bad:
            raise UserError(f"--forward {args.forward!r}: {bad[0]!r} is not an environment variable name; "
                            "give comma-separated names, e.g. PATH,LD_LIBRARY_PATH")
        written = write_deepspeed_env(args.write_env, names)
        print(f"wrote {args.write_env}: {', '.join(written) or 'nothing (none of them is set)'}")
        return 0
    if args.output != "-":
        require_output_path(args.output, "--output", "file")
    slots = args.slots
    if slots is None:
        env_slots = os.environ.get("SLURM_GPUS_ON_NODE", "")
        if not env_slots.isdigit():
            raise UserError("--slots is required (the number of GPUs per node): "
                            "SLURM_GPUS_ON_NODE is not set in this allocation")
        slots = int(env_slots)
    hosts = hostfile_from_slurm(slots, args.nodelist)
    if args.output == "-":
        sys.stdout.write(format_hostfile(hosts))
    else:
        write_hostfile(hosts, args.output)
        print(f"wrote {args.output}: {describe(hosts)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m ds_distil.hostfile``: the same as ``ds-distil hostfile`` (one error path: the CLI's)."""
    from ds_distil.cli import main as cli_main

    return cli_main(["hostfile", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
