"""Shared fixtures: tiny teachers, tokenizers and corpora built locally (nothing downloaded)."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

# Keep every test on the CPU accelerator and off any hub.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# One cache for DeepSpeed's JIT-compiled ops, shared by every child process (torch uses
# the directory as given; leaving it unset in some processes and set in others rebuilds).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One ninja for every process that builds DeepSpeed's JIT op (this one and all children):
# the venv's. Ninja 1.13 (pip) and 1.11 (Debian) hash the same compile command differently,
# so processes finding different ninjas on PATH rebuild the op back and forth, ~40 s each
# time on two cores (tests/cluster.py's child_env already puts the venv first).
_VENV_BIN = str(Path(os.path.abspath(sys.executable)).parent)  # not resolve(): a venv python is a symlink
if os.environ.get("PATH", "").split(os.pathsep)[0] != _VENV_BIN:
    os.environ["PATH"] = os.pathsep.join([_VENV_BIN, *filter(None, os.environ.get("PATH", "").split(os.pathsep))])

REPO_ROOT = Path(__file__).resolve().parent.parent

_WORDS = ("the a of to and in is that for it as with was on be by this are from or an at which "
          "model layer student teacher token loss batch rank node gradient weight data mask "
          "train learn distil small fast large deep network word text sentence language vector "
          "attention head hidden embedding position value query key output input sequence step").split()


def make_corpus_lines(n_lines: int, seed: int = 0, min_words: int = 4, max_words: int = 60) -> list[str]:
    """Deterministic pseudo-English lines with a Zipf-ish word distribution."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) for i in range(len(_WORDS))]
    lines = []
    for _ in range(n_lines):
        n = rng.randint(min_words, max_words)
        lines.append(" ".join(rng.choices(_WORDS, weights=weights, k=n)) + ".")
    return lines


@pytest.fixture(scope="session")
def corpus_lines() -> list[str]:
    return make_corpus_lines(400)


@pytest.fixture(scope="session")
def bert_tokenizer_dir(tmp_path_factory, corpus_lines) -> Path:
    from ds_distil.scratch import train_wordpiece_tokenizer

    out = tmp_path_factory.mktemp("bert_tokenizer")
    train_wordpiece_tokenizer(corpus_lines, vocab_size=160, output_dir=out)
    return out


@pytest.fixture(scope="session")
def bert_teacher_dir(tmp_path_factory, bert_tokenizer_dir) -> Path:
    """A 4-layer, 32-wide BertForMaskedLM with its WordPiece tokenizer."""
    from transformers import AutoTokenizer

    from ds_distil.scratch import new_bert_teacher

    out = tmp_path_factory.mktemp("bert_teacher")
    tokenizer = AutoTokenizer.from_pretrained(str(bert_tokenizer_dir))
    new_bert_teacher(tokenizer, num_layers=4, hidden_size=32, num_heads=2, intermediate_size=64,
                     max_position=128, seed=1, output_dir=out)
    return out


@pytest.fixture(scope="session")
def roberta_teacher_dir(tmp_path_factory, corpus_lines) -> Path:
    """A 4-layer, 32-wide RobertaForMaskedLM with a byte-level BPE tokenizer."""
    from ds_distil.scratch import new_roberta_teacher, train_bpe_tokenizer

    out = tmp_path_factory.mktemp("roberta_teacher")
    tokenizer = train_bpe_tokenizer(corpus_lines, vocab_size=300, output_dir=out)
    new_roberta_teacher(tokenizer, num_layers=4, hidden_size=32, num_heads=2, intermediate_size=64,
                        max_position=128, seed=2, output_dir=out)
    return out


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(tmp_path_factory, corpus_lines) -> Path:
    from ds_distil.scratch import train_gpt2_tokenizer

    out = tmp_path_factory.mktemp("gpt2_tokenizer")
    train_gpt2_tokenizer(corpus_lines, vocab_size=300, output_dir=out)
    return out


@pytest.fixture(scope="session")
def gpt2_teacher_dir(tmp_path_factory, gpt2_tokenizer_dir) -> Path:
    """A 4-layer, 32-wide GPT2LMHeadModel (lm_head tied to wte) with its byte-level BPE tokenizer."""
    from transformers import AutoTokenizer

    from ds_distil.scratch import new_gpt2_teacher

    out = tmp_path_factory.mktemp("gpt2_teacher")
    new_gpt2_teacher(AutoTokenizer.from_pretrained(str(gpt2_tokenizer_dir)), num_layers=4, hidden_size=32,
                     num_heads=2, max_position=128, seed=3, output_dir=out)
    return out


@pytest.fixture(scope="session")
def llama_teacher_dir(tmp_path_factory, gpt2_tokenizer_dir) -> Path:
    """A 4-layer, 32-wide LlamaForCausalLM, untied head, grouped-query attention."""
    from transformers import AutoTokenizer

    from ds_distil.scratch import new_llama_teacher

    out = tmp_path_factory.mktemp("llama_teacher")
    new_llama_teacher(AutoTokenizer.from_pretrained(str(gpt2_tokenizer_dir)), num_layers=4, hidden_size=32,
                      seed=4, output_dir=out)
    return out


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """A text corpus of ~1,500 lines (one sequence per line) for training runs."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(make_corpus_lines(1500, seed=7, min_words=10, max_words=40)) + "\n")
    return path


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory, bert_teacher_dir, corpus_file) -> Path:
    """The corpus prepared with the tiny BERT teacher's tokenizer (max length 64)."""
    from ds_distil.data import prepare_corpus

    base = tmp_path_factory.mktemp("prepared")
    out = base / "data"
    prepare_corpus(str(bert_teacher_dir), [str(corpus_file)], str(out), max_seq_len=64,
                   validation_fraction=0.05, seed=0, cache_dir=str(base / "cache"))
    return out


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory, bert_teacher_dir) -> Path:
    """A 2-layer DistilBERT student built from the tiny BERT teacher."""
    from ds_distil.surgery import build_student

    out = tmp_path_factory.mktemp("student") / "student"
    build_student(str(bert_teacher_dir), str(out), num_layers=2)
    return out


def child_env(**extra) -> dict:
    """Environment for ds-distil child processes: CPU accelerator, loopback, one thread each."""
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env
