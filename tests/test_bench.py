"""`ds-distil bench` for real, and the fast step against the reference formulation it times."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import child_env
from ds_distil import bench
from ds_distil.config import LossConfig

SMALL = bench.PRESETS["small"]
PER_FORMULATION = {"steps", "tokens_per_step", "tokens_per_s", "step_s", "teacher_s", "teacher_share",
                   "student_share", "teacher_flop_share", "tflops", "teacher_tflops", "student_tflops",
                   "peak_mem_gib", "precision", "mfu"}


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
    proc, result = _run_bench(tmp_path)
    assert set(result) >= {"machine", "settings", "model", "matmul_peak_tflops", "ds-distil", "reference", "speedup"}
    assert set(result["machine"]) >= {"device", "cpu", "threads", "torch", "deepspeed", "transformers", "date"}
    peaks = result["matmul_peak_tflops"]
    assert set(peaks) == {"bf16", "fp32"} and all(v > 0 for v in peaks.values())
    for name in ("ds-distil", "reference"):
        r = result[name]
        assert set(r) >= PER_FORMULATION, PER_FORMULATION - set(r)
        assert r["steps"] == 2 and r["tokens_per_s"] > 0 and r["step_s"] > 0 and r["peak_mem_gib"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / r["step_s"], rel=1e-6)
        assert 0 < r["teacher_share"] < 1 and r["teacher_share"] + r["student_share"] == pytest.approx(1.0)
        assert 0 < r["teacher_flop_share"] < 1
        for p, peak in peaks.items():
            assert r["mfu"][p] == pytest.approx(r["tflops"] / peak, rel=1e-6)
    assert result["ds-distil"]["precision"] == "bf16" and result["reference"]["precision"] == "fp32"
    # Same batches and the same FLOP count for both: the ratio of TFLOP/s is the speed ratio.
    assert result["ds-distil"]["tokens_per_step"] == result["reference"]["tokens_per_step"]
    assert result["ds-distil"]["teacher_flop_share"] == result["reference"]["teacher_flop_share"]
    assert result["speedup"] == pytest.approx(result["ds-distil"]["tokens_per_s"] / result["reference"]["tokens_per_s"])
    assert result["model"]["student_parameters"] < result["model"]["teacher_parameters"]
    # The table on stdout.
    assert "speed-up (tokens/s, ds-distil / reference)" in proc.stdout
    assert "MFU vs bf16 peak" in proc.stdout


@pytest.mark.slow
def test_zero3_and_the_sweeps_run_in_child_processes(tmp_path):
    # ZeRO-3 partitions the tied vocabulary projection: the loss takes its ZeRO-3 path.
    _, result = _run_bench(tmp_path, "--only", "ds-distil", "--zero-stage", "3", "--zero-stages", "0",
                           "--seq-lens", "32")
    assert "reference" not in result and "speedup" not in result
    assert result["ds-distil"]["deepspeed_config"]["zero_optimization"]["stage"] == 3
    (sweep_len,), (sweep_zero,) = result["seq_len_sweep"], result["zero_sweep"]
    assert sweep_len["seq_len"] == 32 and sweep_len["micro_batch"] == 2 * SMALL.micro_batch  # tokens held
    assert sweep_zero["zero_stage"] == 0 and sweep_zero["peak_mem_gib"] > 0 and sweep_zero["step_s"] > 0


def test_bad_flags_are_one_line_errors(tmp_path):
    proc = subprocess.run(_bench_command("--preset", "small", "--seq-len", "5000"), env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("ds-distil bench: error: sequence length 5000: must be in 16..512 "
                                   "(the models' positions)")


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
