"""`ds-distil bench` for real, and the fast step against the reference formulation it times."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import child_env
from ds_distil import bench
from ds_distil.config import LossConfig

SMALL = bench.PRESETS["small"]
PER_FORMULATION = {"steps", "tokens_per_step", "tokens_per_s", "tokens_per_s_min", "tokens_per_s_max", "step_s",
                   "step_s_min", "step_s_max", "step_seconds", "step_tokens", "teacher_s", "teacher_share",
                   "student_share", "teacher_flop_share", "tflops", "teacher_tflops", "student_tflops",
                   "peak_mem_gib", "precision", "mfu", "load"}


def _bench_command(*args: str) -> list[str]:
    """The real CLI once `bench` is registered in ds_distil.cli; the module's own argparse entry until then."""
    from ds_distil.cli import SUBCOMMANDS

    if any(name == "bench" for name, *_ in SUBCOMMANDS):
        return [sys.executable, "-m", "ds_distil", "bench", *args]
    return [sys.executable, "-m", "ds_distil.bench", *args]


def _run_bench(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "bench.json"
    proc = subprocess.run(_bench_command("--preset", "small", "--steps", "2", "--json", str(out), *args),
                          env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_small_preset_through_the_cli_reports_every_field(tmp_path):
    proc, result = _run_bench(tmp_path, "--steps", "3", "--gpus", "4")
    assert set(result) >= {"machine", "settings", "model", "matmul_peak_tflops", "matmul_tflops_by_size", "busy",
                           "load", "ds-distil", "reference", "speedup", "projection"}
    assert set(result["machine"]) >= {"device", "cpu", "threads", "torch", "deepspeed", "transformers", "date"}
    assert result["model"]["attention"] == {"teacher": "sdpa", "student": "sdpa"}
    # The peak is the best over several sizes (and repeats, before and after the steps).
    peaks, by_size = result["matmul_peak_tflops"], result["matmul_tflops_by_size"]
    assert set(peaks) == set(by_size) == {"bf16", "fp32"}
    for p, sizes in by_size.items():
        assert set(sizes) == {"512", "1024", "2048"} and peaks[p] == max(sizes.values()) > 0
    for name in ("ds-distil", "reference"):
        r = result[name]
        assert set(r) >= PER_FORMULATION, PER_FORMULATION - set(r)
        assert r["steps"] == 3 == len(r["step_seconds"]) == len(r["step_tokens"]) and r["peak_mem_gib"] > 0
        # Medians over the timed steps, with their spread.
        rates = sorted(n / t for n, t in zip(r["step_tokens"], r["step_seconds"]))
        assert r["tokens_per_s"] == pytest.approx(rates[1], rel=1e-9)
        assert (r["tokens_per_s_min"], r["tokens_per_s_max"]) == pytest.approx((rates[0], rates[-1]), rel=1e-9)
        assert r["step_s"] == pytest.approx(sorted(r["step_seconds"])[1], rel=1e-9)
        assert r["step_s_min"] <= r["step_s"] <= r["step_s_max"]
        assert r["tokens_per_step"] == pytest.approx(sum(r["step_tokens"]) / 3)
        assert 0 < r["teacher_share"] < 1 and r["teacher_share"] + r["student_share"] == pytest.approx(1.0)
        assert 0 < r["teacher_flop_share"] < 1
        assert r["load"]["seconds"] > 0 and r["load"]["other_cores"] >= 0
        for p, peak in peaks.items():
            assert r["mfu"][p] == pytest.approx(r["tflops"] / peak, rel=1e-6)
    assert result["ds-distil"]["precision"] == "bf16" and result["reference"]["precision"] == "fp32"
    # Same batches and the same FLOP count for both: the ratio of TFLOP/s is the speed ratio.
    assert result["ds-distil"]["step_tokens"] == result["reference"]["step_tokens"]
    assert result["ds-distil"]["teacher_flop_share"] == result["reference"]["teacher_flop_share"]
    assert result["speedup"] == pytest.approx(result["ds-distil"]["tokens_per_s"] / result["reference"]["tokens_per_s"])
    assert result["model"]["student_parameters"] < result["model"]["teacher_parameters"]
    # The load verdict covers every phase; on a shared test machine it may go either way.
    load = result["load"]
    assert set(load["phases"]) == {"the peak before", "ds-distil", "reference", "the peak after", "the whole run"}
    assert result["busy"] is load["busy"] and load["busy"] in (True, False)
    # The projection: 3 epochs x 4.3 B tokens over 4 devices at the measured tokens/s per device.
    projection = result["projection"]
    assert projection["devices"] == 4 and projection["tokens"] == 3 * 4.3e9
    assert projection["tokens_per_s_per_device"] == result["ds-distil"]["tokens_per_s"]
    assert projection["hours"] == pytest.approx(3 * 4.3e9 / (4 * result["ds-distil"]["tokens_per_s"]) / 3600)
    # The table on stdout.
    assert "speed-up (tokens/s, ds-distil / reference)" in proc.stdout
    assert "MFU vs bf16 peak" in proc.stdout and "tokens/s min-max" in proc.stdout
    assert "projected full run (3 epochs x 4.3 B tokens = 12.9 B tokens) on 4 x cpu" in proc.stdout
    assert ("BUSY MACHINE: not a valid measurement" in proc.stdout) == result["busy"]


@pytest.mark.slow
def test_a_busy_machine_is_reported_and_no_number_is_final(tmp_path):
    """Processes spinning on every core during the run: the bench must say so on every claim."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        proc, result = _run_bench(tmp_path, "--only", "ds-distil")
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert result["busy"] is True
    assert result["load"]["other_cores"] > result["load"]["allowed_other_cores"]
    assert result["projection"]["busy"] is True
    mfu_lines = [line for line in proc.stdout.splitlines() if line.startswith("MFU vs ")]
    assert mfu_lines and all(line.endswith("[BUSY MACHINE: not a valid measurement]") for line in mfu_lines)
    projected = [line for line in proc.stdout.splitlines() if line.startswith("projected full run")]
    assert len(projected) == 1 and projected[0].endswith("[BUSY MACHINE: not a valid measurement]")
    assert "machine load: BUSY MACHINE: not a valid measurement: other processes kept" in proc.stdout
    assert proc.stdout.rstrip().endswith("Rerun on an idle machine (--wait-idle SECONDS waits for one).")


def test_load_verdict_judges_every_long_phase():
    allowed = bench.allowed_other_cores(threads=os.cpu_count())
    assert allowed == bench.BUSY_MARGIN_CORES  # every core in use: others may use only the margin
    quiet = {"a": {"seconds": 5.0, "other_cores": 0.05}, "b": {"seconds": 5.0, "other_cores": 0.1}}
    assert bench.judge_load(quiet, os.cpu_count())["busy"] is False
    burst = {**quiet, "c": {"seconds": 2.0, "other_cores": 1.0}}
    verdict = bench.judge_load(burst, os.cpu_count())
    assert verdict["busy"] is True and verdict["worst_phase"] == "c"
    # A phase too short for /proc/stat's ticks is judged within the longer ones only.
    blip = {**quiet, "d": {"seconds": 0.05, "other_cores": 3.0}}
    assert bench.judge_load(blip, os.cpu_count())["busy"] is False
    assert bench.judge_load({"a": {"seconds": 5.0, "other_cores": None}}, 1)["busy"] is None
    # Another process holding GPU memory makes a GPU run busy whatever the CPUs did.
    assert bench.judge_load(quiet, 1, gpu_other_gib=10.0)["busy"] is True


def test_machine_load_sees_another_process_spinning():
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # past the interpreter's start
        with bench.MachineLoad() as load:
            time.sleep(1.5)
    finally:
        hog.kill()
        hog.wait()
    assert load.seconds >= 1.5
    assert load.other_cores > 0.5  # the spinning process, though it shares the cores with others


@pytest.mark.slow
def test_zero3_and_the_sweeps_run_in_child_processes(tmp_path):
    # ZeRO-3 partitions the tied vocabulary projection: the loss takes its ZeRO-3 path.
    _, result = _run_bench(tmp_path, "--only", "ds-distil", "--zero-stage", "3", "--zero-stages", "0",
                           "--seq-lens", "32", "--micro-batches", "16,4")
    assert "reference" not in result and "speedup" not in result
    assert result["ds-distil"]["deepspeed_config"]["zero_optimization"]["stage"] == 3
    (sweep_len,), (sweep_zero,) = result["seq_len_sweep"], result["zero_sweep"]
    assert sweep_len["seq_len"] == 32 and sweep_len["micro_batch"] == 2 * SMALL.micro_batch  # tokens held
    assert sweep_zero["zero_stage"] == 0 and sweep_zero["peak_mem_gib"] > 0 and sweep_zero["step_s"] > 0
    # The micro-batch sweep: increasing sizes, each fits on the CPU, tokens/s per size.
    rows = result["micro_batch_sweep"]
    assert [r["micro_batch"] for r in rows] == [4, 16] and all(r["fits"] for r in rows)
    assert all(r["tokens_per_s_min"] <= r["tokens_per_s"] <= r["tokens_per_s_max"] for r in rows)
    assert rows[1]["tokens_per_step"] > 2 * rows[0]["tokens_per_step"]
    # The projection uses the best tokens/s per device among the main run and the sweep.
    best = max([result["ds-distil"]["tokens_per_s"], *(r["tokens_per_s"] for r in rows)])
    assert result["projection"]["tokens_per_s_per_device"] == best and result["projection"]["devices"] == 8


# A real out-of-memory: the bench runs under an address-space limit its children inherit
# (about 1 GiB is what a one-thread bench of the small preset maps; the limit leaves 2 more).
_LIMITED_BENCH = """
import resource, sys
limit = 3 * 2**30
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from ds_distil.cli import main
raise SystemExit(main(["bench", *sys.argv[1:]]))
"""


@pytest.mark.slow
def test_micro_batch_sweep_stops_at_the_first_size_out_of_memory(tmp_path):
    out = tmp_path / "bench.json"
    env = {**child_env(), "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}  # a predictable address space
    proc = subprocess.run([sys.executable, "-c", _LIMITED_BENCH, "--preset", "small", "--only", "ds-distil",
                           "--seq-len", "512", "--micro-batch", "1", "--steps", "1", "--warmup", "0",
                           "--micro-batches", "4096,1024", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    # 1024 sequences of up to 512 tokens do not fit in 3 GiB: 4096 is never tried.
    assert result["micro_batch_sweep"] == [{"seq_len": 512, "micro_batch": 1024, "zero_stage": 0, "fits": False}]
    assert "   1024  out of memory" in proc.stdout
    # The projection falls back on the main measurement, which fitted.
    assert result["projection"]["micro_batch"] == 1
    assert result["projection"]["tokens_per_s_per_device"] == result["ds-distil"]["tokens_per_s"]


@pytest.mark.parametrize("flags, message", [
    (["--seq-len", "5000"], "sequence length 5000: must be in 16..512 (the models' positions)"),
    (["--gpus", "0"], "--gpus 0: must be >= 1"),
    (["--micro-batches", "8,0"], "--micro-batches 8,0: every micro-batch must be >= 1"),
    (["--micro-batches", "8,x"], "--micro-batches '8,x': expected comma-separated integers, e.g. 64,128,256"),
    (["--wait-idle", "-1"], "--wait-idle -1.0: give seconds >= 0 (0: measure at once)"),
])
def test_bad_flags_are_one_line_errors(flags, message):
    proc = subprocess.run(_bench_command("--preset", "small", *flags), env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"ds-distil bench: error: {message}"


# ---------------------------------------------------------------------- the prepared GPU script

GPU_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_bench.sh"


def _gpu_script_commands(out_dir) -> list[list[str]]:
    proc = subprocess.run(["bash", str(GPU_SCRIPT), "--dry-run", str(out_dir)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines)
    return [shlex.split(line[2:]) for line in lines]


def test_gpu_script_commands_are_valid_bench_invocations(tmp_path):
    from ds_distil.cli import build_parser
    from ds_distil.ds_config import load_ds_config

    commands = _gpu_script_commands(tmp_path / "out dir")
    runs = set()
    for argv in commands:
        assert argv[:4] == [sys.executable, "-m", "ds_distil", "bench"]
        args = build_parser().parse_args(argv[3:])  # the real CLI parser
        settings = bench.resolve_settings(args)  # and the bench's own checks
        assert settings["preset"] == "base" and Path(args.json).parent == tmp_path / "out dir"
        assert settings["micro_batch"] in settings["micro_batches"]
        runs.add((settings["precision"], settings["seq_len"]))
        if settings["seq_len"] == 128:
            # The sweep at length 128 covers the micro-batches the shipped GPU configs use.
            for name in ("fp16_zero1", "fp16_zero2", "bf16_zero2", "bf16_zero3"):
                cfg = load_ds_config(Path(bench.__file__).parent.parent / "ds_configs" / f"{name}.json")
                assert cfg["train_micro_batch_size_per_gpu"] in settings["micro_batches"], name
            assert settings["formulations"] == ["ds-distil", "reference"]  # the speed-up
    assert runs == {("bf16", 128), ("bf16", 512), ("fp16", 128), ("fp16", 512)}


def test_gpu_script_refuses_a_machine_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the script would run the benchmark")
    proc = subprocess.run(["bash", str(GPU_SCRIPT), str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 2
    assert "gpu_bench.sh: no CUDA GPU visible" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing measured, nothing written


# ---------------------------------------------------------------------- fast step == reference


def _models(dropout_off: bool = True):
    teacher = bench.build_teacher(SMALL).eval().requires_grad_(False)
    student = bench.build_student(SMALL)
    if dropout_off:  # the two formulations draw dropout masks differently
        for module in student.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    return teacher, student


def _batch(seed: int = 0, micro_batch: int = 6):
    return bench.synthetic_batches(SMALL, SMALL.seq_len, micro_batch, 1, seed=seed)[0]


def _reference_grads(teacher, student, batch, loss_cfg):
    student.zero_grad(set_to_none=True)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():
        t = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    s = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    terms = bench.reference_losses(s.logits, t.logits, s.hidden_states[-1], t.hidden_states[-1], mask, labels,
                                   loss_cfg.temperature, loss_cfg.ce_positions)
    total = loss_cfg.alpha_ce * terms["ce"] + loss_cfg.alpha_mlm * terms["mlm"] + loss_cfg.alpha_cos * terms["cos"]
    total.backward()
    return {k: float(v.detach()) for k, v in terms.items()}, {n: p.grad.clone() for n, p in student.named_parameters()}


def _fast_grads(teacher, student, batch, loss_cfg):
    """ds-distil's formulation: DistillStep's row selection and teacher pass, StudentObjective, global counts."""
    from ds_distil.losses import LossWeights, weighted_total
    from ds_distil.modeling import StudentObjective
    from ds_distil.trainer import DistillStep

    student.zero_grad(set_to_none=True)
    step = DistillStep(None, teacher, loss_cfg, torch.device("cpu"), world_size=1, global_batch=len(batch["input_ids"]))
    p = step.prepare(batch)
    teacher_hidden, teacher_logits = step.teacher_outputs(p)
    sums = StudentObjective(student, loss_cfg.temperature)(p["input_ids"], p["attention_mask"], p["rows"],
                                                           p["row_targets"], teacher_hidden, teacher_logits)
    counts = dict(zip(("ce", "mlm", "cos"), p["counts"]))
    weights = LossWeights(loss_cfg.alpha_ce, loss_cfg.alpha_mlm, loss_cfg.alpha_cos, loss_cfg.temperature)
    weighted_total(sums, counts, weights).backward()
    terms = {k: float(sums[k].detach() / counts[k]) for k in ("ce", "mlm", "cos")}
    return terms, {n: p.grad.clone() for n, p in student.named_parameters()}


@pytest.mark.parametrize("ce_positions", ["all", "mlm"])
def test_fast_losses_equal_the_reference_formulation(ce_positions):
    teacher, student = _models()
    batch = _batch()
    assert int((batch["attention_mask"] == 0).sum()) > 0, "the batch should hold padding"
    loss_cfg = LossConfig(ce_positions=ce_positions)
    ref_terms, ref_grads = _reference_grads(teacher, student, batch, loss_cfg)
    fast_terms, fast_grads = _fast_grads(teacher, student, batch, loss_cfg)
    for term in ("ce", "mlm", "cos"):
        assert fast_terms[term] == pytest.approx(ref_terms[term], rel=1e-5, abs=1e-6), term
    assert ref_terms["ce"] > 1e-3 and ref_terms["cos"] > 1e-3  # random teacher and student: terms are not trivial
    assert set(fast_grads) == set(ref_grads)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_ce_positions_change_the_loss():
    """The two L_ce variants differ, so the parametrised equality above tests both for real."""
    teacher, student = _models()
    batch = _batch()
    all_terms, _ = _reference_grads(teacher, student, batch, LossConfig(ce_positions="all"))
    mlm_terms, _ = _reference_grads(teacher, student, batch, LossConfig(ce_positions="mlm"))
    assert all_terms["ce"] != pytest.approx(mlm_terms["ce"], rel=1e-3)


def test_engine_step_equals_the_reference_step(monkeypatch):
    """One fp32 DeepSpeed step of ds-distil and one reference step give the same student."""
    import deepspeed

    from ds_distil.distributed import free_port, setup_distributed, teardown_distributed
    from ds_distil.modeling import StudentObjective
    from ds_distil.trainer import DistillStep, StepTotals

    world = dict(RANK=0, LOCAL_RANK=0, WORLD_SIZE=1, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    for key, value in world.items():  # a world of one, restored after the test
        monkeypatch.setenv(key, str(value))
    loss_cfg = LossConfig()
    batches = [_batch(seed=s) for s in (1, 2)]
    teacher, ref_student = _models()
    _, ds_student = _models()
    ref = bench.ReferenceStep(teacher, ref_student, loss_cfg, torch.device("cpu"))
    config = bench.ds_config(len(batches[0]["input_ids"]), zero_stage=0, precision="fp32")
    config["optimizer"]["params"].pop("fused")  # the reference's torch AdamW is the for-loop one
    setup_distributed()
    try:
        model = StudentObjective(ds_student, loss_cfg.temperature)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
        step = DistillStep(engine, teacher, loss_cfg, torch.device("cpu"), world_size=1,
                           global_batch=len(batches[0]["input_ids"]))
        for batch in batches:
            ref(batch)
            step([batch], StepTotals(sums=torch.zeros(4), counts=torch.zeros(3, dtype=torch.float64)))
        ref_params = dict(ref_student.named_parameters())
        initial = _models()[1]
        moved = 0
        for name, param in ds_student.named_parameters():
            torch.testing.assert_close(param, ref_params[name], rtol=1e-4, atol=2e-6, msg=name)
            moved += int(not torch.equal(param, initial.get_parameter(name)))
        assert moved > 0.9 * len(ref_params)  # both really stepped
        engine.destroy()
    finally:
        teardown_distributed()
