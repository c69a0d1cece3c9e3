"""Tokenizers and teachers made from scratch, with nothing downloaded.

The demo uses these to make its own teacher from text on the machine; the tests use them
to build tiny BERT and RoBERTa teachers. Everything is written in Hugging Face format so
the rest of ds-distil treats it exactly like a downloaded checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


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
    tokenizer = BertTokenizer(vocab=raw.get_vocab(), do_lower_case=lowercase,
                              model_max_length=model_max_length)
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


def new_bert_teacher(tokenizer, num_layers: int = 4, hidden_size: int = 128, num_heads: int = 2,
                     intermediate_size: int = 512, max_position: int = 512, seed: int = 0,
                     output_dir: str | Path | None = None):
    """A randomly initialised ``BertForMaskedLM`` matching ``tokenizer``; saved if asked."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                        num_attention_heads=num_heads, intermediate_size=intermediate_size,
                        max_position_embeddings=max_position, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = BertForMaskedLM(config)
    if output_dir is not None:
        model.save_pretrained(str(output_dir))
        tokenizer.save_pretrained(str(output_dir))
    return model


def new_roberta_teacher(tokenizer, num_layers: int = 4, hidden_size: int = 128, num_heads: int = 2,
                        intermediate_size: int = 512, max_position: int = 512, seed: int = 0,
                        output_dir: str | Path | None = None):
    """A randomly initialised ``RobertaForMaskedLM`` matching ``tokenizer``; saved if asked."""
    import torch
    from transformers import RobertaConfig, RobertaForMaskedLM

    pad = tokenizer.pad_token_id
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                           num_attention_heads=num_heads, intermediate_size=intermediate_size,
                           # RoBERTa positions start after the padding index.
                           max_position_embeddings=max_position + pad + 1, type_vocab_size=1,
                           pad_token_id=pad, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = RobertaForMaskedLM(config)
    if output_dir is not None:
        model.save_pretrained(str(output_dir))
        tokenizer.save_pretrained(str(output_dir))
    return model


def _as_iterator(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        if text:
            yield text
