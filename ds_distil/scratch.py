"""Tokenizers and teachers made from scratch, with nothing downloaded.

The demo uses these to make its own teacher from text on the machine; the tests use them
to build tiny BERT, RoBERTa, ModernBERT, GPT-2 and Llama teachers. Everything is written in Hugging Face format so
the rest of ds-distil treats it exactly like a downloaded checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
END_OF_TEXT = "<|endoftext|>"  # GPT-2's one special token: document separator, bos, eos and unk


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int, output_dir: str | Path,
                              lowercase: bool = True, model_max_length: int = 512):
    """Train a BERT WordPiece tokenizer on ``texts`` and save it to ``output_dir``."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordPiece
    from tokenizers.trainers import WordPieceTrainer
    from transformers import BertTokenizer

    raw = Tokenizer(WordPiece(unk_token="[UNK]"))
    raw.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    raw.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = WordPieceTrainer(vocab_size=vocab_size, special_tokens=BERT_SPECIALS, show_progress=False)
    raw.train_from_iterator(_as_iterator(texts), trainer=trainer)
    # The trainer gathers the alphabet in a hash set, whose order changes from run to run:
    # number the tokens in a fixed order instead, so that the same tokens get the same ids
    # and a seeded run the same numbers. (The token set can still differ where merges tie, on
    # a tiny corpus; two runs on the demo's 16 MB learnt the same 2,048 tokens.)
    learned = [token for token in raw.get_vocab() if token not in BERT_SPECIALS]
    vocab = {token: i for i, token in enumerate([*BERT_SPECIALS, *sorted(learned)])}
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=lowercase, model_max_length=model_max_length)
    tokenizer.save_pretrained(str(output_dir))
    return tokenizer


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, output_dir: str | Path,
                        model_max_length: int = 512):
    """Train a byte-level BPE tokenizer (RoBERTa style) on ``texts`` and save it."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import RobertaTokenizer

    raw = Tokenizer(BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=ROBERTA_SPECIALS, show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(_as_iterator(texts), trainer=trainer)
    model = raw.model
    vocab = raw.get_vocab()
    # tokenizers keeps merges inside the model; round-trip through its JSON to read them.
    import json
    merges = json.loads(raw.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    del model
    tokenizer = RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    tokenizer.save_pretrained(str(output_dir))
    return tokenizer


def train_gpt2_tokenizer(texts: Iterable[str], vocab_size: int, output_dir: str | Path,
                         model_max_length: int = 1024):
    """Train a GPT-2 style byte-level BPE tokenizer (one special token, ``<|endoftext|>``).

    GPT-2 has no padding token; batches are padded with ``<|endoftext|>`` and told apart
    by their attention mask, so it is the pad token too (as is usual for decoders).
    """
    import json

    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import GPT2Tokenizer

    raw = Tokenizer(BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    raw.train_from_iterator(_as_iterator(texts), trainer=trainer)
    merges = json.loads(raw.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    tokenizer = GPT2Tokenizer(vocab=raw.get_vocab(), merges=merges, pad_token=END_OF_TEXT,
                              model_max_length=model_max_length)
    tokenizer.save_pretrained(str(output_dir))
    return tokenizer


def new_gpt2_teacher(tokenizer, num_layers: int = 4, hidden_size: int = 32, num_heads: int = 2,
                     max_position: int = 128, seed: int = 0, output_dir: str | Path | None = None,
                     dropout: float = 0.1):
    """A randomly initialised ``GPT2LMHeadModel`` (head tied to ``wte``) matching ``tokenizer``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    eot = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=max_position, n_embd=hidden_size,
                        n_layer=num_layers, n_head=num_heads, resid_pdrop=dropout, embd_pdrop=dropout,
                        attn_pdrop=dropout, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    return _initialised(GPT2LMHeadModel, config, tokenizer, seed, output_dir)


def new_llama_teacher(tokenizer, num_layers: int = 4, hidden_size: int = 32, num_heads: int = 4,
                      num_kv_heads: int = 2, intermediate_size: int = 64, max_position: int = 128,
                      tie_word_embeddings: bool = False, seed: int = 0, output_dir: str | Path | None = None):
    """A randomly initialised ``LlamaForCausalLM`` (grouped-query attention, rotary positions)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    eot = tokenizer.eos_token_id
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, max_position_embeddings=max_position,
                         tie_word_embeddings=tie_word_embeddings, bos_token_id=eot, eos_token_id=eot,
                         pad_token_id=tokenizer.pad_token_id)
    return _initialised(LlamaForCausalLM, config, tokenizer, seed, output_dir)


def new_modernbert_teacher(tokenizer, num_layers: int = 6, hidden_size: int = 32, num_heads: int = 2,
                           intermediate_size: int = 64, max_position: int = 128, local_attention: int = 8,
                           seed: int = 0, output_dir: str | Path | None = None):
    """A randomly initialised ``ModernBertForMaskedLM`` (global attention every third layer,
    sliding-window attention of ``local_attention`` tokens in the others) matching ``tokenizer``."""
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    config = ModernBertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                              num_attention_heads=num_heads, intermediate_size=intermediate_size,
                              max_position_embeddings=max_position, local_attention=local_attention,
                              pad_token_id=tokenizer.pad_token_id, cls_token_id=tokenizer.cls_token_id,
                              sep_token_id=tokenizer.sep_token_id, bos_token_id=tokenizer.cls_token_id,
                              eos_token_id=tokenizer.sep_token_id)
    return _initialised(ModernBertForMaskedLM, config, tokenizer, seed, output_dir)


def new_bert_teacher(tokenizer, num_layers: int = 4, hidden_size: int = 128, num_heads: int = 2,
                     intermediate_size: int = 512, max_position: int = 512, seed: int = 0,
                     output_dir: str | Path | None = None, dropout: float = 0.1):
    """A randomly initialised ``BertForMaskedLM`` matching ``tokenizer``; saved if asked.

    ``dropout`` is BERT's hidden and attention dropout (0.1 in the published models)."""
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                        num_attention_heads=num_heads, intermediate_size=intermediate_size,
                        max_position_embeddings=max_position, pad_token_id=tokenizer.pad_token_id,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return _initialised(BertForMaskedLM, config, tokenizer, seed, output_dir)


def new_roberta_teacher(tokenizer, num_layers: int = 4, hidden_size: int = 128, num_heads: int = 2,
                        intermediate_size: int = 512, max_position: int = 512, seed: int = 0,
                        output_dir: str | Path | None = None):
    """A randomly initialised ``RobertaForMaskedLM`` matching ``tokenizer``; saved if asked."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    pad = tokenizer.pad_token_id
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                           num_attention_heads=num_heads, intermediate_size=intermediate_size,
                           # RoBERTa positions start after the padding index.
                           max_position_embeddings=max_position + pad + 1, type_vocab_size=1,
                           pad_token_id=pad, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id)
    return _initialised(RobertaForMaskedLM, config, tokenizer, seed, output_dir)


def _initialised(model_class, config, tokenizer, seed: int, output_dir: str | Path | None):
    """``model_class(config)`` with weights drawn from ``seed``; saved with ``tokenizer`` if asked."""
    import torch

    torch.manual_seed(seed)
    model = model_class(config)
    if output_dir is not None:
        model.save_pretrained(str(output_dir))
        tokenizer.save_pretrained(str(output_dir))
    return model


def _as_iterator(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        if text:
            yield text
