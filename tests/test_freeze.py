"""``train.freeze_position_embeddings`` (the reference's --freeze_pos_embs).

The family names the learned position table of each model; a real DistilGPT2 run under
ZeRO-2 keeps it bit-identical while the rest trains; rotary students are refused up front.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import child_env
from runs import train, write_ds_config, write_run_config


@pytest.mark.parametrize("fixture, table", [("bert_teacher_dir", "bert.embeddings.position_embeddings"),
                                            ("student_dir", "distilbert.embeddings.position_embeddings"),
                                            ("roberta_teacher_dir", "roberta.embeddings.position_embeddings"),
                                            ("gpt2_teacher_dir", "transformer.wpe"),
                                            ("llama_teacher_dir", None)])
def test_each_family_names_its_learned_position_table(request, fixture, table):
    from ds_distil.modeling import family, load_model

    model = load_model(str(request.getfixturevalue(fixture)))
    found = family(model).position_embeddings(model)
    if table is None:  # rotary positions: nothing to freeze
        assert found is None
    else:
        assert found is model.get_submodule(table) and isinstance(found, torch.nn.Embedding)


@pytest.fixture(scope="module")
def gpt2_student(tmp_path_factory, gpt2_teacher_dir):
    from ds_distil.surgery import build_student

    out = tmp_path_factory.mktemp("freeze") / "student"
    build_student(str(gpt2_teacher_dir), str(out))
    return out


@pytest.fixture(scope="module")
def gpt2_data(tmp_path_factory, gpt2_teacher_dir, corpus_file):
    from ds_distil.data import prepare_corpus

    base = tmp_path_factory.mktemp("freeze_data")
    prepare_corpus(str(gpt2_teacher_dir), [str(corpus_file)], str(base / "data"), max_seq_len=64,
                   validation_fraction=0.05, seed=0, cache_dir=str(base / "cache"))
    return base / "data"


def test_frozen_positions_stay_bit_identical_under_zero2_while_the_rest_trains(gpt2_student, gpt2_teacher_dir,
                                                                                gpt2_data, tmp_path):
    from ds_distil.checkpoint import consolidated_state_dict
    from ds_distil.modeling import load_model

    ds = write_ds_config(tmp_path / "ds.json", zero_stage=2, lr=1e-2)
    run = write_run_config(tmp_path / "run.json", student=gpt2_student, teacher=gpt2_teacher_dir, data=gpt2_data,
                           ds_config=ds, output_dir=tmp_path / "out", steps=3,
                           train={"freeze_position_embeddings": True})
    train(run)
    before = load_model(str(gpt2_student)).state_dict()
    after = consolidated_state_dict(tmp_path / "out" / "checkpoints", "global_step3")
    assert torch.equal(after["transformer.wpe.weight"], before["transformer.wpe.weight"])
    # Everything else trained: the token embeddings and a block's attention moved.
    assert not torch.equal(after["transformer.wte.weight"], before["transformer.wte.weight"])
    assert not torch.equal(after["transformer.h.0.attn.c_attn.weight"], before["transformer.h.0.attn.c_attn.weight"])
    resolved = json.loads((tmp_path / "out" / "run_config.json").read_text())
    assert resolved["train"]["freeze_position_embeddings"] is True


def test_a_rotary_student_is_refused_by_check(llama_teacher_dir, tmp_path, corpus_file):
    from ds_distil.data import prepare_corpus

    data = tmp_path / "data"
    prepare_corpus(str(llama_teacher_dir), [str(corpus_file)], str(data), max_seq_len=32, validation_fraction=0.05,
                   seed=0, cache_dir=str(tmp_path / "cache"))
    run = write_run_config(tmp_path / "run.json", student=llama_teacher_dir, data=data,
                           ds_config=write_ds_config(tmp_path / "ds.json"), output_dir=tmp_path / "out",
                           loss={"alpha_ce": 0.0, "alpha_cos": 0.0, "alpha_clm": 1.0},
                           train={"freeze_position_embeddings": True})
    proc = subprocess.run([sys.executable, "-m", "ds_distil", "train", "--config", str(run), "--check"],
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "train.freeze_position_embeddings: student" in proc.stderr and "rotary positions" in proc.stderr
    assert "set train.freeze_position_embeddings=false" in proc.stderr
