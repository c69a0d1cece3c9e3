"""Hostfiles: our parser against DeepSpeed's, errors that name the line, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cluster import child_env, slurm_cluster  # noqa: F401 (fixture)
from ds_distil.errors import UserError
from ds_distil.hostfile import (parse_hostfile, read_hostfile, write_deepspeed_env, write_hostfile)

HOSTFILES = Path(__file__).resolve().parent.parent / "hostfiles"


def deepspeed_reads(path: Path) -> dict[str, int]:
    """What DeepSpeed's own launcher makes of a hostfile."""
    from deepspeed.launcher.runner import fetch_hostfile

    return dict(fetch_hostfile(str(path)))


def cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ds_distil.hostfile", *args], capture_output=True, text=True,
                          timeout=60, env=env)


@pytest.mark.parametrize("path", sorted(p for p in HOSTFILES.iterdir() if p.is_file() and p.suffix != ".md"),
                         ids=lambda p: p.name)
def test_shipped_examples_parse_the_same_in_deepspeed(path):
    ours = read_hostfile(path)
    assert ours and all(slots == 8 for slots in ours.values())
    assert list(ours.items()) == list(deepspeed_reads(path).items())


def test_comments_blank_lines_and_order(tmp_path):
    text = "# cluster A\n\nnode-b slots=4   # the first rank\nnode-a slots=2\n"
    hosts = parse_hostfile(text)
    assert list(hosts.items()) == [("node-b", 4), ("node-a", 2)]


def test_written_hostfile_reads_back_in_deepspeed(tmp_path):
    hosts = {"gpu17": 8, "gpu03": 8, "10.0.0.5": 4}
    path = tmp_path / "sub" / "hosts"
    write_hostfile(hosts, path)
    assert path.read_text() == "gpu17 slots=8\ngpu03 slots=8\n10.0.0.5 slots=4\n"
    assert list(read_hostfile(path).items()) == list(hosts.items())
    assert list(deepspeed_reads(path).items()) == list(hosts.items())


@pytest.mark.parametrize("line, message", [
    ("node02 slot=8", r"hosts:2: expected 'HOST slots=N', got 'node02 slot=8'"),
    ("node02", r"hosts:2: expected 'HOST slots=N'"),
    ("node02 slots=8 extra", r"hosts:2: expected 'HOST slots=N'"),
    ("node02 slots=eight", r"hosts:2: slots=eight is not an integer"),
    ("node02 slots=-1", r"hosts:2: slots=-1 on node02 must be at least 1"),
    ("node02 slots=2.5", r"hosts:2: slots=2.5 is not an integer"),
    ("node02 slots=0", r"hosts:2: slots=0 on node02 must be at least 1"),
    ("node01 slots=4", r"hosts:2: node01 is already listed on line 1"),
    ("no/de slots=8", r"hosts:2: 'no/de' is not a host name"),
])
def test_malformed_lines_are_errors_naming_the_line(line, message):
    with pytest.raises(UserError, match=message):
        parse_hostfile(f"node01 slots=8\n{line}\n", "hosts")


def test_every_bad_line_is_reported_at_once():
    with pytest.raises(UserError) as err:
        parse_hostfile("a slots=1\nb slots=x\nc\na slots=2\n", "h")
    assert [p.split(":")[1] for p in err.value.problems] == ["2", "3", "4"]


def test_missing_or_empty_hostfile_is_an_error_not_a_single_node_run(tmp_path):
    with pytest.raises(UserError, match="hostfile not found .*silently run on this node only"):
        read_hostfile(tmp_path / "nope")
    (tmp_path / "empty").write_text("# nothing\n\n")
    with pytest.raises(UserError, match="no hosts listed"):
        read_hostfile(tmp_path / "empty")


def test_cli_check_prints_hosts_and_fails_with_status_2_on_a_bad_file(tmp_path):
    done = cli("--check", str(HOSTFILES / "two_nodes"))
    assert done.returncode == 0, done.stderr
    assert "2 host(s), 16 slot(s): node01=8, node02=8" in done.stdout
    bad = tmp_path / "bad"
    bad.write_text("node01 slots=8\nnode02 slots=zero\n")
    done = cli("--check", str(bad))
    assert done.returncode == 2
    assert done.stderr == f"ds-distil hostfile: error: {bad}:2: slots=zero is not an integer: give the GPUs on node02\n"


def test_cli_from_slurm_outside_an_allocation_is_an_error(tmp_path):
    env = child_env()
    done = cli("--from-slurm", "--slots", "8", "--output", str(tmp_path / "h"), env=env)
    assert done.returncode == 2 and "SLURM_JOB_NODELIST is not set" in done.stderr
    assert not (tmp_path / "h").exists()


@pytest.mark.cluster
def test_cli_from_slurm_expands_the_node_list_with_scontrol(slurm_cluster, tmp_path):
    env = slurm_cluster.env(child_env({"SLURM_JOB_NODELIST": "node[01-03],gpu7", "SLURM_GPUS_ON_NODE": "4"}))
    out = tmp_path / "hosts"
    done = cli("--from-slurm", "--output", str(out), env=env)
    assert done.returncode == 0, done.stderr
    assert out.read_text() == "node01 slots=4\nnode02 slots=4\nnode03 slots=4\ngpu7 slots=4\n"
    done = cli("--from-slurm", "--slots", "8", "--nodelist", "n[1-2]", env=env)
    assert (done.returncode, done.stdout) == (0, "n1 slots=8\nn2 slots=8\n")


def test_write_deepspeed_env_only_set_variables_no_blank_lines(tmp_path):
    path = tmp_path / ".deepspeed_env"
    written = write_deepspeed_env(path, ["PATH", "UNSET_VAR", "DS_ACCELERATOR"],
                                  {"PATH": "/venv/bin:/usr/bin", "DS_ACCELERATOR": "cpu"})
    assert written == {"PATH": "/venv/bin:/usr/bin", "DS_ACCELERATOR": "cpu"}
    assert path.read_text() == "PATH=/venv/bin:/usr/bin\nDS_ACCELERATOR=cpu\n"
    with pytest.raises(UserError, match="BAD contains a newline"):
        write_deepspeed_env(path, ["BAD"], {"BAD": "a\nb"})
