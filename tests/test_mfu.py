"""Model FLOPs, device peaks and MFU for the training log (ds_distil.metrics), checked by hand."""

from __future__ import annotations

import json

import pytest
import torch

from ds_distil import bench, metrics
from ds_distil.config import RunConfig, describe, load_run_config
from ds_distil.errors import UserError
from ds_distil.metrics import ModelShape

# A tiny pair: teacher 4 layers, student 2, width 4, FFN 8, vocabulary 10.
TEACHER = ModelShape(layers=4, hidden=4, intermediate=8, vocab=10)
STUDENT = ModelShape(layers=2, hidden=4, intermediate=8, vocab=10)


def test_flops_per_token_match_a_hand_count():
    # Per layer and token: Q, K, V, O projections 4 x 2*h*h = 8*16 = 128; the FFN's two
    # matmuls 2 x 2*h*f = 4*4*8 = 128; attention at length 3: QK^T and AV 2 x 2*n*h = 4*3*4 = 48.
    per_layer = 128 + 128 + 48
    # Head per projected row: transform 2*h*h = 32, vocabulary 2*h*V = 80.
    head = 32 + 80
    got = metrics.distill_flops_per_token(STUDENT, TEACHER, seq_len=3, head_fraction=1.0)
    assert got == {"teacher": 4 * per_layer + head, "student": 3 * (2 * per_layer + head)}
    assert got == {"teacher": 1328.0, "student": 2160.0}
    # Only the MLM positions projected (15% of the tokens); no teacher logits when alpha_ce = 0.
    mlm = metrics.distill_flops_per_token(STUDENT, TEACHER, seq_len=3, head_fraction=0.15, teacher_head=False)
    assert mlm == pytest.approx({"teacher": 4 * per_layer, "student": 3 * (2 * per_layer + 0.15 * head)})
    # No teacher: plain MLM pretraining.
    assert metrics.distill_flops_per_token(STUDENT, None, seq_len=3, head_fraction=0.15)["teacher"] == 0.0


def test_model_shape_reads_bert_and_distilbert_configs_objects_and_dicts():
    from transformers import BertConfig, DistilBertConfig

    bert = BertConfig(vocab_size=10, hidden_size=4, num_hidden_layers=4, num_attention_heads=2, intermediate_size=8)
    distil = DistilBertConfig(vocab_size=10, dim=4, n_layers=2, n_heads=2, hidden_dim=8)
    assert ModelShape.of(bert) == ModelShape.of(bert.to_dict()) == TEACHER
    assert ModelShape.of(distil) == ModelShape.of(distil.to_dict()) == STUDENT
    with pytest.raises(ValueError, match="vocab_size"):
        ModelShape.of({"hidden_size": 4, "num_hidden_layers": 1, "intermediate_size": 8})


def test_causal_lm_shapes_and_counts_by_hand():
    """GPT-2 (plain FFN 4 x width, no head transform) and Llama (grouped-query attention,
    gated FFN): the families the trainer also distils."""
    from transformers import GPT2Config, LlamaConfig

    gpt2 = ModelShape.of(GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=10, bos_token_id=0, eos_token_id=0))
    assert gpt2 == ModelShape(layers=2, hidden=8, intermediate=32, vocab=10, head_transform=False, causal=True)
    # Per layer and token at length 3: Q, K, V, O 4 x 2*8*8 = 512; FFN 2 x 2*8*32 = 1024;
    # attention 4*3*8 = 96. Head: the vocabulary projection only, 2*8*10 = 160.
    assert metrics.forward_flops_per_token(gpt2, 3, 1.0) == 2 * (512 + 1024 + 96) + 160
    llama = ModelShape.of(LlamaConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=16, vocab_size=10, bos_token_id=0, eos_token_id=0))
    assert (llama.kv_hidden, llama.mlp_matrices, llama.head_transform, llama.causal) == (4, 3, False, True)
    # Q, O 2 x 2*8*8 = 256; K, V (2 heads of 2) 2 x 2*8*4 = 128; gated FFN 3 x 2*8*16 = 768; attention 96.
    assert metrics.forward_flops_per_token(llama, 3, 1.0) == 2 * (256 + 128 + 768 + 96) + 160


def test_per_token_count_equals_the_benchs_per_batch_count():
    """The trainer's per-token estimate, at the batch's attention length, is the bench's exact count."""
    preset = bench.PRESETS["small"]
    batch = bench.synthetic_batches(preset, preset.seq_len, 8, 1)[0]
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) > 1  # varied lengths: the attention length matters
    teacher = ModelShape(preset.layers, preset.hidden, preset.ffn, preset.vocab_size)
    student = ModelShape(preset.student_layers, preset.hidden, preset.ffn, preset.vocab_size)
    histogram = {"lengths": sorted(set(lengths)), "counts": [lengths.count(n) for n in sorted(set(lengths))]}
    length = metrics.attention_length({"length_histogram": histogram})
    assert length == pytest.approx(sum(n * n for n in lengths) / sum(lengths))
    tokens = sum(lengths)
    targets = int((batch["labels"] != -100).sum())
    for ce_positions, fraction in (("all", 1.0), ("mlm", targets / tokens)):
        exact = bench.step_flops(preset, batch, ce_positions)
        per_token = metrics.distill_flops_per_token(student, teacher, length, fraction)
        assert exact["tokens"] == tokens
        assert tokens * per_token["teacher"] == pytest.approx(exact["teacher"], rel=1e-9)
        assert tokens * per_token["student"] == pytest.approx(exact["student"], rel=1e-9)


def test_attention_length_falls_back_on_the_mean_then_the_maximum():
    assert metrics.attention_length({"splits": {"train": {"sequences": 4, "tokens": 100}}, "max_seq_len": 64}) == 25.0
    assert metrics.attention_length({"max_seq_len": 64}) == 64.0


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
    ("NVIDIA A100 80GB PCIe", "fp16", 312.0),
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0),
    ("NVIDIA H100 PCIe", "bf16", 756.0),
    ("NVIDIA H100 NVL", "fp16", 835.0),
    ("NVIDIA H200", "bf16", 989.0),
    ("NVIDIA GH200 480GB", "bf16", 989.0),
    ("NVIDIA L40S", "bf16", 362.0),
    ("NVIDIA L4", "bf16", 121.0),
    ("NVIDIA A10", "bf16", 125.0),
    ("Tesla V100-SXM2-32GB", "fp16", 125.0),
    ("Tesla V100-PCIE-16GB", "fp16", 112.0),
    ("NVIDIA A100-SXM4-40GB", "fp32", 19.5),
    # Not in the table, or a precision the GPU lacks: None (the peak is then measured).
    ("Tesla V100-SXM2-16GB", "bf16", None),
    ("NVIDIA A10G", "bf16", None),
    ("NVIDIA GeForce RTX 4090", "bf16", None),
])
def test_known_peaks_by_device_name(name, precision, peak):
    assert metrics.known_peak_tflops(name, precision) == peak


def test_peak_override_wins_and_bad_overrides_are_refused():
    cpu = torch.device("cpu")
    assert metrics.device_peak_tflops("bf16", cpu, 989) == (989.0, "train.peak_tflops")
    for bad in (-5.0, 0, float("nan"), float("inf")):
        with pytest.raises(UserError, match=r"^train\.peak_tflops: .* must be a finite number > 0"):
            metrics.device_peak_tflops("bf16", cpu, bad)


def test_cpu_peak_is_measured_and_is_the_best_over_sizes():
    cpu = torch.device("cpu")
    by_size = metrics.matmul_tflops_by_size(torch.float32, cpu, sizes=(64, 128), repeats=2)
    assert set(by_size) == {64, 128} and all(v > 0 for v in by_size.values())
    peak, source = metrics.device_peak_tflops("fp32", cpu)
    assert peak > 0 and source == "measured (fp32 matmul on cpu)"


def _run_config(tmp_path, **train) -> str:
    paths = {name: tmp_path / name for name in ("student", "teacher", "data")}
    for path in paths.values():
        path.mkdir()
    (tmp_path / "ds.json").write_text("{}")
    raw = {**{k: str(v) for k, v in paths.items()}, "deepspeed_config": str(tmp_path / "ds.json"),
           "output_dir": str(tmp_path / "out"), "train": train}
    (tmp_path / "run.json").write_text(json.dumps(raw))
    return str(tmp_path / "run.json")


def test_run_config_override_is_typed_documented_and_validated(tmp_path):
    path = _run_config(tmp_path, peak_tflops=989)
    assert load_run_config(path).train.peak_tflops == 989.0
    assert load_run_config(path, ["train.peak_tflops=null"]).train.peak_tflops is None
    assert "train.peak_tflops = null\n    Device peak in TFLOP/s" in describe()
    with pytest.raises(UserError) as err:
        load_run_config(path, ["train.peak_tflops=-5"])
    assert err.value.problems == [f"{path}: train.peak_tflops: -5.0 must be a finite number > 0, the device's dense "
                                  "matmul peak in TFLOP/s at the run's precision (e.g. 989 for an H100 SXM in "
                                  "bf16), or null to measure it on CPU / look it up per GPU"]
    with pytest.raises(UserError, match=r"train\.peak_tflops: expected float, got \"fast\""):
        load_run_config(path, ["train.peak_tflops=fast"])


def test_meter_gives_per_device_tflops_that_add_up_to_the_mfu():
    meter = metrics.MFUMeter({"teacher": 1328.0, "student": 2160.0}, peak_tflops=1e-6, peak_source="test")
    # 3,000 tokens over 2 ranks in 0.5 s: 3,000 tokens/s per device.
    values = meter(tokens=3000, seconds=0.5, world_size=2)
    assert values["tflops_teacher"] == pytest.approx(1328.0 * 3000 / 1e12)
    assert values["tflops_student"] == pytest.approx(2160.0 * 3000 / 1e12)
    assert values["mfu"] == pytest.approx((1328.0 + 2160.0) * 3000 / 1e12 / 1e-6)


def test_mfu_meter_from_a_run_config_and_real_model_configs():
    from transformers import BertConfig, DistilBertConfig

    teacher = BertConfig(vocab_size=10, hidden_size=4, num_hidden_layers=4, num_attention_heads=2, intermediate_size=8)
    student = DistilBertConfig(vocab_size=10, dim=4, n_layers=2, n_heads=2, hidden_dim=8)
    meta = {"length_histogram": {"lengths": [3], "counts": [7]}, "max_seq_len": 8}
    cfg = RunConfig(student="s", data="d", deepspeed_config="ds.json", output_dir="o", teacher="t")
    cfg.train.peak_tflops = 2.0
    meter = metrics.mfu_meter(cfg, student, teacher, meta, "bf16", torch.device("cpu"))
    assert meter.flops_per_token == {"teacher": 1328.0, "student": 2160.0}  # L_ce at all tokens (the default)
    assert (meter.peak_tflops, meter.peak_source) == (2.0, "train.peak_tflops")
    assert "2 TFLOP/s per device (train.peak_tflops)" in meter.describe()
    cfg.loss.ce_positions = "mlm"  # heads at the MLM positions only
    assert metrics.mfu_meter(cfg, student, teacher, meta, "bf16", torch.device("cpu")).flops_per_token == \
        pytest.approx(metrics.distill_flops_per_token(STUDENT, TEACHER, 3, cfg.masking.mlm_probability))
    # A causal LM has a target at every position: heads at every token whatever ce_positions says.
    from transformers import GPT2Config

    gpt2 = GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=10, bos_token_id=0, eos_token_id=0)
    shape = ModelShape.of(gpt2)
    assert metrics.mfu_meter(cfg, gpt2, gpt2, meta, "bf16", torch.device("cpu")).flops_per_token == \
        pytest.approx(metrics.distill_flops_per_token(shape, shape, 3, 1.0))


def test_console_line_shows_the_mfu(tmp_path):
    lines = []
    writer = metrics.MetricsWriter(tmp_path, monitor=None, enabled=True, echo=lines.append)
    writer.write("Train", 10, {"loss": 1.0, "tokens_per_s": 1234.0, "mfu": 0.412, "tflops_teacher": 0.1,
                               "tflops_student": 0.2})
    writer.close()
    assert lines == ["step 10 | loss 1.0000 | tok/s 1,234 | MFU 41.2%"]
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["tflops_student"] == 0.2
