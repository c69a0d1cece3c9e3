"""Causal-LM distillation (DistilGPT2): data, collator, golden losses, and the trainer for real.

A tiny GPT-2 teacher (4 blocks x 32) and its 2-block student, built from scratch here;
the training runs are child processes of ``ds-distil train`` (one process, then the
deepspeed launcher with 2 ranks), on the same trainer, engine and checkpoints as BERT.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import child_env
from runs import losses_by_step, metrics, train, write_ds_config, write_run_config

IGNORE = -100


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def gpt2_prepared(tmp_path_factory, gpt2_teacher_dir, corpus_file):
    """The corpus prepared with the GPT-2 teacher's tokenizer: one line per sequence, max 64."""
    from ds_distil.data import prepare_corpus

    base = tmp_path_factory.mktemp("gpt2_prepared")
    out = base / "data"
    prepare_corpus(str(gpt2_teacher_dir), [str(corpus_file)], str(out), max_seq_len=64, validation_fraction=0.05,
                   seed=0, cache_dir=str(base / "cache"))
    return out


@pytest.fixture(scope="module")
def gpt2_student_dir(tmp_path_factory, gpt2_teacher_dir):
    """The 2-block student of the tiny GPT-2 teacher, dropout off: runs on 1 and 2 ranks then
    compute the same losses (dropout draws depend on each rank's RNG stream)."""
    from ds_distil.surgery import build_student

    out = tmp_path_factory.mktemp("gpt2_student") / "student"
    build_student(str(gpt2_teacher_dir), str(out))
    config = json.loads((out / "config.json").read_text())
    config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    (out / "config.json").write_text(json.dumps(config))
    return out


def _models(gpt2_teacher_dir, gpt2_student_dir):
    from ds_distil.modeling import load_model

    teacher, student = load_model(str(gpt2_teacher_dir)).eval(), load_model(str(gpt2_student_dir)).eval()
    # The student starts as a copy of teacher blocks [0, 3]: perturb it so that L_ce is far from 0.
    torch.manual_seed(0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return teacher, student


def _collated(vocab_size: int, pad_id: int, lengths=(12, 7, 3)):
    from ds_distil.masking import CausalCollator

    gen = torch.Generator().manual_seed(4)
    examples = [{"input_ids": torch.randint(1, vocab_size, (n,), generator=gen).tolist()} for n in lengths]
    return CausalCollator(pad_id=pad_id)(examples, list(range(len(lengths))), epoch=0)


# ---------------------------------------------------------------------------- data and collator

def test_prepare_records_a_causal_objective_and_wraps_lines_in_end_of_text(gpt2_prepared, gpt2_teacher_dir):
    from transformers import AutoTokenizer

    from ds_distil.data import load_prepared

    data = load_prepared(gpt2_prepared)
    tok = data.meta["tokenizer"]
    eot = AutoTokenizer.from_pretrained(str(gpt2_teacher_dir)).convert_tokens_to_ids("<|endoftext|>")
    assert tok["objective"] == "causal" and tok["mask_token_id"] is None and tok["pad_token_id"] == eot
    assert tok["prefix_ids"] == [eot] and tok["suffix_ids"] == [eot]
    first = data.train[0]["input_ids"]
    assert first[0] == eot and first[-1] == eot and eot not in first[1:-1]
    assert data.meta["max_seq_len"] == 64


def test_the_causal_collator_targets_the_next_token_and_ignores_padding():
    batch = _collated(300, pad_id=0)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == (3, 16) and mask.sum(1).tolist() == [12, 7, 3]
    for row, n in enumerate([12, 7, 3]):
        assert labels[row, :n - 1].tolist() == ids[row, 1:n].tolist()  # position i predicts token i + 1
        assert (labels[row, n - 1:] == IGNORE).all()  # the last real token and the padding: no target
    assert batch["num_targets"] == 11 + 6 + 2
    assert batch["target_positions"].tolist() == (labels.flatten() != IGNORE).nonzero().squeeze(1).tolist()


# ---------------------------------------------------------------------------- golden values

def _objective_sums(student, teacher, batch, temperature, rows_mode):
    """The loss sums of the engine's forward (StudentObjective), as the trainer calls it."""
    from ds_distil.modeling import StudentObjective, encode, project

    mask, labels = batch["attention_mask"], batch["labels"]
    select = mask.bool() if rows_mode == "all" else labels != IGNORE
    rows = select.flatten().nonzero().squeeze(1)
    with torch.no_grad():
        t_hidden = encode(teacher, batch["input_ids"], mask)
        t_logits = project(teacher, t_hidden.reshape(-1, t_hidden.shape[-1])[rows])
    objective = StudentObjective(student, temperature)
    return objective(batch["input_ids"], mask, rows, labels.flatten()[rows], t_hidden, t_logits), select


def test_golden_clm_and_next_token_kl_against_plain_pytorch(gpt2_teacher_dir, gpt2_student_dir):
    teacher, student = _models(gpt2_teacher_dir, gpt2_student_dir)
    batch = _collated(teacher.config.vocab_size, pad_id=0)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    T = 2.0
    sums, select = _objective_sums(student, teacher, batch, T, "all")

    # Plain PyTorch on the full HF forward: shift by one, padding out.
    with torch.no_grad():
        s_logits = student(input_ids=ids, attention_mask=mask).logits.float()
        t_logits = teacher(input_ids=ids, attention_mask=mask).logits.float()
    has_next = mask[:, 1:].bool()
    s_next, targets = s_logits[:, :-1][has_next], ids[:, 1:][has_next]
    clm = F.cross_entropy(s_next, targets)
    real = mask.bool()  # L_ce: the next-token distributions at every real position
    kl = F.kl_div(F.log_softmax(s_logits[real] / T, -1), F.log_softmax(t_logits[real] / T, -1),
                  reduction="batchmean", log_target=True) * T**2
    n_targets, n_real = int(has_next.sum()), int(real.sum())
    assert int((batch["labels"] != IGNORE).sum()) == n_targets and int(select.sum()) == n_real
    torch.testing.assert_close(sums["mlm"] / n_targets, clm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sums["ce"] / n_real, kl, rtol=1e-5, atol=1e-6)
    assert float(kl) > 1e-3  # the perturbed student really differs from the teacher
    hits = (s_next.argmax(-1) == targets).sum()
    assert int(sums["mlm_hits"]) == int(hits)


# ---------------------------------------------------------------------------- the trainer

def _run_config(tmp_path, name, student, teacher, data, *, ranks=1, steps=6, **kw):
    # One schedule for every run (8 steps, 2 warm-up), so that runs of different lengths compare.
    ds = write_ds_config(tmp_path / f"{name}_ds.json", global_batch=8, micro_batch=8 // ranks, lr=5e-3,
                         total_steps=8, warmup_steps=2)
    return write_run_config(tmp_path / f"{name}.json", student=student, teacher=teacher, data=data, ds_config=ds,
                            output_dir=tmp_path / name, steps=steps,
                            loss={"alpha_ce": 5.0, "alpha_clm": 2.0, "alpha_cos": 1.0, "alpha_mse": 0.01}, **kw)


@pytest.mark.distributed
def test_distilgpt2_trains_resumes_exactly_exports_and_runs_on_two_ranks(gpt2_teacher_dir, gpt2_student_dir,
                                                                        gpt2_prepared, tmp_path):
    from transformers import AutoModelForCausalLM

    from ds_distil.checkpoint import consolidated_state_dict, export

    # 1. One process, 8 steps, a checkpoint every 4: every term (L_mse too) logged, the loss falls.
    full = _run_config(tmp_path, "full", gpt2_student_dir, gpt2_teacher_dir, gpt2_prepared, steps=8,
                       checkpoint_interval=4)
    result = train(full)
    rows = metrics(tmp_path / "full")
    assert "causal LM; teacher on" in result.stdout
    for r in rows:
        assert set(r) >= {"loss_ce", "loss_clm", "loss_cos", "loss_mse", "clm_accuracy"} and "loss_mlm" not in r
        assert r["loss"] == pytest.approx(5 * r["loss_ce"] + 2 * r["loss_clm"] + r["loss_cos"] + 0.01 * r["loss_mse"],
                                          rel=1e-6)
    assert rows[-1]["loss_clm"] < rows[0]["loss_clm"] and rows[-1]["loss"] < rows[0]["loss"], rows
    evals = metrics(tmp_path / "full", "Eval")
    assert evals and evals[-1]["perplexity"] > 1 and "clm_accuracy" in evals[-1]
    expected = losses_by_step(tmp_path / "full")

    # 2. Resume from the step-4 checkpoint in another output_dir: steps 5-8 are bit-identical.
    resumed_dir = tmp_path / "resumed"
    resumed = _run_config(tmp_path, "resumed", gpt2_student_dir, gpt2_teacher_dir, gpt2_prepared, steps=8)
    train(resumed, f"resume={tmp_path / 'full' / 'checkpoints' / 'global_step4'}")
    again = losses_by_step(resumed_dir)
    assert {s: again[s] for s in range(5, 9)} == {s: expected[s] for s in range(5, 9)}

    # 3. Export: transformers alone loads a GPT2LMHeadModel equal to the engine's weights.
    out = export(tmp_path / "full", tmp_path / "exported")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported"), local_files_only=True)
    assert type(model).__name__ == "GPT2LMHeadModel" and out is not None
    engine_sd = consolidated_state_dict(tmp_path / "full" / "checkpoints", "global_step8")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, engine_sd[name]), name

    # 4. The deepspeed launcher with 2 ranks (4 sequences each) trains on the same batches.
    two = _run_config(tmp_path, "two", gpt2_student_dir, gpt2_teacher_dir, gpt2_prepared, ranks=2, steps=4)
    train(two, ranks=2, timeout=400)
    two_losses = losses_by_step(tmp_path / "two")
    for step in range(1, 5):
        assert two_losses[step] == pytest.approx(expected[step], rel=1e-4), (step, two_losses, expected)


def test_a_student_of_another_vocabulary_is_refused_naming_both_sizes(gpt2_teacher_dir, gpt2_prepared,
                                                                      corpus_lines, tmp_path):
    """A GPT-2 student with another tokenizer: refused before any model loads, one line each."""
    from transformers import AutoTokenizer

    from ds_distil.scratch import new_gpt2_teacher, train_gpt2_tokenizer

    other = tmp_path / "other"
    train_gpt2_tokenizer(corpus_lines[:200], vocab_size=280, output_dir=other)
    new_gpt2_teacher(AutoTokenizer.from_pretrained(str(other)), num_layers=2, output_dir=other)
    run = _run_config(tmp_path, "run", other, gpt2_teacher_dir, gpt2_prepared)
    proc = subprocess.run([sys.executable, "-m", "ds_distil", "train", "--config", str(run), "--check"],
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    vocab = [line for line in lines if "vocab_size" in line]
    assert len(vocab) == 1 and f"has vocab_size {len(AutoTokenizer.from_pretrained(str(other)))}" in vocab[0]
    assert f"but teacher {gpt2_teacher_dir} has 300" in vocab[0]
    assert any("has another tokenizer than teacher" in line for line in lines)  # the tokens differ too
    assert all(line.startswith("ds-distil train: error: ") for line in lines)  # one line per problem


def test_a_masked_student_with_a_causal_teacher_is_refused(gpt2_teacher_dir, student_dir, prepared_dir,
                                                            gpt2_prepared, gpt2_student_dir, tmp_path):
    """The trainer's objective check, run before any weights load: student, teacher and data agree."""
    from ds_distil.config import read_run_config
    from ds_distil.data import load_prepared
    from ds_distil.errors import UserError
    from ds_distil.trainer import check_objectives

    def config(student, teacher):
        plain = [] if teacher else ["loss.alpha_ce=0", "loss.alpha_cos=0", "loss.alpha_mse=0"]  # LM term only
        cfg, problems = read_run_config(str(_run_config(tmp_path, "run", student, teacher, prepared_dir)), plain)
        assert not problems, problems
        return cfg

    masked_data, causal_data = load_prepared(prepared_dir).meta, load_prepared(gpt2_prepared).meta
    with pytest.raises(UserError, match="is a causal LM but student .* is a masked LM: distillation needs one"):
        check_objectives(config(student_dir, gpt2_teacher_dir), masked_data)
    with pytest.raises(UserError, match="was prepared for a causal LM .* is a masked LM"):
        check_objectives(config(student_dir, None), causal_data)
    assert check_objectives(config(gpt2_student_dir, gpt2_teacher_dir), causal_data) == "causal"
    assert check_objectives(config(student_dir, None), masked_data) == "masked"


def test_block_unit_joins_documents_with_end_of_text_into_full_blocks_per_split(gpt2_teacher_dir, bert_teacher_dir,
                                                                                tmp_path):
    from transformers import AutoTokenizer

    from conftest import make_corpus_lines
    from ds_distil.data import load_prepared, prepare_corpus
    from ds_distil.errors import UserError

    lines = make_corpus_lines(240, seed=11, min_words=4, max_words=8)
    corpus = tmp_path / "docs.txt"  # 120 short documents of 2 lines, blank-line separated
    corpus.write_text("\n\n".join("\n".join(lines[i:i + 2]) for i in range(0, 240, 2)) + "\n")
    meta = prepare_corpus(str(gpt2_teacher_dir), [str(corpus)], str(tmp_path / "blocks"), max_seq_len=64,
                          validation_fraction=0.2, seed=0, cache_dir=str(tmp_path / "cache"), unit="block")
    assert meta["unit"] == "block" and meta["report"]["documents"] == 120 and meta["report"]["lines"] == 240
    data = load_prepared(tmp_path / "blocks")
    eot = AutoTokenizer.from_pretrained(str(gpt2_teacher_dir)).convert_tokens_to_ids("<|endoftext|>")
    interior, separators = {}, 0
    for name, split in (("train", data.train), ("validation", data.validation)):
        blocks = [list(ids) for ids in split["input_ids"]]
        assert sum(len(b) != 64 for b in blocks) <= 1, [len(b) for b in blocks]  # one tail per split at most
        separators += sum(b.count(eot) for b in blocks)
        # Whole documents (between two end-of-text tokens inside a block) of each split.
        interior[name] = {tuple(seg) for b in blocks for seg in _segments(b, eot)[1:-1] if seg}
    # One end-of-text after every document (a dropped short tail may hold the last ones).
    assert 120 - meta["report"]["too_short"] <= separators <= 120
    assert interior["train"] and interior["validation"]
    assert not interior["train"] & interior["validation"]  # no document in both splits
    with pytest.raises(UserError, match="--unit block joins documents into blocks for causal LMs"):
        prepare_corpus(str(bert_teacher_dir), [str(corpus)], str(tmp_path / "no"), unit="block",
                       cache_dir=str(tmp_path / "cache"))


def _segments(ids: list[int], separator: int) -> list[list[int]]:
    out, current = [], []
    for token in ids:
        if token == separator:
            out.append(current)
            current = []
        else:
            current.append(token)
    return out + [current]


def test_no_block_mixes_training_and_held_out_documents(gpt2_teacher_dir):
    """Each block holds documents of one split only (the split its key gives), so no held-out
    text is trained on, not even the part of a document that runs into the next block."""
    from transformers import AutoTokenizer

    from conftest import make_corpus_lines
    from ds_distil.data import KEPT, Tokenise, bare_backend, text_hash, uniform_hash

    tokenizer = AutoTokenizer.from_pretrained(str(gpt2_teacher_dir))
    eot = tokenizer.eos_token_id
    docs = make_corpus_lines(80, seed=12, min_words=6, max_words=30)
    split = (0.5, 3)
    tokenise = Tokenise(bare_backend(tokenizer).to_str(), [eot], [eot], 32, 12, None, unit="block",
                        separator=eot, split=split)
    out = tokenise(docs, list(range(len(docs))))
    held_out = {tuple(tokenizer(d, add_special_tokens=False)["input_ids"]):
                bool(uniform_hash(np.asarray([text_hash(d)], dtype=np.uint64), split[1])[0] < split[0]) for d in docs}
    assert 10 < sum(held_out.values()) < 70
    streams = {True: [], False: []}
    for ids, status, key in zip(out["input_ids"], out["status"], out["key"]):
        if status == KEPT:
            block_split = bool(uniform_hash(np.asarray([key], dtype=np.uint64), split[1])[0] < split[0])
            streams[block_split].extend(ids)
    for flag, tokens in streams.items():  # each split's blocks, re-joined, are its documents in order
        expected = [t for d, h in held_out.items() if h == flag for t in (*d, eot)]
        assert tokens == expected[:len(tokens)]
        assert len(expected) - len(tokens) < 12  # only a tail under min_tokens is dropped
