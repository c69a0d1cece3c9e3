"""Real launches on loopback: deepspeed over pdsh/ssh, mpirun, and the slurm/ scripts.

Each test runs tests/dist_probe.py (the stand-in for ``ds-distil train``) under a real
launcher and reads back one JSON line per rank: which rank, on which node, found by
which launcher, with which arguments.
"""

from __future__ import annotations

import json
import shlex
from collections import Counter
from pathlib import Path

import pytest

from ds_distil.distributed import free_port

from cluster import (CPU_DS_CONFIG, SLURM_SCRIPTS, TERMINAL_STATES, deepspeed_ops,  # noqa: F401
                     kill_probe_ranks, probe_command, read_probe, run_deepspeed_pdsh, run_mpirun,
                     slurm_cluster, ssh_loopback, wait_for)

pytestmark = [pytest.mark.distributed, pytest.mark.cluster]


def started(records: list[dict]) -> list[dict]:
    return sorted((r for r in records if r["event"] == "started"), key=lambda r: r["rank"])


def assert_one_world(records: list[dict], world_size: int, launcher: str) -> None:
    """Every rank 0..N-1 reported once, in one process group of N whose all-reduce summed N."""
    assert [r["rank"] for r in records] == list(range(world_size)), records
    for r in records:
        assert r["world_size"] == world_size and r["all_reduce_sum"] == world_size, r
        assert r["launcher"] == launcher, r
        assert "error" not in r, r
    assert len({r["pid"] for r in records}) == world_size


@pytest.fixture
def probe_out(tmp_path):
    out = tmp_path / "probe"
    yield out
    kill_probe_ranks(out)  # only acts if a failed test left ranks behind


def test_deepspeed_pdsh_runner_over_ssh_to_two_hosts(ssh_loopback, deepspeed_ops, tmp_path, probe_out):
    """`deepspeed --hostfile` with two hosts: pdsh runs one launcher per host over ssh."""
    env = {**deepspeed_ops, "DS_DISTIL_PROBE_TAG": "from-deepspeed-env"}
    done = run_deepspeed_pdsh(ssh_loopback, [str(Path(probe_command()[1])), "--out", str(probe_out),
                                             "--config", "run.json", "seed=7"],
                              tmp_path / "work", env=env)
    assert done.returncode == 0, done.tail()
    ranks = started(read_probe(probe_out))
    assert_one_world(ranks, 2, launcher="env")  # the deepspeed launcher sets RANK etc.
    # One rank per hostfile line, each started through its own ssh session.
    assert [r["node_rank"] for r in ranks] == [0, 1]
    assert all(r["via_ssh"] for r in ranks)
    assert [r["local_rank"] for r in ranks] == [0, 0]
    assert [r["local_rank_arg"] for r in ranks] == [0, 0]  # the launcher's --local_rank
    assert all(r["master"].startswith("127.0.0.1:") for r in ranks)
    # Only .deepspeed_env carries variables to ssh'd ranks: these came through it.
    for r in ranks:
        assert r["env"]["DS_ACCELERATOR"] == "cpu" and r["env"]["GLOO_SOCKET_IFNAME"] == "lo"
        assert r["probe_env"] == {"DS_DISTIL_PROBE_TAG": "from-deepspeed-env"}
        assert r["config"] == "run.json" and r["overrides"] == {"seed": "7"}


@pytest.mark.parametrize("flavour", ["openmpi", "mpich"])
def test_mpirun_two_ranks(deepspeed_ops, probe_out, flavour):
    """`mpirun -np 2`: ds_distil.distributed maps OMPI_COMM_WORLD_* / PMI_* to RANK etc."""
    done = run_mpirun(2, probe_command("--out", str(probe_out)), env=deepspeed_ops, flavour=flavour)
    assert done.returncode == 0, done.tail()
    ranks = started(read_probe(probe_out))
    assert_one_world(ranks, 2, launcher=flavour)
    assert sorted(r["local_rank"] for r in ranks) == [0, 1]
    assert all(r["local_rank_arg"] is None for r in ranks)


def submit_probe(cluster, env, tmp_path, script: str, options: list[str], *, extra_env=None,
                 args: tuple[str, ...] = ("seed=3",)) -> tuple[str, Path]:
    """Submit slurm/<script> with the probe as DS_DISTIL_CMD, the CPU config and the
    script's own #SBATCH --output (logs/%x-%j.out under the submit directory)."""
    work = tmp_path / "submit"
    (work / "logs").mkdir(parents=True)
    run_json = work / "run.json"
    run_json.write_text(json.dumps({"output_dir": str(tmp_path / "run")}))
    env = {**env, "DS_DISTIL_CMD": " ".join(probe_command()), "DS_ACCELERATOR": "cpu",
           "DS_DISTIL_PROBE_DIR": str(tmp_path / "probe"), **(extra_env or {})}
    job = cluster.sbatch(SLURM_SCRIPTS / script, [run_json, CPU_DS_CONFIG, *args],
                         options=["--time=10", *options], env=env, cwd=work)
    return job, work


@pytest.fixture
def cluster(slurm_cluster, deepspeed_ops):
    """The SLURM cluster, once DeepSpeed's JIT op is built (ranks load it at start-up)."""
    return slurm_cluster


def test_srun_per_rank_script_runs_four_ranks_on_two_nodes(cluster, deepspeed_ops, tmp_path, probe_out):
    job, work = submit_probe(cluster, deepspeed_ops, tmp_path, "srun_per_rank.sbatch",
                             ["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1"])
    info = cluster.wait_job(job, timeout=120)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), cluster.job_report(job)
    assert (work / "logs" / f"ds-distil-{job}.out").exists()  # the script's %x-%j log

    ranks = started(read_probe(probe_out))
    assert_one_world(ranks, 4, launcher="srun")
    assert Counter(r["node"] for r in ranks) == {"n1": 2, "n2": 2}
    assert sorted((r["node"], r["local_rank"]) for r in ranks) == [("n1", 0), ("n1", 1), ("n2", 0), ("n2", 1)]
    for r in ranks:
        assert r["master"].startswith("127.0.0.1:"), r  # NodeAddr of the first node
        assert r["config"] == str(work / "run.json")
        assert r["overrides"] == {"deepspeed_config": str(CPU_DS_CONFIG), "seed": "3"}
        assert r["env"]["DS_ACCELERATOR"] == "cpu"


def test_plain_srun_takes_the_master_address_from_the_allocation(cluster, deepspeed_ops, tmp_path, probe_out):
    """`srun` with no script around it: only MASTER_PORT is exported; MASTER_ADDR is the
    NodeAddr of the allocation's first node (the node name n1 resolves nowhere)."""
    env = {**deepspeed_ops, "MASTER_PORT": str(free_port())}
    wrap = shlex.join(["srun", *probe_command("--out", str(probe_out))])
    job = cluster.sbatch(None, [], options=["--nodes=2", "--ntasks-per-node=1", "--time=5",
                                            f"--output={tmp_path}/%j.out", f"--wrap={wrap}"],
                         env=env, cwd=tmp_path)
    info = cluster.wait_job(job, timeout=120)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), cluster.job_report(job)
    ranks = started(read_probe(probe_out))
    assert_one_world(ranks, 2, launcher="srun")
    assert [(r["node"], r["master"]) for r in ranks] == [("n1", f"127.0.0.1:{env['MASTER_PORT']}"),
                                                         ("n2", f"127.0.0.1:{env['MASTER_PORT']}")]


def test_deepspeed_per_node_script_trains_with_the_cpu_config(cluster, deepspeed_ops, tmp_path, probe_out):
    """One deepspeed launcher per node (srun, --no_ssh), DeepSpeed engine steps on 2 ranks."""
    # --exclusive (in the script) hands the job every GPU of a node; one rank per node here.
    job, work = submit_probe(cluster, deepspeed_ops, tmp_path, "deepspeed_per_node.sbatch",
                             ["--nodes=2", "--gpus-per-node=1"],
                             extra_env={"DS_DISTIL_PROBE_ENGINE_STEPS": "3", "DS_DISTIL_GPUS_PER_NODE": "1"})
    info = cluster.wait_job(job, timeout=180)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), cluster.job_report(job)

    ranks = started(read_probe(probe_out))
    assert_one_world(ranks, 2, launcher="env")
    assert [(r["node"], r["node_rank"], r["local_rank"]) for r in ranks] == [("n1", 0, 0), ("n2", 1, 0)]
    assert (work / "logs" / f"hostfile-{job}").read_text() == "n1 slots=1\nn2 slots=1\n"
    for r in ranks:
        assert r["local_rank_arg"] is None  # --no_local_rank: the command line stays the trainer's
        engine = r["engine"]
        # cpu_bf16.json at 2 ranks: 32 = 8 x 2 x 2, as DeepSpeed's engine derived it too.
        assert engine["batch"] == {"micro_batch": 8, "accumulation_steps": 2, "global_batch": 32, "world_size": 2}
        assert (engine["engine_micro_batch"], engine["engine_accumulation"]) == (8, 2)
        assert engine["precision"] == "bf16"
        assert engine["scheduler"]["total_num_steps"] == 3
    # Only rank 0 writes TensorBoard events, into the run's directory.
    events = list((tmp_path / "probe" / "tensorboard" / "probe").glob("events.out.tfevents.*"))
    assert len(events) == 1


@pytest.mark.parametrize("script, options, extra_env", [
    ("srun_per_rank.sbatch", ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1"], {}),
    ("deepspeed_per_node.sbatch", ["--nodes=2", "--gpus-per-node=1"], {"DS_DISTIL_GPUS_PER_NODE": "1"}),
])
def test_usr1_checkpoints_requeues_and_restarts(cluster, deepspeed_ops, tmp_path, probe_out, script, options,
                                                extra_env):
    """SIGUSR1 (SLURM's time-limit warning) -> ranks exit 75 -> requeue -> restart resumes."""
    job, work = submit_probe(cluster, deepspeed_ops, tmp_path, script, ["--requeue", *options],
                             extra_env={"DS_DISTIL_PROBE_PREEMPT": "1", **extra_env})
    wait_for(lambda: len(started(read_probe(probe_out))) == 2, 90, "both ranks to start",
             details=lambda: cluster.job_report(job))

    # As slurmctld does at --signal=USR1@120, but now; --full reaches the batch shell too.
    cluster.run("scancel", "--signal=USR1", "--full", job, check=True)
    pending = cluster.wait_job(job, states={"PENDING"} | TERMINAL_STATES, timeout=60)
    assert pending["JobState"] == "PENDING" and pending["Restarts"] == "1", cluster.job_report(job)
    preempted = [r for r in read_probe(probe_out) if r["event"] == "preempted"]
    assert sorted(r["rank"] for r in preempted) == [0, 1]
    assert all(r["signal"] == 10 for r in preempted)  # SIGUSR1, received by the ranks

    # A requeued job waits ~2 minutes before it may start again; start it now.
    cluster.start_requeued_now(job)
    info = cluster.wait_job(job, timeout=120)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), cluster.job_report(job)
    restarted = sorted((r for r in read_probe(probe_out) if r["event"] == "restarted"), key=lambda r: r["rank"])
    assert [(r["rank"], r["restart_count"]) for r in restarted] == [(0, 1), (1, 1)]

    log = (work / "logs" / f"ds-distil-{job}.out").read_text()  # one log, appended
    assert "SIGUSR1: ranks checkpoint and exit 75" in log
    assert f"requeueing job {job} to resume" in log
    assert "restart 0:" in log and "restart 1:" in log


def test_usr1_without_requeue_stops_with_status_75(cluster, deepspeed_ops, tmp_path, probe_out):
    job, work = submit_probe(cluster, deepspeed_ops, tmp_path, "srun_per_rank.sbatch",
                             ["--no-requeue", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1",
                              "--cpus-per-task=1"], extra_env={"DS_DISTIL_PROBE_PREEMPT": "1"})
    wait_for(lambda: len(started(read_probe(probe_out))) == 2, 90, "both ranks to start",
             details=lambda: cluster.job_report(job))
    cluster.run("scancel", "--signal=USR1", job, check=True)  # steps only, like --signal=USR1@N
    info = cluster.wait_job(job, timeout=60)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "75:0", "0"), cluster.job_report(job)
    assert "not requeueable: resubmit the same command to resume" in cluster.job_log(job)

