"""The trainer for real: child processes running `ds-distil train` on tiny models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import child_env
from runs import losses_by_step, metrics, train, write_ds_config, write_run_config

EXPECTED_TAGS = {"Train/loss", "Train/loss_ce", "Train/loss_mlm", "Train/loss_cos", "Train/lr", "Train/grad_norm",
                 "Train/tokens_per_s", "Train/sequences_per_s", "Train/teacher_share", "Train/peak_mem_gib",
                 "Train/skipped_steps", "Train/mfu", "Train/tflops_teacher", "Train/tflops_student",
                 "Eval/mlm_accuracy", "Eval/perplexity"}


@pytest.fixture(scope="module")
def student_without_dropout(tmp_path_factory, student_dir):
    """The student with dropout off: data-parallel runs can then match a single rank exactly
    (dropout draws depend on the rank's RNG stream)."""
    import shutil

    out = tmp_path_factory.mktemp("nodrop") / "student"
    shutil.copytree(student_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(dropout=0.0, attention_dropout=0.0)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture()
def distil_config(tmp_path, student_dir, bert_teacher_dir, prepared_dir):
    def make(name="run", steps=10, precision="fp32", zero_stage=0, ranks=1, global_batch=8, micro_batch=None,
             total_steps="auto", lr=1e-3, student=student_dir, **kw):
        ds = write_ds_config(tmp_path / f"{name}_ds.json", precision=precision, zero_stage=zero_stage, lr=lr,
                             global_batch=global_batch, micro_batch=micro_batch or global_batch // ranks,
                             total_steps=total_steps, warmup_steps=2 if total_steps != "auto" else "auto")
        return write_run_config(tmp_path / f"{name}.json", student=student, teacher=bert_teacher_dir,
                                data=prepared_dir, ds_config=ds, output_dir=tmp_path / name, steps=steps, **kw)
    return make


def test_distillation_loss_falls_and_every_term_is_logged(distil_config, tmp_path):
    cfg = distil_config(steps=30, precision="bf16", log_interval=5, lr=1e-2)
    result = train(cfg)
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    # The MLM term falls towards the corpus' unigram entropy (random teacher: L_ce and
    # L_cos start near 0 for a student cut from it and stay small).
    assert rows[-1]["loss_mlm"] < 0.95 * rows[0]["loss_mlm"], [r["loss_mlm"] for r in rows]
    assert rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]
    for r in rows:
        assert set(r) >= {"loss_ce", "loss_mlm", "loss_cos", "lr", "tokens_per_s", "teacher_share"}
        assert r["loss"] == pytest.approx(5 * r["loss_ce"] + 2 * r["loss_mlm"] + 1 * r["loss_cos"], rel=1e-6)
        assert 0 < r["teacher_share"] < 1
    # Model FLOP/s and MFU on every log line; teacher forward and student forward+backward
    # split as the models' configs and the data's lengths say (L_ce at every real token).
    from ds_distil import metrics as flops

    run_cfg = json.loads((tmp_path / "run" / "run_config.json").read_text())
    shapes = {role: flops.ModelShape.of(json.loads((Path(run_cfg[role]) / "config.json").read_text()))
              for role in ("student", "teacher")}
    length = flops.attention_length(json.loads((Path(run_cfg["data"]) / "meta.json").read_text()))
    per_token = flops.distill_flops_per_token(shapes["student"], shapes["teacher"], length, 1.0)
    for r in rows:
        assert r["mfu"] > 0 and r["tflops_student"] > 0
        assert r["tflops_teacher"] / r["tflops_student"] == pytest.approx(per_token["teacher"] / per_token["student"])
    assert "MFU" in result.stdout
    assert "batch: 8 sequences/micro-batch x 1 accumulation x 1 ranks = 8 sequences/step" in result.stdout
    # The resolved configs are written with the run and into the checkpoint.
    out = tmp_path / "run"
    assert json.loads((out / "run_config.json").read_text())["loss"]["alpha_ce"] == 5.0
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["scheduler"]["params"]["total_num_steps"] == 30
    assert ds["scheduler"]["params"]["warmup_num_steps"] == 2  # ceil(5% of 30)
    state = json.loads((out / "checkpoints" / "global_step30" / "ds_distil_state.json").read_text())
    assert state["run_config"]["train"]["max_steps"] == 30 and state["ds_config"]["zero_optimization"]["stage"] == 0
    # TensorBoard events hold every expected tag (read back with tensorboard's reader).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_dirs = [p.parent for p in (out / "tensorboard").rglob("events.out.tfevents.*")]
    assert event_dirs, "no TensorBoard event file written"
    tags = set()
    for d in event_dirs:
        acc = EventAccumulator(str(d))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert EXPECTED_TAGS <= tags, EXPECTED_TAGS - tags


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, student_dir, bert_teacher_dir, prepared_dir) -> Path:
    """8 steps of fp32 ZeRO-2 distillation, student dropout on, a checkpoint every 4 steps
    (kept: global_step4, global_step8); the schedule's length (8) is fixed in the DeepSpeed
    JSON. The resume test's reference and the export test's checkpoint. Returns its config."""
    root = tmp_path_factory.mktemp("full_run")
    ds = write_ds_config(root / "full_ds.json", zero_stage=2, total_steps=8, warmup_steps=2)
    cfg = write_run_config(root / "full.json", student=student_dir, teacher=bert_teacher_dir, data=prepared_dir,
                           ds_config=ds, output_dir=root / "full", steps=8, checkpoint_interval=4)
    train(cfg)
    assert sorted(losses_by_step(root / "full")) == list(range(1, 9))
    return cfg


def test_resume_continues_exactly(full_run, distil_config, tmp_path):
    import shutil

    # A run of 4 steps (same schedule) whose output_dir holds the full run's step-4
    # checkpoint, continued to step 8: the restored optimizer, data position and RNG state
    # (student dropout is on) must give the full run's steps 5-8 exactly.
    full = Path(json.loads(full_run.read_text())["output_dir"])
    part = distil_config("part", steps=4, total_steps=8, zero_stage=2)
    (tmp_path / "part" / "checkpoints").mkdir(parents=True)
    for name in ("global_step4", "student_hf"):
        shutil.copytree(full / "checkpoints" / name, tmp_path / "part" / "checkpoints" / name)
    (tmp_path / "part" / "checkpoints" / "latest").write_text("global_step4")
    resumed = train(part, "train.max_steps=8")
    assert f"resumed from {tmp_path / 'part' / 'checkpoints' / 'global_step4'} at step 4" in resumed.stdout
    expected, got = losses_by_step(full), losses_by_step(tmp_path / "part")
    assert sorted(got) == list(range(5, 9))
    assert [got[s] for s in range(5, 9)] == [expected[s] for s in range(5, 9)]  # identical in fp32


def test_export_round_trip_equals_the_engine(full_run, tmp_path):
    cfg = full_run  # ZeRO-2, latest checkpoint global_step8
    out = tmp_path / "exported"
    subprocess.run([sys.executable, "-m", "ds_distil", "export", "--checkpoint",
                    json.loads(cfg.read_text())["output_dir"], "--output", str(out)],
                   check=True, env=child_env(), capture_output=True)
    # The engine's logits: rebuild the engine from the checkpoint in a fresh process.
    probe = tmp_path / "engine_logits.py"
    probe.write_text(ENGINE_LOGITS_SCRIPT)
    logits_file = tmp_path / "engine_logits.pt"
    subprocess.run([sys.executable, str(probe), str(cfg), str(logits_file)], check=True, env=child_env(),
                   capture_output=True)
    engine_out = torch.load(logits_file)
    # The exported model, loaded by transformers alone: the engine's weights bit for bit,
    # hence its logits (up to kernel-choice rounding between two processes).
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(str(out)).eval()
    exported_weights = model.state_dict()
    assert set(exported_weights) == set(engine_out["weights"])
    for name, tensor in engine_out["weights"].items():
        assert torch.equal(exported_weights[name], tensor), name
    with torch.no_grad():
        exported = model(input_ids=INPUT_IDS, attention_mask=torch.ones_like(INPUT_IDS)).logits
    torch.testing.assert_close(exported, engine_out["logits"], rtol=0, atol=1e-6)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


INPUT_IDS = torch.tensor([[2, 10, 11, 12, 13, 14, 3]])
ENGINE_LOGITS_SCRIPT = f"""
import sys, torch
from ds_distil.config import load_run_config
from ds_distil.distributed import setup_distributed, teardown_distributed
from ds_distil.trainer import Trainer
cfg = load_run_config(sys.argv[1])
trainer = Trainer(cfg, setup_distributed())
assert trainer.resume_tag == "global_step8", trainer.resume_tag
ids = torch.tensor({INPUT_IDS.tolist()})
trainer.engine.eval()
with torch.no_grad():
    logits = trainer.engine.module.student(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
weights = {{k: v.float() for k, v in trainer.engine.module.student.state_dict().items()}}
torch.save({{"logits": logits.float(), "weights": weights}}, sys.argv[2])
teardown_distributed()
"""


@pytest.fixture(scope="module")
def one_rank_losses(tmp_path_factory, student_without_dropout, bert_teacher_dir, prepared_dir) -> dict[int, float]:
    """Per-step losses of one rank x micro-batch 8 (ZeRO-0, fp32): the data-parallel runs'
    reference. One rank computes the same losses at every ZeRO stage (bit for bit at 0-2,
    within 2e-7 relative at 3), so all four stages compare against this one run."""
    root = tmp_path_factory.mktemp("one_rank")
    ds = write_ds_config(root / "ds.json", global_batch=8, micro_batch=8)
    cfg = write_run_config(root / "one.json", student=student_without_dropout, teacher=bert_teacher_dir,
                           data=prepared_dir, ds_config=ds, output_dir=root / "one", steps=4)
    result = train(cfg)
    assert "batch: 8 sequences/micro-batch x 1 accumulation x 1 ranks = 8 sequences/step" in result.stdout
    losses = losses_by_step(root / "one")
    assert sorted(losses) == [1, 2, 3, 4]
    return losses


@pytest.mark.distributed
@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_deepspeed_launcher_two_ranks_matches_one_rank(distil_config, tmp_path, zero_stage, student_without_dropout,
                                                       one_rank_losses):
    """Data-parallel equivalence: 1 rank x micro 8 == 2 ranks x micro 4 (at every ZeRO stage)
    == 1 rank x 4 x 2 accumulation."""
    student = student_without_dropout
    a = one_rank_losses
    two = distil_config(f"two{zero_stage}", steps=4, zero_stage=zero_stage, global_batch=8, ranks=2,
                        student=student)
    result = train(two, ranks=2)
    assert "x 2 ranks = 8 sequences/step" in result.stdout
    b = losses_by_step(tmp_path / f"two{zero_stage}")
    assert sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a, b)
    if zero_stage == 0:
        accum = distil_config("accum", steps=4, global_batch=8, micro_batch=4, student=student)
        result = train(accum)
        assert "batch: 4 sequences/micro-batch x 2 accumulation x 1 ranks = 8 sequences/step" in result.stdout
        c = losses_by_step(tmp_path / "accum")
        assert sorted(c) == [1, 2, 3, 4]
        for step in a:
            assert c[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6)


def test_plain_mlm_pretraining_without_teacher(tmp_path, bert_teacher_dir, prepared_dir):
    ds = write_ds_config(tmp_path / "ds.json")
    cfg = write_run_config(tmp_path / "mlm.json", student=bert_teacher_dir, data=prepared_dir, ds_config=ds,
                           output_dir=tmp_path / "mlm", steps=4)
    train(cfg)
    rows = metrics(tmp_path / "mlm")
    assert all("loss_ce" not in r and "loss_cos" not in r for r in rows)
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["loss_mlm"])
    assert metrics(tmp_path / "mlm", "Eval")[-1]["targets"] > 0


def test_config_errors_are_reported_together_without_traceback(tmp_path, student_dir, prepared_dir):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"student": str(student_dir), "data": str(prepared_dir),
                               "deepspeed_config": str(tmp_path / "missing_ds.json"), "output_dir": str(tmp_path / "o"),
                               "loss": {"alpha_cee": 1.0, "temperature": 0},
                               "masking": {"mask_fraction": 0.5}}))
    result = subprocess.run([sys.executable, "-m", "ds_distil", "train", "--config", str(bad)],
                            capture_output=True, text=True, env=child_env())
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    err = result.stderr
    assert "loss.alpha_cee: unknown key (did you mean loss.alpha_ce?)" in err
    assert "loss.temperature: 0.0 must be > 0" in err
    assert "mask_fraction + random_fraction + keep_fraction = 0.7" in err
    assert "deepspeed_config:" in err and "does not exist" in err
    assert all(line.startswith(f"ds-distil train: error: {bad}: ") for line in err.strip().splitlines())
