"""Student-from-teacher surgery: layer maps, weight copy, the embedding fold, the output directory.

Everything runs on the tiny 4-layer teachers of conftest.py, except the parameter counts,
which build the full-size configs on the meta device (no weights, no memory).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from ds_distil.errors import UserError
from ds_distil.surgery import (
    build_student,
    check_plan,
    default_layer_map,
    load_teacher,
    make_student,
    plan_bert,
    resolve_layer_map,
    student_config,
    teacher_fingerprint,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["the model is a small student", "attention of the teacher layer and the hidden word vector"]


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def bert_teacher(bert_teacher_dir):
    return load_teacher(bert_teacher_dir)[0]


@pytest.fixture(scope="module")
def roberta_teacher(roberta_teacher_dir):
    return load_teacher(roberta_teacher_dir)[0]


@pytest.fixture(scope="module")
def bert_student(bert_teacher):
    """Three of four teacher layers, so that the map is neither trivial nor the default."""
    return make_student(bert_teacher, layers=[0, 1, 3])


@pytest.fixture(scope="module")
def built_bert(bert_teacher_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "student"
    return out, build_student(bert_teacher_dir, out)


def _batch(vocab_size: int, pad_id: int, lengths=(9, 6, 3), seed: int = 0):
    """Token ids after the special tokens (ids >= 5), right-padded to the longest length."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (len(lengths), max(lengths)), generator=gen)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return ids.masked_fill(mask == 0, pad_id), mask


# ---------------------------------------------------------------------------- layer maps

def test_default_layer_map_is_the_reference_map_for_12_to_6():
    assert default_layer_map(12, 6) == [0, 2, 4, 7, 9, 11]


@pytest.mark.parametrize("teacher,student", [(24, 12), (24, 6), (12, 4), (4, 2), (7, 3), (6, 6), (3, 2)])
def test_default_layer_map_spreads_evenly_and_keeps_first_and_last(teacher, student):
    layers = default_layer_map(teacher, student)
    assert len(layers) == student
    assert layers[0] == 0 and layers[-1] == teacher - 1
    assert all(a < b for a, b in zip(layers, layers[1:]))
    # Each kept layer is the nearest to its ideal evenly spaced position.
    ideal = [i * (teacher - 1) / (student - 1) for i in range(student)]
    assert all(abs(layer - x) <= 0.5 for layer, x in zip(layers, ideal))


def test_default_layer_map_worked_examples():
    assert default_layer_map(24, 6) == [0, 5, 9, 14, 18, 23]  # 23/5 = 4.6 per step
    assert default_layer_map(6, 6) == [0, 1, 2, 3, 4, 5]
    assert default_layer_map(5, 1) == [0]


def test_student_depth_defaults_to_half_and_can_be_set():
    assert resolve_layer_map(12) == [0, 2, 4, 7, 9, 11]
    assert resolve_layer_map(24) == default_layer_map(24, 12)
    assert resolve_layer_map(12, num_layers=3) == [0, 6, 11]   # 5.5 rounds up
    assert resolve_layer_map(12, layers=[1, 5, 10]) == [1, 5, 10]
    assert resolve_layer_map(12, layers=[1, 5, 10], num_layers=3) == [1, 5, 10]


@pytest.mark.parametrize("layers,num_layers,needle", [
    ([0, 12], None, "layer 12 does not exist"),
    ([-1, 3], None, "layer -1 does not exist"),
    ([4, 2], None, "not in increasing order"),
    ([2, 2, 5], None, "listed twice"),
    ([0, 5, 11], 6, "names 3 layers but --num-layers is 6"),
    ([], None, "empty"),
    (None, 13, "--num-layers 13 is out of range"),
    (None, 0, "--num-layers 0 is out of range"),
])
def test_bad_layer_maps_are_user_errors(layers, num_layers, needle):
    with pytest.raises(UserError, match=needle):
        resolve_layer_map(12, layers, num_layers)


# ------------------------------------------------------------------------- BERT surgery

def test_every_copied_tensor_equals_its_teacher_tensor(bert_teacher, bert_student):
    student, report = bert_student
    t_sd, s_sd = bert_teacher.state_dict(), student.state_dict()
    assert type(student).__name__ == "DistilBertForMaskedLM"
    assert report["layer_map"] == [0, 1, 3]
    assert report["left_random"] == []
    # Every student tensor comes from the teacher: copied or folded, nothing random.
    assert set(report["copied"]) | set(report["folded"]) == set(s_sd)
    for s_key, t_key in report["copied"].items():
        assert torch.equal(s_sd[s_key], t_sd[t_key]), s_key
    # Spot-check the REFERENCE.md name map on the layer that moved (teacher 3 -> student 2).
    assert report["copied"]["distilbert.transformer.layer.2.attention.q_lin.weight"] == \
        "bert.encoder.layer.3.attention.self.query.weight"
    assert report["copied"]["distilbert.transformer.layer.2.ffn.lin2.bias"] == "bert.encoder.layer.3.output.dense.bias"
    assert report["copied"]["vocab_transform.weight"] == "cls.predictions.transform.dense.weight"
    assert report["copied"]["vocab_projector.weight"] == "cls.predictions.decoder.weight"


def test_no_token_types_pooler_or_nsp_in_the_student(bert_student):
    student, report = bert_student
    names = list(student.state_dict())
    assert not any("token_type" in n or "pooler" in n or "seq_relationship" in n for n in names)
    assert report["dropped"]["bert.encoder.layer.2.output.dense.weight"] == "teacher layer 2 is not in the layer map"
    assert "tied" in report["dropped"]["cls.predictions.bias"]


def test_the_plan_check_catches_skips_strays_and_shape_mismatches(bert_teacher, bert_student):
    """The assertions that guard every build, fed the real state dicts with one thing broken."""
    student, _ = bert_student
    t_sd, s_sd = bert_teacher.state_dict(), student.state_dict()

    def plan():
        return plan_bert(list(t_sd), [0, 1, 3], fold_token_type=True, copy_head_transform=True)

    check_plan(plan(), s_sd, t_sd)  # the real plan passes

    no_source = plan()
    del no_source.copies["distilbert.transformer.layer.1.ffn.lin1.bias"]
    with pytest.raises(AssertionError, match="student tensors with no source"):
        check_plan(no_source, s_sd, t_sd)

    skipped = plan()
    del skipped.copies["vocab_transform.weight"]
    skipped.random.append("vocab_transform.weight")  # the student side is fine, the teacher's is not
    with pytest.raises(AssertionError, match="cls.predictions.transform.dense.weight is neither copied nor"):
        check_plan(skipped, s_sd, t_sd)

    stray = {**t_sd, "bert.encoder.layer.0.attention.self.distance_embedding.weight": torch.zeros(3, 2)}
    with pytest.raises(AssertionError, match="distance_embedding.weight is neither copied nor"):
        check_plan(plan(), s_sd, stray)

    swapped = plan()
    swapped.copies["distilbert.transformer.layer.0.ffn.lin1.weight"] = "bert.encoder.layer.0.output.dense.weight"
    with pytest.raises(AssertionError, match="shape mismatch: student distilbert.transformer.layer.0.ffn.lin1"):
        check_plan(swapped, s_sd, t_sd)


def test_student_config_carries_the_teacher_settings(bert_teacher, bert_student):
    student, _ = bert_student
    t, s = bert_teacher.config, student.config
    assert (s.dim, s.hidden_dim, s.n_heads, s.n_layers) == (t.hidden_size, t.intermediate_size,
                                                            t.num_attention_heads, 3)
    assert s.activation == t.hidden_act
    assert s.pad_token_id == t.pad_token_id
    assert s.max_position_embeddings == t.max_position_embeddings
    assert s.vocab_size == t.vocab_size
    assert s.sinusoidal_pos_embds is False


def _masks(teacher, student, hidden, mask2d):
    from transformers.masking_utils import create_bidirectional_mask

    return (create_bidirectional_mask(config=teacher.config, inputs_embeds=hidden, attention_mask=mask2d),
            create_bidirectional_mask(config=student.config, inputs_embeds=hidden, attention_mask=mask2d))


@torch.no_grad()
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_each_student_layer_computes_its_teacher_layer(bert_teacher, attention):
    """Same weights, same input, same padding mask: bit-identical output, for both kernels."""
    teacher = copy.deepcopy(bert_teacher)
    student, report = make_student(teacher, layers=[0, 1, 3])
    teacher.set_attn_implementation(attention)
    student.set_attn_implementation(attention)
    hidden = torch.randn(3, 9, teacher.config.hidden_size, generator=torch.Generator().manual_seed(1))
    _, mask2d = _batch(teacher.config.vocab_size, 0)
    t_mask, s_mask = _masks(teacher, student, hidden, mask2d)
    assert t_mask is not None and s_mask is not None  # padding really is masked
    for i, t in enumerate(report["layer_map"]):
        expected = teacher.bert.encoder.layer[t](hidden, t_mask)
        got = student.distilbert.transformer.layer[i](hidden, s_mask)
        assert torch.equal(got, expected), (i, t, (got - expected).abs().max())
        # The copy matters: a different teacher layer gives a different output.
        other = teacher.bert.encoder.layer[(t + 1) % 4](hidden, t_mask)
        assert (got - other).abs().max() > 1e-3


def _embedding_io(embeddings, input_ids):
    """(input of the embedding LayerNorm, output of the embedding layer)."""
    captured = {}
    hook = embeddings.LayerNorm.register_forward_pre_hook(lambda _m, args: captured.setdefault("pre", args[0]))
    try:
        out = embeddings(input_ids=input_ids)
    finally:
        hook.remove()
    return captured["pre"], out


@torch.no_grad()
def test_folded_embeddings_give_the_teachers_embedding_output(bert_teacher, bert_student):
    student, report = bert_student
    ids, _ = _batch(bert_teacher.config.vocab_size, 0)
    t_pre, t_out = _embedding_io(bert_teacher.bert.embeddings, ids)  # token_type_ids default to 0
    s_pre, s_out = _embedding_io(student.distilbert.embeddings, ids)
    assert report["folded"] == {"distilbert.embeddings.position_embeddings.weight": [
        "bert.embeddings.position_embeddings.weight", "bert.embeddings.token_type_embeddings.weight[0]"]}
    # (word + type0) + pos vs word + (pos + type0): equal up to float32 rounding only.
    torch.testing.assert_close(s_pre, t_pre, rtol=0, atol=1e-6)
    torch.testing.assert_close(s_out, t_out, rtol=0, atol=1e-5)


@torch.no_grad()
def test_without_fold_the_embeddings_differ_by_exactly_token_type_zero(bert_teacher):
    student, report = make_student(bert_teacher, layers=[0, 1, 3], fold_token_type=False)
    assert report["folded"] == {} and report["options"]["fold_token_type"] is False
    assert "no token-type" in report["dropped"]["bert.embeddings.token_type_embeddings.weight"]
    assert torch.equal(student.distilbert.embeddings.position_embeddings.weight,
                       bert_teacher.bert.embeddings.position_embeddings.weight)
    ids, _ = _batch(bert_teacher.config.vocab_size, 0)
    t_pre, t_out = _embedding_io(bert_teacher.bert.embeddings, ids)
    s_pre, s_out = _embedding_io(student.distilbert.embeddings, ids)
    type0 = bert_teacher.bert.embeddings.token_type_embeddings.weight[0]
    torch.testing.assert_close(t_pre - s_pre, type0.expand_as(t_pre), rtol=0, atol=1e-6)
    assert (t_out - s_out).abs().max() > 1e-2  # the reference's student really is off


@torch.no_grad()
def test_a_student_keeping_every_layer_reproduces_the_teachers_logits(bert_teacher):
    """Embedding fold + layer copy + head copy together: the whole forward pass matches."""
    student, report = make_student(bert_teacher, num_layers=4)
    assert report["layer_map"] == [0, 1, 2, 3]
    ids, mask = _batch(bert_teacher.config.vocab_size, 0)
    expected = bert_teacher(input_ids=ids, attention_mask=mask).logits
    got = student(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-5)


@torch.no_grad()
def test_reference_head_option_leaves_the_transform_random(bert_teacher):
    student, report = make_student(bert_teacher, layers=[0, 3], copy_head_transform=False, seed=5)
    random_keys = ["vocab_transform.weight", "vocab_transform.bias", "vocab_layer_norm.weight", "vocab_layer_norm.bias"]
    assert report["left_random"] == random_keys
    assert not set(random_keys) & set(report["copied"])
    assert not torch.equal(student.vocab_transform.weight, bert_teacher.cls.predictions.transform.dense.weight)
    assert torch.equal(student.vocab_projector.weight, bert_teacher.cls.predictions.decoder.weight)
    # Random, but reproducible from the seed.
    again, _ = make_student(bert_teacher, layers=[0, 3], copy_head_transform=False, seed=5)
    assert torch.equal(student.vocab_transform.weight, again.vocab_transform.weight)


def test_a_layer_norm_eps_distilbert_cannot_hold_is_reported(bert_teacher):
    from transformers import BertForMaskedLM

    config = copy.deepcopy(bert_teacher.config)
    config.layer_norm_eps = 1e-5
    teacher = BertForMaskedLM(config)
    _, report = make_student(teacher)
    assert len(report["warnings"]) == 1 and "layer_norm_eps is 1e-05" in report["warnings"][0]
    assert make_student(bert_teacher)[1]["warnings"] == []


# ---------------------------------------------------------------------- RoBERTa surgery

@torch.no_grad()
def test_roberta_student_copies_layers_and_computes_like_the_teacher(roberta_teacher):
    student, report = make_student(roberta_teacher)  # 4 -> 2 layers: [0, 3]
    assert type(student).__name__ == "RobertaForMaskedLM"
    assert report["layer_map"] == [0, 3] and student.config.num_hidden_layers == 2
    assert report["folded"] == {} and report["left_random"] == []
    t_sd, s_sd = roberta_teacher.state_dict(), student.state_dict()
    assert set(report["copied"]) == set(s_sd)
    for s_key, t_key in report["copied"].items():
        assert torch.equal(s_sd[s_key], t_sd[t_key]), s_key
    assert report["copied"]["roberta.encoder.layer.1.attention.self.query.weight"] == \
        "roberta.encoder.layer.3.attention.self.query.weight"
    assert "roberta.embeddings.token_type_embeddings.weight" in s_sd  # DistilRoBERTa keeps it

    hidden = torch.randn(3, 9, roberta_teacher.config.hidden_size, generator=torch.Generator().manual_seed(2))
    _, mask2d = _batch(roberta_teacher.config.vocab_size, roberta_teacher.config.pad_token_id)
    t_mask, s_mask = _masks(roberta_teacher, student, hidden, mask2d)
    for i, t in enumerate(report["layer_map"]):
        assert torch.equal(student.roberta.encoder.layer[i](hidden, s_mask),
                           roberta_teacher.roberta.encoder.layer[t](hidden, t_mask))

    full, _ = make_student(roberta_teacher, num_layers=4)
    ids, mask = _batch(roberta_teacher.config.vocab_size, roberta_teacher.config.pad_token_id)
    real = mask.bool()
    torch.testing.assert_close(full(input_ids=ids, attention_mask=mask).logits[real],
                               roberta_teacher(input_ids=ids, attention_mask=mask).logits[real], rtol=0, atol=1e-5)


# --------------------------------------------------------------------- parameter counts

def _layer_parameters(layer) -> int:
    return sum(p.numel() for p in layer.parameters())


def test_full_size_parameter_counts_match_the_paper():
    from transformers import BertConfig, BertForMaskedLM, DistilBertForMaskedLM

    config = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)
    with torch.device("meta"):
        teacher = BertForMaskedLM(config)
        student = DistilBertForMaskedLM(student_config(teacher.config, 6))
    assert teacher.num_parameters() == 109_514_298
    assert student.num_parameters() == 66_985_530
    # The difference is exactly six layers and the token-type table.
    assert teacher.num_parameters() - student.num_parameters() == \
        6 * _layer_parameters(teacher.bert.encoder.layer[0]) + 2 * 768


def test_full_size_roberta_parameter_counts():
    from transformers import RobertaConfig, RobertaForMaskedLM

    config = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                           layer_norm_eps=1e-5)
    with torch.device("meta"):
        teacher = RobertaForMaskedLM(config)
        student = RobertaForMaskedLM(student_config(teacher.config, 6))
    assert teacher.num_parameters() == 124_697_433  # roberta-base with its MLM head: 125M
    assert student.num_parameters() == teacher.num_parameters() - 6 * _layer_parameters(teacher.roberta.encoder.layer[0])
    assert round(student.num_parameters() / 1e6) == 82  # DistilRoBERTa: 82M


# ---------------------------------------------------------------------- build and write

def test_build_writes_a_complete_directory_and_nothing_else(built_bert, bert_teacher_dir):
    out, report = built_bert
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "layer_map.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert json.loads((out / "layer_map.json").read_text()) == report
    assert report["teacher"]["dir"] == str(Path(bert_teacher_dir).resolve())
    assert report["student"]["dir"] == str(out.resolve())
    assert report["layer_map"] == [0, 3]
    assert [p.name for p in out.parent.iterdir()] == ["student"]  # no temp directory left behind
    assert not list(out.glob("*.partial*"))


def test_saved_weights_equal_the_teacher_tensors(built_bert, bert_teacher):
    from safetensors.torch import load_file

    out, report = built_bert
    saved, t_sd = load_file(str(out / "model.safetensors")), bert_teacher.state_dict()
    for s_key, t_key in report["copied"].items():
        if s_key in saved:  # a tied copy (vocab_projector.weight) is stored once
            assert torch.equal(saved[s_key], t_sd[t_key]), s_key
    pos = saved["distilbert.embeddings.position_embeddings.weight"]
    assert torch.equal(pos, t_sd["bert.embeddings.position_embeddings.weight"]
                       + t_sd["bert.embeddings.token_type_embeddings.weight"][0])


def test_fingerprint_identifies_the_teacher(built_bert, bert_teacher_dir, bert_teacher, roberta_teacher):
    _, report = built_bert
    fingerprint = report["teacher"]["fingerprint"]
    assert fingerprint.startswith("sha256:") and len(fingerprint) == 7 + 64
    assert teacher_fingerprint(bert_teacher_dir) == fingerprint
    assert teacher_fingerprint(bert_teacher) == fingerprint
    # A trainer may run the teacher in bf16: same teacher, same fingerprint.
    from transformers import BertForMaskedLM

    bf16 = BertForMaskedLM.from_pretrained(str(bert_teacher_dir), dtype=torch.bfloat16)
    assert teacher_fingerprint(bf16) == fingerprint
    assert teacher_fingerprint(roberta_teacher) != fingerprint
    with torch.no_grad():
        bf16.bert.embeddings.word_embeddings.weight[7, 0] += 1.0
    assert teacher_fingerprint(bf16) != fingerprint


RELOAD = r"""
import importlib.util, sys
site_packages, model_dir, result = sys.argv[1:4]
sys.path.append(site_packages)  # -S skipped site.py, so the editable ds_distil finder is not installed
assert importlib.util.find_spec("ds_distil") is None, "ds_distil must not be importable here"
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer
model = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
tokenizer = AutoTokenizer.from_pretrained(model_dir)
batch = tokenizer(sys.argv[4:], padding=True, return_tensors="pt")
with torch.no_grad():
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
torch.save({"class": type(model).__name__, "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"], "logits": logits}, result)
"""


def _reload_without_ds_distil(model_dir: Path, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = tmp_path / "reloaded.pt"
    proc = subprocess.run([sys.executable, "-S", "-c", RELOAD, sysconfig.get_paths()["purelib"], str(model_dir),
                           str(result), *TEXTS], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(result)


@torch.no_grad()
def test_saved_student_reloads_with_transformers_alone(built_bert, bert_teacher, bert_teacher_dir, tmp_path):
    from transformers import AutoTokenizer

    out, _ = built_bert
    reloaded = _reload_without_ds_distil(out, tmp_path)
    assert reloaded["class"] == "DistilBertForMaskedLM"
    teacher_ids = AutoTokenizer.from_pretrained(str(bert_teacher_dir))(TEXTS, padding=True, return_tensors="pt")
    assert torch.equal(reloaded["input_ids"], teacher_ids["input_ids"])  # the teacher's tokenizer
    student, _ = make_student(bert_teacher)  # the same build, in memory
    logits = student(input_ids=reloaded["input_ids"], attention_mask=reloaded["attention_mask"]).logits
    assert torch.equal(reloaded["logits"], logits)


@torch.no_grad()
def test_roberta_student_reloads_with_transformers_alone(roberta_teacher_dir, roberta_teacher, tmp_path):
    out = tmp_path / "distilroberta"
    report = build_student(roberta_teacher_dir, out, copy_head_transform=False)
    assert report["left_random"] == ["lm_head.dense.weight", "lm_head.dense.bias",
                                     "lm_head.layer_norm.weight", "lm_head.layer_norm.bias"]
    reloaded = _reload_without_ds_distil(out, tmp_path)
    assert reloaded["class"] == "RobertaForMaskedLM"
    student, _ = make_student(roberta_teacher, copy_head_transform=False)
    logits = student(input_ids=reloaded["input_ids"], attention_mask=reloaded["attention_mask"]).logits
    assert torch.equal(reloaded["logits"], logits)


# ------------------------------------------------------------------ other teacher kinds

def _save_teacher(model, tokenizer_dir: Path, out: Path) -> Path:
    model.save_pretrained(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    return out


def test_bert_for_pretraining_teacher_drops_pooler_and_nsp(bert_teacher_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import BertConfig, BertForPreTraining

    torch.manual_seed(3)
    teacher = BertForPreTraining(BertConfig.from_pretrained(str(bert_teacher_dir))).eval()
    teacher_dir = _save_teacher(teacher, bert_teacher_dir, tmp_path / "pretraining")
    report = build_student(teacher_dir, tmp_path / "student")
    assert report["teacher"]["architecture"] == "BertForPreTraining"
    assert report["dropped"]["bert.pooler.dense.weight"] == "DistilBERT has no pooler"
    assert report["dropped"]["cls.seq_relationship.weight"] == "DistilBERT has no next-sentence head"
    assert report["ignored_in_checkpoint"] == []
    saved, t_sd = load_file(str(tmp_path / "student" / "model.safetensors")), teacher.state_dict()
    for s_key, t_key in report["copied"].items():
        if s_key in saved:
            assert torch.equal(saved[s_key], t_sd[t_key]), s_key

    # The shape of a hub BERT checkpoint: pre-training weights under a BertForMaskedLM config.
    config = json.loads((teacher_dir / "config.json").read_text())
    config["architectures"] = ["BertForMaskedLM"]
    (teacher_dir / "config.json").write_text(json.dumps(config))
    report = build_student(teacher_dir, tmp_path / "student2")
    assert report["teacher"]["architecture"] == "BertForMaskedLM"
    assert set(report["ignored_in_checkpoint"]) == {"bert.pooler.dense.weight", "bert.pooler.dense.bias",
                                                    "cls.seq_relationship.weight", "cls.seq_relationship.bias"}


def test_a_checkpoint_missing_a_copied_tensor_is_refused(bert_teacher_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    teacher_dir = tmp_path / "incomplete"
    shutil.copytree(bert_teacher_dir, teacher_dir)
    weights = load_file(str(teacher_dir / "model.safetensors"))
    del weights["bert.encoder.layer.3.intermediate.dense.weight"]
    save_file(weights, str(teacher_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"lacks bert\.encoder\.layer\.3\.intermediate\.dense\.weight"):
        build_student(teacher_dir, tmp_path / "out")
    # Not copied, so not needed: a map without layer 3 builds.
    build_student(teacher_dir, tmp_path / "out", layers=[0, 2])


def test_a_failure_while_writing_leaves_nothing_behind(bert_teacher_dir, tmp_path):
    """The tokenizer is checked after the weights are written: the temp dir must vanish."""
    teacher_dir = tmp_path / "bad_tokenizer"
    shutil.copytree(bert_teacher_dir, teacher_dir)
    (teacher_dir / "tokenizer.json").write_text("{ not json")
    parent = tmp_path / "outputs"
    with pytest.raises(UserError, match="tokenizer files of .* do not load"):
        build_student(teacher_dir, parent / "student")
    assert list(parent.iterdir()) == []


def test_force_replaces_an_existing_output(bert_teacher_dir, tmp_path):
    out = tmp_path / "student"
    out.mkdir()
    (out / "stale.txt").write_text("old run")
    with pytest.raises(UserError, match="not empty.*--force"):
        build_student(bert_teacher_dir, out)
    assert (out / "stale.txt").exists()
    build_student(bert_teacher_dir, out, force=True)
    assert not (out / "stale.txt").exists() and (out / "layer_map.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["student"]


def test_output_over_the_teacher_is_refused_even_with_force(bert_teacher_dir):
    with pytest.raises(UserError, match="would replace the teacher"):
        build_student(bert_teacher_dir, bert_teacher_dir, force=True)
    assert (Path(bert_teacher_dir) / "model.safetensors").exists()


# ---------------------------------------------------------------------- the real CLI

def _cli(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ds_distil", "init-student", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ds-distil init-student: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def broken_teachers(tmp_path, bert_teacher_dir):
    """Teacher directories that are wrong in one way each (json-level: fast to reject)."""
    def variant(name: str, config) -> Path:
        path = tmp_path / name
        shutil.copytree(bert_teacher_dir, path)
        if config is None:
            (path / "config.json").unlink()
        else:
            (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        return path

    good = json.loads((Path(bert_teacher_dir) / "config.json").read_text())
    return {
        "no_config": variant("no_config", None),
        "garbage_config": variant("garbage_config", "{ this is not json"),
        "t5": variant("t5", {**good, "architectures": ["T5ForConditionalGeneration"], "model_type": "t5"}),
        "bert_model": variant("bert_model", {**good, "architectures": ["BertModel"]}),
    }


@pytest.mark.parametrize("case", ["missing", "file", "no_config", "garbage_config", "t5", "bert_model"])
def test_cli_rejects_a_bad_teacher_in_one_line(case, broken_teachers, tmp_path):
    teacher = {"missing": tmp_path / "nowhere", "file": tmp_path / "a_file"}.get(case) or broken_teachers[case]
    if case == "file":
        teacher.write_text("not a model")
    proc = _cli("--teacher", str(teacher), "--output", str(tmp_path / "out"))
    needles = {"missing": [str(teacher), "does not exist", "save_pretrained"],
               "file": [str(teacher), "not a directory"],
               "no_config": [str(teacher), "no config.json"],
               "garbage_config": [str(teacher / "config.json"), "cannot read"],
               "t5": ["T5ForConditionalGeneration is not supported",
                      "BertForMaskedLM, BertForPreTraining, RobertaForMaskedLM"],
               "bert_model": ["BertModel is not supported", "MLM head"]}[case]
    _assert_one_line_error(proc, *needles)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,needles", [
    (["--layers", "0,4"], ["--layers 0,4", "layer 4 does not exist", "0 to 3"]),
    (["--layers", "3,0"], ["not in increasing order", "--layers 0,3"]),
    (["--layers", "1,1"], ["teacher layer 1 is listed twice"]),
    (["--layers", "0,3", "--num-layers", "3"], ["names 2 layers but --num-layers is 3"]),
    (["--layers", "zero,three"], ["'zero,three' is not a comma-separated list"]),
    (["--num-layers", "9"], ["--num-layers 9 is out of range", "1 to 4"]),
    (["--num-layers", "two"], ["--num-layers 'two' is not an integer"]),
])
def test_cli_rejects_a_bad_layer_map_in_one_line(args, needles, bert_teacher_dir, tmp_path):
    proc = _cli("--teacher", str(bert_teacher_dir), "--output", str(tmp_path / "out"), *args)
    _assert_one_line_error(proc, *needles)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_non_empty_output_without_force(bert_teacher_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.me").write_text("precious")
    _assert_one_line_error(_cli("--teacher", str(bert_teacher_dir), "--output", str(out)),
                           str(out), "not empty", "--force")
    assert (out / "keep.me").read_text() == "precious"


def test_cli_rejects_unreadable_weights_in_one_line(bert_teacher_dir, tmp_path):
    teacher = tmp_path / "corrupt"
    shutil.copytree(bert_teacher_dir, teacher)
    data = (teacher / "model.safetensors").read_bytes()
    (teacher / "model.safetensors").write_bytes(data[: len(data) // 3])
    _assert_one_line_error(_cli("--teacher", str(teacher), "--output", str(tmp_path / "out")),
                           "cannot load the teacher", str(teacher))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt"]


def test_cli_builds_the_student_and_prints_a_summary(bert_teacher_dir, tmp_path):
    out = tmp_path / "student"
    out.mkdir()
    (out / "old.txt").write_text("old")
    proc = _cli("--teacher", str(bert_teacher_dir), "--output", str(out), "--layers", "1,3",
                "--random-head-transform", "--no-fold-token-type", "--force")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "layer_map.json").read_text())
    assert report["layer_map"] == [1, 3]
    assert report["options"] == {"fold_token_type": False, "copy_head_transform": False, "seed": 0}
    assert not (out / "old.txt").exists()
    t, s = report["teacher"]["parameters"], report["student"]["parameters"]
    assert "teacher -> student: 1->0, 3->1" in proc.stdout
    assert f"teacher {t:,} -> student {s:,} ({100 * (1 - s / t):.1f}% fewer)" in proc.stdout
    assert "vocab_transform.weight" in proc.stdout  # what was left random
    assert str(out.resolve()) in proc.stdout
