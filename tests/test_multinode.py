"""``ds-distil train`` itself across ranks and "nodes": real launchers, real trainer.

tests/test_launchers.py shows that every launcher starts a probe correctly; here the
real trainer runs under them (tiny teacher and student from conftest, a few steps):

- the slurm/ scripts on a two-node loopback SLURM cluster, end to end;
- SLURM preemption: SIGUSR1 -> checkpoint at the stop step -> requeue -> resume, with
  every per-step loss equal to an uninterrupted run's;
- a 2-rank checkpoint resumed on 1 and on 3 ranks (DeepSpeed's universal format);
- every rank holds the same teacher and, under ZeRO-1/2, the same student after each
  step (tests/multinode_probe.py);
- ``mpirun -np 2`` and ``deepspeed --hostfile`` (pdsh over ssh).

Every launch is bounded by a timeout; ranks that outlive a failed test are killed by
the pid they recorded. Facts behind the launch choices: /work/shared/CLUSTER.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from ds_distil.distributed import free_port

from cluster import (CPU_DS_CONFIG, SLURM_SCRIPTS, TERMINAL_STATES, VENV_BIN, Finished,  # noqa: F401
                     SlurmCluster, alive, deepspeed_ops, run_bounded, run_deepspeed_pdsh, run_mpirun,
                     slurm_cluster, ssh_loopback, wait_for)
from runs import losses_by_step, metrics, write_ds_config, write_run_config

pytestmark = pytest.mark.distributed

PROBE = Path(__file__).resolve().parent / "multinode_probe.py"
LAUNCH_TIMEOUT = 300  # seconds; a tiny run takes ~20 s on an idle 2-core machine, much more when shared

# The resume family (preemption and world-size change): fp32 for exact comparisons, ZeRO-2,
# global batch 12 = micro 2 x accumulation (6, 3, 2) x ranks (1, 2, 3).
FAMILY_STEPS = 40
FAMILY_CHECKPOINT_INTERVAL = 10


# ------------------------------------------------------------------------ helpers

def deepspeed_local(ranks: int, args: list[str]) -> list[str]:
    """``deepspeed --num_gpus N`` on this machine (CPU ranks), master on loopback."""
    return [str(VENV_BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), *args]


def train_local(config: Path, *overrides: str, ranks: int, env: dict[str, str]) -> Finished:
    """``ds-distil train`` as one process, or under the local deepspeed launcher; must succeed."""
    train = ["train", "--config", str(config), *overrides]
    cmd = [str(VENV_BIN / "ds-distil"), *train] if ranks == 1 else deepspeed_local(ranks, ["--module", "ds_distil", *train])
    done = run_bounded(cmd, env=env, timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, f"training on {ranks} rank(s) failed ({done.returncode}):\n{done.tail(80)}"
    return done


def batch_line(micro: int, accumulation: int, ranks: int, global_batch: int) -> str:
    """The trainer's start-up line stating the batch arithmetic."""
    return (f"batch: {micro} sequences/micro-batch x {accumulation} accumulation x {ranks} ranks = "
            f"{global_batch} sequences/step")


def train_steps(output_dir: Path) -> list[int]:
    return [r["step"] for r in metrics(output_dir)]


def checkpoint_state(output_dir: Path) -> tuple[str, dict]:
    """The tag ``latest`` names and that checkpoint's ds_distil_state.json."""
    root = Path(output_dir) / "checkpoints"
    tag = (root / "latest").read_text().strip()
    return tag, json.loads((root / tag / "ds_distil_state.json").read_text())


@dataclass
class RankRecorder:
    """A rank command that notes who it is, then execs the real ``ds-distil train``.

    One line per rank: global rank, SLURM node (or "-"), deepspeed node rank (or "-"),
    pid. ``exec`` keeps the pid, so the pid is the trainer's: the test can tell on which
    node each rank ran, and kill ranks a failed test left behind (ranks started over
    ssh or srun are not children of the test).
    """

    script: Path
    records: Path

    @classmethod
    def create(cls, directory: Path) -> "RankRecorder":
        directory.mkdir(parents=True, exist_ok=True)
        records, script = directory / "ranks.txt", directory / "ds-distil-train"
        script.write_text(
            "#!/bin/bash\n"
            "# Note this rank (a short O_APPEND write: lines of concurrent ranks never mix).\n"
            'echo "${RANK:-${SLURM_PROCID:-${OMPI_COMM_WORLD_RANK:-?}}} ${SLURMD_NODENAME:--} '
            f'${{CROSS_RANK:--}} $$" >> {records}\n'
            f'exec {VENV_BIN / "ds-distil"} train "$@"\n')
        script.chmod(0o755)
        return cls(script, records)

    def ranks(self) -> list[tuple[int, str, str, int]]:
        """(rank, SLURM node, deepspeed node rank, pid) per rank, sorted by rank."""
        if not self.records.exists():
            return []
        rows = [line.split() for line in self.records.read_text().splitlines() if line.strip()]
        return sorted((int(rank), node, cross, int(pid)) for rank, node, cross, pid in rows)

    def kill_leftovers(self) -> None:
        """SIGKILL recorded ranks still alive, only if the pid is still a ds-distil trainer."""
        for *_, pid in self.ranks():
            try:
                if alive(pid) and b"ds-distil" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture
def recorder(tmp_path):
    rec = RankRecorder.create(tmp_path / "recorder")
    yield rec
    rec.kill_leftovers()


@pytest.fixture(scope="module")
def student_without_dropout(tmp_path_factory, student_dir) -> Path:
    """The student with dropout off: runs on different numbers of ranks then compute the
    same function (dropout draws come from each rank's own RNG stream)."""
    out = tmp_path_factory.mktemp("nodrop") / "student"
    shutil.copytree(student_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(dropout=0.0, attention_dropout=0.0)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture
def small_run(tmp_path, student_dir, bert_teacher_dir, prepared_dir):
    """A run config of a few steps: global batch 8 = micro 4 x 2 ranks (or 2 x 2 x 2)."""
    def make(name: str, *, steps: int = 3, precision: str = "bf16", zero_stage: int = 1, micro_batch: int = 4,
             lr: float = 1e-3) -> Path:
        ds = write_ds_config(tmp_path / f"{name}_ds.json", global_batch=8, micro_batch=micro_batch,
                             precision=precision, zero_stage=zero_stage, lr=lr)
        return write_run_config(tmp_path / f"{name}.json", student=student_dir, teacher=bert_teacher_dir,
                                data=prepared_dir, ds_config=ds, output_dir=tmp_path / name, steps=steps)
    return make


# ---------------------------------------------------------------- the resume family

@dataclass
class ResumeFamily:
    """One run configuration shared by the preemption and world-size tests, and its
    uninterrupted 2-rank run (checkpoints every 10 steps, all kept). The student has no
    dropout, so that runs on other world sizes compute the same function; restoring each
    rank's dropout RNG is covered by tests/test_trainer.py's resume test (one rank)."""

    ds_config: Path
    reference: Path  # the uninterrupted run's output_dir
    student: Path
    teacher: Path
    data: Path

    def run_config(self, path: Path, output_dir: Path) -> Path:
        return write_run_config(path, student=self.student, teacher=self.teacher, data=self.data,
                                ds_config=self.ds_config, output_dir=output_dir, steps=FAMILY_STEPS,
                                checkpoint_interval=FAMILY_CHECKPOINT_INTERVAL, train={"keep_checkpoints": 100})

    def losses(self) -> dict[int, float]:
        return losses_by_step(self.reference)

    def rows(self) -> dict[int, dict]:
        return {r["step"]: r for r in metrics(self.reference)}


@pytest.fixture(scope="module")
def family(tmp_path_factory, deepspeed_ops, student_without_dropout, bert_teacher_dir, prepared_dir) -> ResumeFamily:
    root = tmp_path_factory.mktemp("family")
    # The schedule's length is fixed in the JSON: a run stopped early or resumed with
    # another max_steps keeps the reference's learning rates.
    ds = write_ds_config(root / "ds.json", global_batch=12, micro_batch=2, precision="fp32", zero_stage=2,
                         total_steps=FAMILY_STEPS, warmup_steps=2)
    fam = ResumeFamily(ds, root / "reference", student_without_dropout, bert_teacher_dir, prepared_dir)
    done = train_local(fam.run_config(root / "reference.json", fam.reference), ranks=2, env=deepspeed_ops)
    assert batch_line(2, 3, 2, 12) in done.output
    assert train_steps(fam.reference) == list(range(1, FAMILY_STEPS + 1))
    return fam


# --------------------------------------------------------------------------- SLURM

@dataclass
class SlurmJobs:
    """Submits the slurm/ scripts to the loopback cluster and remembers the jobs, so that
    a failed test cancels its jobs (one left running would hold the nodes for the next)."""

    cluster: SlurmCluster
    env: dict[str, str]
    ids: list[str]

    def submit(self, script: str, run_json: Path, ds_json: Path, *, work: Path, options: list[str],
               extra_env: dict[str, str] | None = None) -> tuple[str, Path]:
        """sbatch slurm/<script> RUN.json DS.json from ``work``; returns the job id and its log
        (the scripts' own ``--output=logs/%x-%j.out``)."""
        (work / "logs").mkdir(parents=True, exist_ok=True)
        env = {**self.env, "DS_ACCELERATOR": "cpu", "DS_DISTIL_MASTER_PORT": str(free_port()), **(extra_env or {})}
        job = self.cluster.sbatch(SLURM_SCRIPTS / script, [run_json, ds_json], options=["--time=15", *options],
                                  env=env, cwd=work)
        self.ids.append(job)
        return job, work / "logs" / f"ds-distil-{job}.out"

    def cancel_unfinished(self) -> None:
        for job in self.ids:
            if self.cluster.job(job).get("JobState") not in TERMINAL_STATES:
                self.cluster.run("scancel", "--full", job, timeout=10)
                self.cluster.wait_job(job, timeout=60)


@pytest.fixture
def slurm_jobs(slurm_cluster, deepspeed_ops):
    """The loopback SLURM cluster, once DeepSpeed's JIT op is built (ranks load it at start)."""
    jobs = SlurmJobs(slurm_cluster, deepspeed_ops, [])
    yield jobs
    jobs.cancel_unfinished()


# One rank on each of the two nodes, for both scripts.
SCRIPTS = {
    "srun_per_rank": ("srun_per_rank.sbatch", ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1",
                                               "--cpus-per-task=1"], {}),
    "deepspeed_per_node": ("deepspeed_per_node.sbatch", ["--nodes=2", "--gpus-per-node=1"],
                           {"DS_DISTIL_GPUS_PER_NODE": "1"}),
}


@pytest.mark.cluster
@pytest.mark.parametrize("script", list(SCRIPTS))
def test_slurm_script_trains_on_two_nodes(slurm_jobs, tmp_path, recorder, student_dir, bert_teacher_dir,
                                          prepared_dir, script):
    """slurm/<script> + ds_configs/cpu_bf16.json: 2 ranks on nodes n1 and n2 train,
    rank 0 writes metrics and TensorBoard, every rank writes its checkpoint shard."""
    name, options, extra_env = SCRIPTS[script]
    out = tmp_path / "run"
    run_json = write_run_config(tmp_path / "run.json", student=student_dir, teacher=bert_teacher_dir,
                                data=prepared_dir, ds_config="overridden by the script", output_dir=out, steps=3)
    cluster = slurm_jobs.cluster
    job, log_path = slurm_jobs.submit(name, run_json, CPU_DS_CONFIG, work=tmp_path / "submit", options=options,
                                      extra_env={"DS_DISTIL_CMD": str(recorder.script), **extra_env})
    info = cluster.wait_job(job, timeout=LAUNCH_TIMEOUT)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), cluster.job_report(job)

    log = log_path.read_text()
    # cpu_bf16.json: global batch 32 = 8 x 2 accumulation x 2 ranks.
    assert batch_line(8, 2, 2, 32) in log and "precision bf16" in log, log[-3000:]
    # One trainer per node: rank 0 on n1, rank 1 on n2 (two distinct processes).
    ranks = recorder.ranks()
    assert [(rank, node) for rank, node, *_ in ranks] == [(0, "n1"), (1, "n2")], ranks
    if script == "deepspeed_per_node":
        assert [cross for _, _, cross, _ in ranks] == ["0", "1"]  # the launchers' --node_rank
    assert len({pid for *_, pid in ranks}) == 2

    assert train_steps(out) == [1, 2, 3]
    assert metrics(out, "Eval")[-1]["targets"] > 0
    # TensorBoard: one writer (rank 0), every step of the loss, read back with TensorBoard's reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(events) == 1, events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("Train/loss")] == [1, 2, 3]
    assert {"Train/loss_ce", "Train/loss_mlm", "Train/loss_cos", "Train/lr", "Eval/mlm_accuracy"} <= \
        set(acc.Tags()["scalars"])
    # The final checkpoint: complete, named by `latest`, written by both ranks.
    tag, state = checkpoint_state(out)
    assert tag == "global_step3" and (state["step"], state["world_size"], state["zero_stage"]) == (3, 2, 1)
    tag_dir = out / "checkpoints" / tag
    assert sorted(p.name for p in tag_dir.glob("rng_rank*.pt")) == ["rng_rank0.pt", "rng_rank1.pt"]
    assert len(list(tag_dir.glob("*zero_pp_rank_*_optim_states.pt"))) == 2  # ZeRO-1: one shard per rank


@pytest.mark.cluster
def test_slurm_preemption_checkpoints_requeues_and_resumes_exactly(slurm_jobs, tmp_path, family):
    """SIGUSR1 to a running training job: all ranks stop at the same step and checkpoint
    it, exit 75, the script requeues the job, the restart resumes from that checkpoint,
    and the per-step losses of the whole job equal those of an uninterrupted run."""
    out = tmp_path / "run"
    run_json = family.run_config(tmp_path / "run.json", out)
    # DS_DISTIL_CMD unset: the script's default, `ds-distil train` from PATH.
    cluster = slurm_jobs.cluster
    job, log_path = slurm_jobs.submit("srun_per_rank.sbatch", run_json, family.ds_config, work=tmp_path / "submit",
                                      options=["--requeue", *SCRIPTS["srun_per_rank"][1]])

    def training() -> bool:
        if cluster.job(job).get("JobState") in TERMINAL_STATES:
            pytest.fail(f"job ended before it was signalled\n{cluster.job_report(job)}")
        return (out / "metrics.jsonl").exists() and bool(metrics(out))
    # Preempt mid-run: once step 1 is logged, both ranks are in the step loop.
    wait_for(training, LAUNCH_TIMEOUT, "the first training step", interval=0.25,
             details=lambda: cluster.job_report(job))
    cluster.run("scancel", "--signal=USR1", "--full", job, check=True)

    pending = cluster.wait_job(job, states={"PENDING"} | TERMINAL_STATES, timeout=120)
    assert (pending["JobState"], pending["Restarts"]) == ("PENDING", "1"), cluster.job_report(job)
    tag, state = checkpoint_state(out)
    stop = state["step"]
    assert tag == f"global_step{stop}" and state["world_size"] == 2
    assert 1 <= stop < FAMILY_STEPS, f"the job finished before the signal arrived (stopped at {stop})"
    assert train_steps(out) == list(range(1, stop + 1))  # logged up to the stop step, not beyond
    log = log_path.read_text()
    # Every rank got USR1 (--full); rank 0 names it, or says another rank's came first.
    assert f"stopping at step {stop} on " in log and "checkpoint saved, exit 75" in log, log[-3000:]
    assert f"requeueing job {job} to resume" in log

    cluster.start_requeued_now(job)
    info = cluster.wait_job(job, timeout=LAUNCH_TIMEOUT)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), cluster.job_report(job)
    log = log_path.read_text()  # --open-mode=append: both runs in one log
    assert f"resumed from {out / 'checkpoints' / tag} at step {stop}" in log, log[-3000:]
    assert "restart 1:" in log
    # Nothing lost, nothing repeated, and the same numbers as without the interruption
    # (same world size, fp32, optimizer state and data position restored: bit-identical).
    assert train_steps(out) == list(range(1, FAMILY_STEPS + 1))
    assert losses_by_step(out) == family.losses()
    assert checkpoint_state(out)[0] == f"global_step{FAMILY_STEPS}"


# ------------------------------------------------------------ world-size change

def resume_on(family: ResumeFamily, tmp_path: Path, ranks: int, env: dict[str, str], *,
              before=lambda root: None, resume_steps: int = 2) -> tuple[Path, Finished]:
    """Resume the reference's 2-rank checkpoint of step 10, alone in a fresh output_dir,
    on ``ranks`` ranks for ``resume_steps`` steps; ``before(checkpoint_root)`` may alter it first."""
    saved = FAMILY_CHECKPOINT_INTERVAL
    out = tmp_path / "run"
    root = out / "checkpoints"
    root.mkdir(parents=True)
    for name in (f"global_step{saved}", "student_hf"):
        shutil.copytree(family.reference / "checkpoints" / name, root / name)
    (root / "latest").write_text(f"global_step{saved}")
    assert checkpoint_state(out)[1]["world_size"] == 2
    before(root)
    run_json = family.run_config(tmp_path / "run.json", out)
    return out, train_local(run_json, f"train.max_steps={saved + resume_steps}", ranks=ranks, env=env)


def assert_continues_the_reference(family: ResumeFamily, out: Path, done: Finished, ranks: int) -> None:
    """Resumed at step 10 through the universal format, then the reference's numbers."""
    saved = FAMILY_CHECKPOINT_INTERVAL
    universal = out / "checkpoints" / f"global_step{saved}_universal"
    assert f"world size changed (2 -> {ranks}): converting the checkpoint" in done.output, done.tail(40)
    assert f"resumed from {universal} at step {saved}" in done.output, done.tail(40)
    assert batch_line(2, 6 // ranks, ranks, 12) in done.output
    steps = train_steps(out)
    assert steps == list(range(saved + 1, steps[-1] + 1)) and len(steps) >= 2, steps
    reference = family.rows()
    for row in metrics(out):
        expected = reference[row["step"]]
        assert row["lr"] == expected["lr"], (row, expected)  # the schedule's state came along
        # Another world size sums gradients in another order: equal up to rounding
        # (seen: relative differences below 1e-6).
        for key in ("loss", "loss_ce", "loss_mlm", "loss_cos"):
            assert row[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), (key, row, expected)
    tag, state = checkpoint_state(out)
    assert tag == f"global_step{steps[-1]}" and state["world_size"] == ranks


def test_two_rank_checkpoint_resumes_on_another_world_size(family, deepspeed_ops, tmp_path):
    """A ZeRO-2 checkpoint of 2 ranks resumes on 3 ranks (converted to DeepSpeed's
    universal format on the fly) at the saved step and data position: the next steps'
    losses and learning rates are the uninterrupted 2-rank run's. On 1 rank: the test
    below (the same resume and checks, after a partial conversion)."""
    out, done = resume_on(family, tmp_path, 3, deepspeed_ops)
    assert_continues_the_reference(family, out, done, 3)


def test_an_interrupted_universal_conversion_is_redone(family, deepspeed_ops, tmp_path):
    """A job killed while converting (time limit, preemption, node failure) leaves a
    partial ``global_step10_universal``: here the ``tmp/`` folder that
    deepspeed.checkpoint.ds_to_universal fills first, before any final file. The next
    resume must convert again, not trust the partial folder, and continue on 1 rank
    exactly as the 2-rank run did (the world-size change 2 -> 1)."""
    def interrupted_conversion(root: Path) -> None:
        (root / f"global_step{FAMILY_CHECKPOINT_INTERVAL}_universal" / "tmp").mkdir(parents=True)
    out, done = resume_on(family, tmp_path, 1, deepspeed_ops, before=interrupted_conversion)
    assert_continues_the_reference(family, out, done, 1)


# ------------------------------------------------------- identical state on every rank

@pytest.mark.parametrize("zero_stage, precision", [(1, "bf16"), (2, "fp32")])
def test_every_rank_holds_the_same_teacher_and_student(small_run, deepspeed_ops, tmp_path, bert_teacher_dir,
                                                       zero_stage, precision):
    """Under ZeRO-1/2 each rank keeps the whole student: after training, the bytes of every
    parameter are equal on both ranks and differ from the start; the frozen teacher is
    equal on both ranks, unchanged by training and equal to the teacher on disk."""
    import torch

    from ds_distil.modeling import load_masked_lm
    from multinode_probe import checksums

    cfg = small_run("probe", steps=3, precision=precision, zero_stage=zero_stage, micro_batch=2, lr=5e-3)
    probe_out = tmp_path / "checksums"
    done = run_bounded(deepspeed_local(2, [str(PROBE), str(cfg), str(probe_out)]), env=deepspeed_ops,
                       timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, done.tail(80)
    records = [json.loads((probe_out / f"rank{r}.json").read_text()) for r in (0, 1)]
    zero, one = records
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    for r in records:
        assert (r["world_size"], r["zero_stage"], r["exit"], r["step"]) == (2, zero_stage, 0, 3), r
        assert r["student_dtype"] == r["teacher_dtype"] == str(dtype), r

    on_disk = checksums(load_masked_lm(str(bert_teacher_dir), dtype=dtype).state_dict().items())
    assert zero["teacher_before"] == one["teacher_before"] == zero["teacher_after"] == one["teacher_after"] == on_disk

    assert zero["student_before"] == one["student_before"]
    assert zero["student_after"] == one["student_after"], \
        sorted(k for k in zero["student_after"] if zero["student_after"][k] != one["student_after"][k])
    changed = [k for k, v in zero["student_after"].items() if v != zero["student_before"][k]]
    # bf16 can round a small update of a weight near 1 (LayerNorm) away; most must move.
    assert len(changed) > len(zero["student_after"]) / 2, changed
    assert any("word_embeddings" in k for k in changed), changed


# ------------------------------------------------------------------- MPI and pdsh

@pytest.mark.cluster
def test_mpirun_two_ranks_trains(small_run, deepspeed_ops, recorder, tmp_path):
    """Open MPI's mpirun starts the trainer; it maps OMPI_COMM_WORLD_* to its ranks."""
    cfg = small_run("mpi")
    done = run_mpirun(2, [str(recorder.script), "--config", str(cfg)], env=deepspeed_ops, flavour="openmpi",
                      timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, done.tail(80)
    assert batch_line(4, 1, 2, 8) in done.output
    assert [rank for rank, *_ in recorder.ranks()] == [0, 1]
    assert train_steps(tmp_path / "mpi") == [1, 2, 3]
    assert checkpoint_state(tmp_path / "mpi")[1]["world_size"] == 2


@pytest.mark.cluster
def test_deepspeed_pdsh_runner_trains_on_two_hosts(ssh_loopback, small_run, deepspeed_ops, recorder, tmp_path):
    """`deepspeed --hostfile` (pdsh over ssh to node-a and node-b): one trainer per host.
    The runner is never signalled (it would `pkill -f` its command line on every host)."""
    cfg = small_run("pdsh")
    done = run_deepspeed_pdsh(ssh_loopback, [str(recorder.script), "--config", str(cfg)], tmp_path / "work",
                              env=deepspeed_ops, deepspeed_args=("--no_python", "--no_local_rank"),
                              timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, done.tail(80)
    assert batch_line(4, 1, 2, 8) in done.output
    assert [(rank, cross) for rank, _, cross, _ in recorder.ranks()] == [(0, "0"), (1, "1")]
    assert train_steps(tmp_path / "pdsh") == [1, 2, 3]
    assert checkpoint_state(tmp_path / "pdsh")[1]["world_size"] == 2
