"""Model families: the lookup, and init-student for decoders (GPT-2, Llama-style).

Tiny scratch teachers built here (4 layers, 32 wide, nothing downloaded); full-size
parameter counts come from configs built on the meta device (no weights, no memory).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ds_distil.errors import UserError
from ds_distil.models import FAMILIES, TEACHER_CLASSES, family_of
from ds_distil.surgery import build_student, load_teacher, make_student, student_config

REPO_ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def gpt2_teacher(gpt2_teacher_dir):
    return load_teacher(gpt2_teacher_dir)[0]


@pytest.fixture(scope="module")
def llama_teacher(llama_teacher_dir):
    return load_teacher(llama_teacher_dir)[0]


def _batch(vocab_size: int, pad_id: int, lengths=(9, 6, 3), seed: int = 0):
    """Random token ids, right-padded to the longest length, and their attention mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab_size, (len(lengths), max(lengths)), generator=gen)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return ids.masked_fill(mask == 0, pad_id), mask


def _causal_masks(teacher, student, hidden, mask2d):
    from transformers.masking_utils import create_causal_mask

    positions = torch.arange(hidden.shape[1]).unsqueeze(0)
    return tuple(create_causal_mask(config=m.config, inputs_embeds=hidden, attention_mask=mask2d,
                                    past_key_values=None, position_ids=positions, allow_is_causal_skip=False)
                 for m in (teacher, student))


# ---------------------------------------------------------------------------- the lookup

def test_every_family_is_found_from_a_config_dict_a_config_and_a_model(gpt2_teacher, llama_teacher):
    assert family_of({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}).name == "gpt2"
    assert family_of({"model_type": "xlm-roberta"}).name == "roberta"  # no architectures: the default class
    assert family_of({"model_type": "qwen2"}).name == "llama"
    assert family_of({"architectures": ["DistilBertForMaskedLM"]}).name == "distilbert"
    assert family_of({"architectures": ["T5ForConditionalGeneration"]}) is None
    assert family_of(gpt2_teacher.config).name == family_of(gpt2_teacher).name == "gpt2"
    assert family_of(llama_teacher).objective == "causal"
    assert {f.name: f.objective for f in FAMILIES} == {"bert": "masked", "distilbert": "masked",
                                                      "roberta": "masked", "modernbert": "masked",
                                                      "gpt2": "causal", "llama": "causal"}
    for teacher_class in TEACHER_CLASSES:  # every student class exists in transformers
        import transformers

        assert hasattr(transformers, family_of({"architectures": [teacher_class]}).student_class(teacher_class))


# ---------------------------------------------------------------------------- GPT-2 surgery

def test_gpt2_student_is_half_depth_with_every_tensor_copied(gpt2_teacher):
    student, report = make_student(gpt2_teacher)
    assert type(student).__name__ == "GPT2LMHeadModel"
    assert report["layer_map"] == [0, 3] and student.config.n_layer == 2
    assert report["left_random"] == [] and report["folded"] == {}
    t_sd, s_sd = gpt2_teacher.state_dict(), student.state_dict()
    assert set(report["copied"]) == set(s_sd)
    for s_key, t_key in report["copied"].items():
        assert torch.equal(s_sd[s_key], t_sd[t_key]), s_key
    assert report["copied"]["transformer.h.1.attn.c_attn.weight"] == "transformer.h.3.attn.c_attn.weight"
    assert report["copied"]["transformer.wpe.weight"] == "transformer.wpe.weight"  # learned positions
    assert report["copied"]["transformer.ln_f.weight"] == "transformer.ln_f.weight"  # final norm
    assert report["dropped"]["transformer.h.1.mlp.c_fc.weight"] == "teacher layer 1 is not in the layer map"
    # Tied head: one tensor with the word embeddings, as in the teacher.
    assert student.lm_head.weight.data_ptr() == student.transformer.wte.weight.data_ptr()


@torch.no_grad()
def test_each_gpt2_student_block_computes_its_teacher_block(gpt2_teacher):
    student, report = make_student(gpt2_teacher, layers=[0, 2, 3])
    hidden = torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(1))
    _, mask2d = _batch(gpt2_teacher.config.vocab_size, 0)
    t_mask, s_mask = _causal_masks(gpt2_teacher, student, hidden, mask2d)
    assert t_mask is not None
    for i, t in enumerate(report["layer_map"]):
        expected = gpt2_teacher.transformer.h[t](hidden, attention_mask=t_mask)
        got = student.transformer.h[i](hidden, attention_mask=s_mask)
        assert torch.equal(got, expected), (i, t)
        other = gpt2_teacher.transformer.h[(t + 1) % 4](hidden, attention_mask=t_mask)
        assert (got - other).abs().max() > 1e-3  # a different block really differs


@torch.no_grad()
def test_a_gpt2_student_keeping_every_block_reproduces_the_teachers_logits(gpt2_teacher):
    student, _ = make_student(gpt2_teacher, num_layers=4)
    ids, mask = _batch(gpt2_teacher.config.vocab_size, 0)
    real = mask.bool()
    assert torch.equal(student(input_ids=ids, attention_mask=mask).logits[real],
                       gpt2_teacher(input_ids=ids, attention_mask=mask).logits[real])


def test_gpt2_full_size_parameter_counts():
    """GPT-2 small (124M) -> 6 blocks: DistilGPT2's 82M."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
                        architectures=["GPT2LMHeadModel"])
    with torch.device("meta"):
        teacher = GPT2LMHeadModel(config)
        student = GPT2LMHeadModel(student_config(config, 6))
    assert teacher.num_parameters() == 124_439_808
    assert student.num_parameters() == 81_912_576  # wte 38.6M + wpe 0.8M + 6 x 7.09M + ln_f
    assert student.config.n_layer == 6 and student.config.tie_word_embeddings


# ---------------------------------------------------------------------------- Llama surgery

@torch.no_grad()
@pytest.mark.parametrize("tied", [False, True])
def test_each_llama_student_layer_computes_its_teacher_layer(gpt2_tokenizer_dir, tied):
    from transformers import AutoTokenizer

    from ds_distil.scratch import new_llama_teacher

    teacher = new_llama_teacher(AutoTokenizer.from_pretrained(str(gpt2_tokenizer_dir)), tie_word_embeddings=tied,
                                seed=5).eval()
    student, report = make_student(teacher)
    assert report["layer_map"] == [0, 3] and type(student).__name__ == "LlamaForCausalLM"
    assert set(report["copied"]) == set(student.state_dict())
    assert report["copied"]["model.norm.weight"] == "model.norm.weight"
    tied_now = student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert tied_now is tied and student.config.tie_word_embeddings is tied
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)

    hidden = torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(2))
    _, mask2d = _batch(teacher.config.vocab_size, 0)
    t_mask, s_mask = _causal_masks(teacher, student, hidden, mask2d)
    positions = torch.arange(9).unsqueeze(0)
    t_rope, s_rope = teacher.model.rotary_emb(hidden, positions), student.model.rotary_emb(hidden, positions)
    for i, t in enumerate(report["layer_map"]):
        expected = teacher.model.layers[t](hidden, attention_mask=t_mask, position_embeddings=t_rope,
                                           position_ids=positions)
        got = student.model.layers[i](hidden, attention_mask=s_mask, position_embeddings=s_rope,
                                      position_ids=positions)
        assert torch.equal(got, expected), (i, t)

    full, _ = make_student(teacher, num_layers=4)
    ids, mask = _batch(teacher.config.vocab_size, 0)
    real = mask.bool()
    assert torch.equal(full(input_ids=ids, attention_mask=mask).logits[real],
                       teacher(input_ids=ids, attention_mask=mask).logits[real])


def test_per_layer_attention_types_follow_the_layer_map():
    """Qwen2 with sliding-window attention above layer 2: each kept layer keeps its kind."""
    from transformers import Qwen2Config

    config = Qwen2Config(num_hidden_layers=6, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=64, vocab_size=100, use_sliding_window=True, sliding_window=16,
                         max_window_layers=2, architectures=["Qwen2ForCausalLM"])
    assert config.layer_types[:2] == ["full_attention"] * 2 and config.layer_types[2] == "sliding_attention"
    student = student_config(config, [0, 1, 5])
    assert student.num_hidden_layers == 3
    assert student.layer_types == ["full_attention", "full_attention", "sliding_attention"]


def test_llama_full_size_parameter_counts():
    """A TinyLlama-1.1B-shaped config (22 layers, GQA, untied head) -> 11 layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=22, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        teacher = LlamaForCausalLM(config)
        student = LlamaForCausalLM(student_config(config, 11))
    per_layer = 2 * 2048 * 2048 + 2 * 2048 * 256 + 3 * 2048 * 5632 + 2 * 2048
    embeddings_and_head = 2 * 32000 * 2048 + 2048
    assert teacher.num_parameters() == 22 * per_layer + embeddings_and_head == 1_100_048_384
    assert student.num_parameters() == 11 * per_layer + embeddings_and_head == 615_561_216


# ---------------------------------------------------------------------------- on disk

def test_built_gpt2_student_reloads_with_transformers_alone(gpt2_teacher_dir, gpt2_teacher, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "student"
    report = build_student(gpt2_teacher_dir, out)
    assert json.loads((out / "layer_map.json").read_text())["layer_map"] == report["layer_map"] == [0, 3]
    assert report["teacher"]["fingerprint"].startswith("sha256:")
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config.n_layer == 2
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert torch.equal(model.transformer.h[1].mlp.c_fc.weight, gpt2_teacher.transformer.h[3].mlp.c_fc.weight)
    tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(str(gpt2_teacher_dir)).get_vocab()


def test_built_llama_student_reloads_with_transformers_alone(llama_teacher_dir, llama_teacher, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "student"
    build_student(llama_teacher_dir, out, layers=[1, 3])
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert model.config.num_hidden_layers == 2 and not model.config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, llama_teacher.lm_head.weight)
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, llama_teacher.model.layers[1].mlp.up_proj.weight)


def test_a_gpt2_config_without_depth_is_a_user_error(gpt2_teacher_dir, tmp_path):
    import shutil

    from ds_distil.surgery import read_teacher_config

    broken = tmp_path / "t"
    shutil.copytree(gpt2_teacher_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    del config["n_layer"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="n_layer is None; expected a positive integer"):
        read_teacher_config(broken)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-m", "ds_distil", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_builds_a_gpt2_student(gpt2_teacher_dir, tmp_path):
    proc = _cli("init-student", "--teacher", str(gpt2_teacher_dir), "--output", str(tmp_path / "s"))
    assert proc.returncode == 0, proc.stderr
    assert "student      GPT2LMHeadModel, 2 layers" in proc.stdout
    assert "layer map    teacher -> student: 0->0, 3->1" in proc.stdout



# ---------------------------------------------------------------------------- ModernBERT surgery

@pytest.fixture(scope="module")
def modernbert_teacher_dir(tmp_path_factory, bert_tokenizer_dir):
    """A 6-layer ModernBertForMaskedLM: global attention in layers 0 and 3, a window of 8 elsewhere."""
    from transformers import AutoTokenizer

    from ds_distil.scratch import new_modernbert_teacher

    out = tmp_path_factory.mktemp("modernbert_teacher")
    new_modernbert_teacher(AutoTokenizer.from_pretrained(str(bert_tokenizer_dir)), seed=6, output_dir=out)
    return out


def _layer_calls(model, layers, ids, mask):
    """(args, kwargs, output) of each listed layer in one forward pass of ``model``."""
    calls = {}

    def record(index):
        def hook(_module, args, kwargs, out):
            calls[index] = (args, kwargs, out)  # returns None: the output stays as it is
        return hook

    hooks = [model.model.layers[i].register_forward_hook(record(i), with_kwargs=True) for i in layers]
    try:
        model(input_ids=ids, attention_mask=mask)
    finally:
        for hook in hooks:
            hook.remove()
    return calls


@torch.no_grad()
def test_each_modernbert_student_layer_computes_its_teacher_layer(modernbert_teacher_dir, tmp_path):
    from transformers import AutoModelForMaskedLM

    teacher = load_teacher(modernbert_teacher_dir)[0]
    student, report = make_student(teacher)
    assert report["layer_map"] == [0, 3, 5] and report["warnings"] == []
    assert teacher.config.layer_types[:4] == ["full_attention", "sliding_attention", "sliding_attention",
                                              "full_attention"]
    assert student.config.layer_types == ["full_attention", "full_attention", "sliding_attention"]
    assert set(report["copied"]) == set(student.state_dict())
    assert student.decoder.weight.data_ptr() == student.model.embeddings.tok_embeddings.weight.data_ptr()
    # 20 tokens: longer than the sliding window, so each layer's attention kind matters.
    ids, mask = _batch(teacher.config.vocab_size, teacher.config.pad_token_id, lengths=(20, 13, 5))
    calls = _layer_calls(teacher, report["layer_map"], ids, mask)
    for i, t in enumerate(report["layer_map"]):
        args, kwargs, expected = calls[t]
        assert torch.equal(student.model.layers[i](*args, **kwargs), expected), (i, t)
    full, _ = make_student(teacher, num_layers=6)
    real = mask.bool()
    assert torch.equal(full(input_ids=ids, attention_mask=mask).logits[real],
                       teacher(input_ids=ids, attention_mask=mask).logits[real])

    out = tmp_path / "student"
    build_student(modernbert_teacher_dir, out)
    reloaded = AutoModelForMaskedLM.from_pretrained(str(out), local_files_only=True)
    assert type(reloaded).__name__ == "ModernBertForMaskedLM" and reloaded.config.num_hidden_layers == 3
    assert torch.equal(reloaded.model.layers[2].mlp.Wi.weight, teacher.model.layers[5].mlp.Wi.weight)


def test_a_modernbert_map_without_layer_0_drops_its_attention_norm_and_says_so(modernbert_teacher_dir):
    teacher = load_teacher(modernbert_teacher_dir)[0]
    _, report = make_student(teacher, layers=[1, 3, 5])
    assert "without its attention norm" in report["warnings"][0]
    assert "no attention norm" in report["dropped"]["model.layers.1.attn_norm.weight"]
    assert report["copied"]["model.layers.1.attn_norm.weight"] == "model.layers.3.attn_norm.weight"


def test_finetune_takes_a_modernbert_and_learns_a_separable_task(modernbert_teacher_dir, tmp_path):
    """``ds-distil finetune`` on ModernBERT (transformers' ModernBertForSequenceClassification):
    a custom task whose label is which of two words a sentence holds."""
    import random

    from conftest import child_env, make_corpus_lines

    data = tmp_path / "task"
    data.mkdir()
    for split, n, seed in (("train", 480, 1), ("dev", 120, 2)):
        rng, rows = random.Random(seed), []
        for line in make_corpus_lines(n, seed=seed, min_words=4, max_words=12):
            word = rng.choice(("teacher", "student"))
            words = [w for w in line.rstrip(".").split() if w not in ("teacher", "student")]
            words.insert(rng.randint(0, len(words)), word)
            rows.append(json.dumps({"text": " ".join(words), "label": word}))
        (data / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "ft"
    proc = subprocess.run([sys.executable, "-m", "ds_distil", "finetune", "--models", f"modernbert={modernbert_teacher_dir}",
                           "--task", "keyword", "--data", str(data), "--text-columns", "text", "--output", str(out),
                           "--lr", "3e-3", "--seeds", "1", "--epochs", "6", "--batch-size", "32",
                           "--max-seq-len", "32", "--log-interval", "1000"],
                          env=child_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    task = json.loads((out / "results.json").read_text())["models"]["modernbert"]["tasks"]["keyword"]
    assert task["score"] >= 90, task
    from transformers import AutoModelForSequenceClassification

    assert type(AutoModelForSequenceClassification.from_pretrained(task["model"])).__name__ == \
        "ModernBertForSequenceClassification"
