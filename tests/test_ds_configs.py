"""The shipped DeepSpeed configs, parsed by DeepSpeed itself, and ds_distil.ds_config's checks."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ds_distil.ds_config import (REMOVED_TOP_LEVEL_KEYS, batch_arithmetic, check_precision_supported,
                                 load_ds_config, precision, resolve_run_values, validate_with_deepspeed)
from ds_distil.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"
GPU_CONFIGS = {  # name -> (precision, ZeRO stage)
    "fp16_zero1.json": ("fp16", 1),
    "fp16_zero2.json": ("fp16", 2),
    "bf16_zero2.json": ("bf16", 2),
    "bf16_zero3.json": ("bf16", 3),
}
CPU_CONFIG = "cpu_bf16.json"
# World sizes the scripts and the README target: 1 GPU, 1/2/4/8 nodes of 8 GPUs.
TARGETS = [(name, world) for name in GPU_CONFIGS for world in (1, 8, 16, 32, 64)] + \
          [(CPU_CONFIG, world) for world in (1, 2, 4)]


def test_the_expected_configs_are_shipped():
    assert sorted(p.name for p in CONFIG_DIR.glob("*.json")) == sorted([*GPU_CONFIGS, CPU_CONFIG])


@pytest.mark.parametrize("name, world", TARGETS)
def test_deepspeed_accepts_each_config_at_each_target_world_size(name, world):
    path = CONFIG_DIR / name
    cfg = load_ds_config(path)
    ds = validate_with_deepspeed(cfg, world, path)
    ours = batch_arithmetic(cfg, world, path)
    # DeepSpeed's own derivation agrees with ours, and holds exactly.
    assert (ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps, ds.train_batch_size) == \
           (ours["micro_batch"], ours["accumulation_steps"], ours["global_batch"])
    assert ours["micro_batch"] * ours["accumulation_steps"] * world == ours["global_batch"]
    assert ours["global_batch"] == (32 if name == CPU_CONFIG else 4096)


@pytest.mark.parametrize("name", [*GPU_CONFIGS, CPU_CONFIG])
def test_each_config_follows_the_recipe(name):
    cfg = load_ds_config(CONFIG_DIR / name)
    assert "gradient_accumulation_steps" not in cfg  # derived from the world size
    assert cfg["optimizer"]["type"] == "AdamW"
    params = {k: v for k, v in cfg["optimizer"]["params"].items() if k != "torch_adam"}
    assert params == {"lr": 5e-4, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.0}
    assert cfg["scheduler"] == {"type": "WarmupDecayLR", "params": {
        "warmup_min_lr": 0.0, "warmup_max_lr": 5e-4, "warmup_num_steps": "auto",
        "total_num_steps": "auto", "warmup_type": "linear"}}
    assert cfg["gradient_clipping"] == 5.0
    assert cfg["tensorboard"]["enabled"] is True and {"output_path", "job_name"} <= set(cfg["tensorboard"])
    expected = GPU_CONFIGS.get(name, ("bf16", 1))
    assert (precision(cfg), cfg["zero_optimization"]["stage"]) == expected
    if precision(cfg) == "fp16":
        assert cfg["fp16"]["loss_scale"] == 0  # 0 = dynamic loss scaling


def test_readme_batch_table_matches_the_configs():
    readme = (CONFIG_DIR / "README.md").read_text()
    rows = re.findall(r"^\| `(\w+\.json)` \| (\d+ x \d+ x 8) \| (\d+ x \d+ x 16) \| (\d+ x \d+ x 32) "
                      r"\| (\d+ x \d+ x 64) \| (\d+) GPUs", readme, re.M)
    assert sorted(r[0] for r in rows) == sorted(GPU_CONFIGS)
    for name, *cells, largest in rows:
        cfg = load_ds_config(CONFIG_DIR / name)
        for cell, gpus in zip(cells, (8, 16, 32, 64)):
            b = batch_arithmetic(cfg, gpus)
            assert cell == f"{b['micro_batch']} x {b['accumulation_steps']} x {gpus}", (name, cell)
        largest = int(largest)
        batch_arithmetic(cfg, largest)
        with pytest.raises(UserError):
            batch_arithmetic(cfg, largest * 2)


def test_fp16_is_refused_on_the_cpu_accelerator_naming_the_file_and_the_cpu_config():
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        pytest.skip("this check is about the CPU accelerator; a GPU accepts fp16")
    path = CONFIG_DIR / "fp16_zero1.json"
    with pytest.raises(UserError, match=r"fp16_zero1\.json: fp16 is not supported on this device \(cpu\)"
                                        r".*cpu_bf16\.json"):
        check_precision_supported(load_ds_config(path), path)
    assert check_precision_supported(load_ds_config(CONFIG_DIR / CPU_CONFIG)) == "bf16"


# ------------------------------------------------------------------- loading errors

def write(tmp_path: Path, text: str, name: str = "ds.json") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def base_config(**extra) -> dict:
    return {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8, **extra}


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(UserError, match=r"nope\.json: DeepSpeed config not found"):
        load_ds_config(tmp_path / "nope.json")


def test_invalid_json_names_line_and_column(tmp_path):
    path = write(tmp_path, '{\n  "train_batch_size": 64,\n  "fp16": {"enabled": true,}\n}\n')
    with pytest.raises(UserError, match=r"ds\.json:3:\d+: invalid JSON"):
        load_ds_config(path)


def test_duplicate_keys_are_refused(tmp_path):
    path = write(tmp_path, '{"train_batch_size": 64, "train_batch_size": 128}')
    with pytest.raises(UserError, match="key 'train_batch_size' appears twice"):
        load_ds_config(path)


@pytest.mark.parametrize("key", ["compression_training", "amp", "sparse_gradients", "elasticity",
                                 "progressive_layer_drop", "curriculum_learning"])
def test_keys_removed_in_deepspeed_019_are_named_as_such(tmp_path, key):
    path = write(tmp_path, json.dumps(base_config(**{key: {"enabled": True}})))
    with pytest.raises(UserError, match=f"'{key}' was removed in DeepSpeed 0.19.x"):
        load_ds_config(path)
    # DeepSpeed itself rejects them too: the list is not stricter than DeepSpeed.
    with pytest.raises(UserError, match="DeepSpeed rejects this config"):
        validate_with_deepspeed(base_config(**{key: {"enabled": True}}), 1, path)


def test_our_removed_keys_cover_deepspeeds_own_list():
    from deepspeed.runtime import config as ds_config_module

    assert set(ds_config_module._REMOVED_TOP_LEVEL_CONFIG_KEYS) <= set(REMOVED_TOP_LEVEL_KEYS)


def test_max_grad_norm_in_the_optimizer_points_to_gradient_clipping(tmp_path):
    cfg = base_config(optimizer={"type": "AdamW", "params": {"lr": 1e-3, "max_grad_norm": 1.0}})
    with pytest.raises(UserError, match="optimizer.params.max_grad_norm .*'gradient_clipping'"):
        load_ds_config(write(tmp_path, json.dumps(cfg)))


def test_near_miss_of_a_known_key_is_refused_other_unknown_keys_pass(tmp_path):
    with pytest.raises(UserError, match="unknown key 'gradient_cliping'.*did you mean 'gradient_clipping'"):
        load_ds_config(write(tmp_path, json.dumps(base_config(gradient_cliping=5.0))))
    assert load_ds_config(write(tmp_path, json.dumps(base_config(my_note="x")), "ok.json"))["my_note"] == "x"


def test_deepspeed_validation_errors_name_the_block_and_key():
    cfg = base_config(zero_optimization={"stage": 2, "overlap_com": True, "contiguous_gradients": "maybe"})
    with pytest.raises(UserError) as err:
        validate_with_deepspeed(cfg, 1, "my.json")
    problems = err.value.problems
    assert any(p.startswith("my.json: zero_optimization.overlap_com: Extra inputs are not permitted")
               for p in problems), problems
    assert any(p.startswith("my.json: zero_optimization.contiguous_gradients:") and "'maybe'" in p
               for p in problems), problems
    with pytest.raises(UserError, match=r"my\.json: fp16\.loss_scal: Extra inputs"):
        validate_with_deepspeed(base_config(fp16={"enabled": True, "loss_scal": 0}), 1, "my.json")


# ------------------------------------------------------------------ batch arithmetic

def test_batch_arithmetic_derives_accumulation_from_the_world_size():
    cfg = {"train_batch_size": 4096, "train_micro_batch_size_per_gpu": 16}
    assert batch_arithmetic(cfg, 8) == {"micro_batch": 16, "accumulation_steps": 32, "global_batch": 4096,
                                        "world_size": 8}
    assert batch_arithmetic(cfg, 256)["accumulation_steps"] == 1


def test_batch_arithmetic_refuses_a_world_size_that_does_not_divide():
    cfg = {"train_batch_size": 4096, "train_micro_batch_size_per_gpu": 16}
    with pytest.raises(UserError, match=r"x\.json: train_batch_size=4096 does not split over 3 ranks .*"
                                        r"divides 256, or change train_micro_batch_size_per_gpu"):
        batch_arithmetic(cfg, 3, "x.json")
    with pytest.raises(UserError, match="does not split over 512 ranks"):
        batch_arithmetic(cfg, 512, "x.json")


@pytest.mark.parametrize("cfg, message", [
    ({"train_batch_size": 4096, "train_micro_batch_size_per_gpu": 16, "gradient_accumulation_steps": 8},
     r"train_batch_size=4096 != .* x world size \(4\) = 512: remove gradient_accumulation_steps"),
    ({"train_batch_size": 100, "train_micro_batch_size_per_gpu": 16},
     "train_batch_size=100 is not a multiple of train_micro_batch_size_per_gpu=16"),
    ({"gradient_accumulation_steps": 4}, "set train_batch_size"),
    ({"train_batch_size": "4096", "train_micro_batch_size_per_gpu": 16}, "train_batch_size='4096' must be a positive"),
    ({"train_batch_size": 4096, "train_micro_batch_size_per_gpu": 0}, "train_micro_batch_size_per_gpu=0 must be"),
])
def test_batch_arithmetic_errors_name_the_key(cfg, message):
    with pytest.raises(UserError, match=message):
        batch_arithmetic(cfg, 4, "x.json")


def test_batch_arithmetic_other_deepspeed_combinations():
    assert batch_arithmetic({"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2}, 4)[
        "global_batch"] == 64
    assert batch_arithmetic({"train_batch_size": 64}, 4) == {"micro_batch": 16, "accumulation_steps": 1,
                                                            "global_batch": 64, "world_size": 4}


def test_precision_reads_fp16_bf16_and_its_alias():
    assert precision({"fp16": {"enabled": True}}) == "fp16"
    assert precision({"bfloat16": {"enabled": True}}) == "bf16"
    assert precision({"fp16": {"enabled": False}}) == "fp32"
    with pytest.raises(UserError, match="both true"):
        precision({"fp16": {"enabled": True}, "bf16": {"enabled": True}})
    with pytest.raises(UserError, match=r"fp16\.enabled must be true or false, got 'auto'"):
        precision({"fp16": {"enabled": "auto"}})


# ------------------------------------------------------------------- run values

def test_resolve_run_values_fills_auto_schedule_and_monitor(tmp_path):
    cfg = load_ds_config(CONFIG_DIR / CPU_CONFIG)
    out = resolve_run_values(cfg, total_steps=200, output_dir=tmp_path / "run", job_name="exp1")
    assert out["scheduler"]["params"]["total_num_steps"] == 200
    assert out["scheduler"]["params"]["warmup_num_steps"] == 10  # 5%
    assert out["tensorboard"] == {"enabled": True, "output_path": str(tmp_path / "run" / "tensorboard"),
                                  "job_name": "exp1"}
    assert cfg["scheduler"]["params"]["total_num_steps"] == "auto"  # the input is left alone
    explicit = json.loads(json.dumps(cfg))
    explicit["scheduler"]["params"]["warmup_num_steps"] = 7
    assert resolve_run_values(explicit, total_steps=200, output_dir=tmp_path, job_name="x")[
        "scheduler"]["params"]["warmup_num_steps"] == 7
    explicit["scheduler"]["params"]["warmup_num_steps"] = 500
    with pytest.raises(UserError, match="warmup_num_steps=500 exceeds total_num_steps=200"):
        resolve_run_values(explicit, total_steps=200, output_dir=tmp_path, job_name="x")


def test_resolved_schedule_is_linear_warmup_then_linear_decay_in_deepspeed():
    """DeepSpeed's own WarmupDecayLR built from the resolved params follows the recipe."""
    import torch
    from deepspeed.runtime.lr_schedules import WarmupDecayLR

    cfg = resolve_run_values(load_ds_config(CONFIG_DIR / "fp16_zero1.json"), total_steps=100,
                             output_dir="out", job_name="x")
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=5e-4)
    sched = WarmupDecayLR(opt, **cfg["scheduler"]["params"])
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # Warm-up over 5 steps in equal increments (a log warm-up would give 0.43 x peak at
    # lrs[2]). DeepSpeed sets lr = warmup_min_lr at construction and its first step()
    # computes iteration 0, so the first two optimizer steps run at lr 0.
    assert lrs[:8] == pytest.approx([0.0, 0.0, 1e-4, 2e-4, 3e-4, 4e-4, 5e-4, 5e-4 * 94 / 95])
    # then a straight line towards 0 at step 100
    assert lrs[51] == pytest.approx(5e-4 * 50 / 95) and lrs[99] == pytest.approx(5e-4 * 2 / 95)
