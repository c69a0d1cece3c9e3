"""Prepare a corpus for distillation: tokenise it with the teacher's tokenizer into an Arrow dataset.

Inputs (read by ds_distil/readers.py): plain text, JSON Lines, CSV/TSV (compressed with
gzip, bzip2, xz or zstd or not), parquet and Arrow files, directories of them, dataset
repositories downloaded from the hub, and datasets saved with save_to_disk.

Sequences (``--unit``): ``line`` wraps every line in the tokenizer's special tokens ([CLS]
... [SEP], <s> ... </s>, or for a causal LM without them its end-of-text token on both
sides, as DistilGPT2's data: <|endoftext|> ... <|endoftext|>) and cuts a line longer than the maximum into the fewest
near-equal chunks (the reference's behaviour); ``document`` packs consecutive lines of one
document (a text file's blank-line-separated block, or one record of any other format)
into sequences close to the maximum length, never across documents; ``block`` (causal LMs,
as GPT-2 was trained) joins the documents with the end-of-text token and cuts the stream
into blocks of exactly the maximum length. Sequences of 11
tokens or fewer and those at least half unknown tokens are dropped; ``--dedup`` removes
exact duplicate lines first (within each shard when sharded). Every count and the fill
ratio (real tokens / (sequences x maximum length)) are reported.

Output: a datasets DatasetDict (train and validation splits, memory-mapped on read, so
every rank of every node shares the page cache), token_counts.npy (counts over the
training split, for masking smoothing) and meta.json (tokenizer fingerprint, special
token ids, the objective the data is for: "masked" for BERT-style tokenizers, "causal"
for decoders (GPT-2, Llama), options, lengths, counts). It is written to a temporary directory and renamed
into place when complete. Tokenisation is cached: running again on the same inputs and
tokenizer reuses it.

Scale: ``--shard I/N`` prepares the I-th of N deterministic shards of the inputs (whole
files, sizes balanced), so N machines or SLURM array tasks work in parallel; ``--merge
SHARD_DIR...`` checks that the shards agree (tokenizer, options, inputs, all N present)
and concatenates them by hard-linking their Arrow files: the result equals a one-shot run.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ds_distil import __version__, readers
from ds_distil.errors import UserError, require_output_path
from ds_distil.readers import (FileScan, InputFile, collect_inputs, input_identity, is_blank, line_hash, log,
                               split_lines, stable_hash, text_hash, warn)

__all__ = ["FileScan", "InputFile", "collect_inputs", "input_identity", "prepare_corpus", "merge_prepared",
           "load_prepared", "check_tokenizer_matches", "make_train_loader", "make_eval_loader"]

FORMAT = "ds-distil-prepared"
FORMAT_VERSION = 1
# Bump when the tokenisation code changes what it writes: old cache entries then stop matching.
TOKENISE_VERSION = 2
UNITS = ("line", "document", "block")
NOTE_CHARS = 80  # characters of a dropped line kept as an example for the report
MAX_EXAMPLES = 2

# Row status written by the tokenisation pass (dropped rows keep no token ids). PACKED:
# a document whose tokens went into blocks (unit "block"; the blocks are KEPT rows of their own).
KEPT, BLANK, TOO_SHORT, MOSTLY_UNKNOWN, DUPLICATE, PACKED = 0, 1, 2, 3, 4, 5
# Options every shard of one corpus must share (checked by --merge).
SHARED_OPTIONS = ("max_seq_len", "min_tokens", "validation_fraction", "seed", "unit", "text_column", "dedup",
                  "token_dtype", "tokenise_version")

# Model types whose position ids start after the padding index (max length = positions - pad - 1).
ROBERTA_LIKE = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm",
                "data2vec-text", "xmod"}


# ============================================================================================
# CLI
# ============================================================================================

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ds-distil prepare``."""
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="the teacher's directory (or any directory holding its fast tokenizer)")
    parser.add_argument("--input", nargs="+", metavar="PATH",
                        help="text (one sequence per line), JSON Lines, CSV/TSV (plain or .gz/.bz2/.xz/.zst), parquet "
                             "or Arrow files, directories of them, dataset repositories downloaded from the hub, or "
                             "datasets saved with save_to_disk")
    parser.add_argument("--output", required=True, metavar="DIR", help="directory to write the prepared data to")
    parser.add_argument("--unit", choices=UNITS, default="line",
                        help="line: one line is one sequence, cut when too long (default, the reference's); "
                             "document: pack consecutive lines of a document into sequences close to --max-seq-len; "
                             "block (causal LMs): join the documents with end-of-text and cut blocks of "
                             "exactly --max-seq-len tokens")
    parser.add_argument("--text-column", default="text", metavar="NAME",
                        help="column (field) holding the text in JSON Lines, CSV, parquet, Arrow and saved inputs "
                             "(default: text)")
    parser.add_argument("--dedup", action="store_true",
                        help="remove exact duplicate lines (surrounding whitespace ignored), keeping the first "
                             "(with --shard: within each shard)")
    parser.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                        help="tokens per sequence, special tokens included (default: the model's maximum)")
    parser.add_argument("--num-proc", type=int, default=1, metavar="N", help="tokenising processes (default 1)")
    parser.add_argument("--validation-fraction", type=float, default=0.01, metavar="F",
                        help="share of the lines (documents) held out for validation (default 0.01)")
    parser.add_argument("--min-tokens", type=int, default=12, metavar="N",
                        help="drop sequences shorter than this, special tokens included (default 12)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation split (default 0)")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="prepare only the I-th of N deterministic shards of the inputs (0 <= I < N; whole "
                             "files), to merge later with --merge")
    parser.add_argument("--merge", nargs="+", default=None, metavar="SHARD_DIR",
                        help="merge the outputs of --shard I/N runs (all N) into --output instead of preparing")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="where the datasets cache lives (default: $HF_DATASETS_CACHE/ds_distil); "
                             "safe to delete, it only makes re-runs fast")
    parser.add_argument("--force", action="store_true",
                        help="replace --output if it exists (only once the new data is complete)")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``ds-distil prepare``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every input is local: never ask the hub
    if args.merge is not None:
        if args.input or args.shard:
            raise UserError("--merge takes the shard directories only: leave out --input and --shard (the shards "
                            "record their inputs and options)")
        merge_prepared(args.merge, args.output, force=args.force, tokenizer_dir=args.tokenizer)
        return 0
    if not args.tokenizer or not args.input:
        missing = " and ".join(name for name, value in (("--tokenizer", args.tokenizer), ("--input", args.input))
                               if not value)
        raise UserError(f"{missing} required: ds-distil prepare --tokenizer TEACHER --input CORPUS... --output DIR "
                        "(or --merge SHARD_DIR... --output DIR)")
    shard = readers.parse_shard(args.shard) if args.shard is not None else None
    prepare_corpus(args.tokenizer, args.input, args.output, max_seq_len=args.max_seq_len, num_proc=args.num_proc,
                   validation_fraction=args.validation_fraction, seed=args.seed, min_tokens=args.min_tokens,
                   force=args.force, cache_dir=args.cache_dir, unit=args.unit, text_column=args.text_column,
                   dedup=args.dedup, shard=shard)
    return 0


# ============================================================================================
# Tokenizer
# ============================================================================================

@dataclass
class TokenizerInfo:
    """What preparation and masking need to know about the teacher's tokenizer."""

    path: str
    class_name: str
    fingerprint: str
    vocab_size: int
    special_tokens: dict[str, str]
    all_special_ids: list[int]
    mask_token_id: int | None  # None for a causal LM's tokenizer (nothing is masked)
    pad_token_id: int  # a causal LM without one pads with its end-of-text token (the attention mask tells them apart)
    unk_token_id: int | None
    prefix_ids: list[int]  # what wraps every sequence: [CLS] / <s> / <|endoftext|> ...
    suffix_ids: list[int]  # ... [SEP] / </s> / <|endoftext|>
    model_max_length: int
    max_length_source: str
    objective: str = "masked"  # "masked" (MLM) or "causal" (next-token): which collator the trainer uses

    @property
    def token_dtype(self) -> str:
        """Storage type of token ids: uint16 halves the data when the vocabulary fits."""
        return "uint16" if self.vocab_size <= 2**16 else "int32"


def load_tokenizer(tokenizer_dir: str | os.PathLike):
    """The fast tokenizer in ``tokenizer_dir``, or a UserError that says what to pass instead."""
    path = Path(tokenizer_dir)
    if not path.exists():
        raise UserError(f"--tokenizer {path} does not exist: pass the teacher's directory "
                        "(it holds tokenizer.json or vocab.txt and tokenizer_config.json)")
    if not path.is_dir():
        raise UserError(f"--tokenizer {path} is a file: pass the directory that holds the teacher's tokenizer files")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError... for a non-tokenizer
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise UserError(f"--tokenizer {path} is not a tokenizer directory ({reason}): pass the teacher's "
                        "directory, which holds tokenizer.json or vocab.txt and tokenizer_config.json") from None
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise UserError(f"--tokenizer {path} has no fast tokenizer: save it with a tokenizer.json "
                        "(AutoTokenizer.from_pretrained(...).save_pretrained(DIR) writes one)")
    if tokenizer_objective(tokenizer, path) == "causal":
        if tokenizer.eos_token_id is None:
            raise UserError(f"--tokenizer {path} has no end-of-text (eos) token: a causal LM's data separates "
                            "documents with it; use the teacher's own tokenizer")
    elif tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
        raise UserError(f"--tokenizer {path} has no mask or pad token: ds-distil distils masked language "
                        "models (BERT/RoBERTa style) and causal ones (GPT-2, Llama: the directory's config.json "
                        "says which); use the teacher's own tokenizer")
    return tokenizer


def tokenizer_objective(tokenizer, tokenizer_dir: str | os.PathLike) -> str:
    """``"causal"`` or ``"masked"``: the objective of the model the tokenizer belongs to.

    The model's config.json beside the tokenizer decides (its family); without one, a
    tokenizer with a mask token is taken as a masked LM's, any other as a causal LM's.
    """
    from ds_distil.models import family_of

    config_file = Path(tokenizer_dir) / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else None
    except (OSError, ValueError):
        config = None
    family = family_of(config) if isinstance(config, dict) else None
    if family is not None:
        return family.objective
    return "masked" if tokenizer.mask_token_id is not None else "causal"


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the vocabulary and the special tokens: equal iff token ids mean the same."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0])),
        "special_tokens": sorted((name, str(value)) for name, value in tokenizer.special_tokens_map.items()),
        "special_ids": sorted(tokenizer.all_special_ids),
    }
    blob = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


def describe_tokenizer(tokenizer, tokenizer_dir: str | os.PathLike) -> TokenizerInfo:
    """Collect :class:`TokenizerInfo`, including the special-token wrapping and the model maximum."""
    prefix, suffix = special_wrapping(tokenizer)
    max_length, source = model_max_length(tokenizer, tokenizer_dir)
    objective = tokenizer_objective(tokenizer, tokenizer_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return TokenizerInfo(
        path=str(Path(tokenizer_dir).resolve()), class_name=type(tokenizer).__name__,
        fingerprint=tokenizer_fingerprint(tokenizer), vocab_size=len(tokenizer),
        special_tokens={name: str(value) for name, value in tokenizer.special_tokens_map.items()},
        all_special_ids=sorted(int(i) for i in tokenizer.all_special_ids),
        mask_token_id=None if objective == "causal" or tokenizer.mask_token_id is None else int(tokenizer.mask_token_id),
        pad_token_id=int(pad),
        unk_token_id=None if tokenizer.unk_token_id is None else int(tokenizer.unk_token_id),
        prefix_ids=prefix, suffix_ids=suffix, model_max_length=max_length, max_length_source=source,
        objective=objective)


def bare_backend(tokenizer):
    """A copy of the Rust tokenizer with truncation and padding off (we cut sequences ourselves)."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    return backend


def special_wrapping(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a sequence ([CLS]/[SEP], <s>/</s>)."""
    backend = bare_backend(tokenizer)
    probe = "hello world"
    # encode(), not encode_batch(): the batch call starts the tokenizer's thread pool, and a
    # pool started before datasets forks its workers makes tokenizers run them single-threaded.
    bare = backend.encode(probe, add_special_tokens=False).ids
    wrapped = backend.encode(probe, add_special_tokens=True).ids
    for start in range(len(wrapped) - len(bare) + 1):
        if bare and wrapped[start:start + len(bare)] == bare:
            prefix, suffix = wrapped[:start], wrapped[start + len(bare):]
            if prefix or suffix:
                return prefix, suffix
    # No post-processor: fall back on the declared begin/end tokens.
    begin = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if begin is None or end is None:
        raise UserError(f"the tokenizer {tokenizer.name_or_path} adds no special tokens around a sequence and "
                        "declares no [CLS]/[SEP] or <s>/</s>: use the teacher's BERT/RoBERTa-style tokenizer")
    return [int(begin)], [int(end)]


def model_max_length(tokenizer, tokenizer_dir: str | os.PathLike) -> tuple[int, str]:
    """The longest sequence the model takes, from the tokenizer config and the model config."""
    limits: list[tuple[int, str]] = []
    declared = getattr(tokenizer, "model_max_length", None)
    if declared and declared < 10**6:  # transformers uses a huge sentinel when none is set
        limits.append((int(declared), "model_max_length in tokenizer_config.json"))
    config_file = Path(tokenizer_dir) / "config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}
        from ds_distil.models import family_of

        family = family_of(config) if isinstance(config, dict) else None
        if family is not None:  # the family knows its positions (GPT-2: n_positions; rotary: no table)
            positions = family.max_positions(config)
            if positions is not None and positions > 0:
                limits.append((positions, f"{family.positions_key} in config.json"))
        elif isinstance(config.get("max_position_embeddings"), int) and config["max_position_embeddings"] > 0:
            positions = config["max_position_embeddings"]
            if config.get("model_type") in ROBERTA_LIKE:
                positions -= int(config.get("pad_token_id", 1)) + 1
            limits.append((positions, "max_position_embeddings in config.json"))
    if not limits:
        raise UserError(f"{tokenizer_dir} does not say the model's maximum length (no model_max_length in "
                        "tokenizer_config.json, no config.json): pass --max-seq-len N")
    return min(limits)


# ============================================================================================
# Tokenisation (runs in datasets' worker processes)
# ============================================================================================

class Tokenise:
    """Batched ``datasets.map`` function: rows of text -> wrapped, cut or packed, filtered token ids.

    Every output row carries its ``status`` (kept / blank / too short / mostly unknown /
    duplicate), the ``key`` that decides its split (a hash of its line's or document's
    text, so all sequences of one line or document land in the same split, whatever the
    row order, ``num_proc`` or sharding), its ``chunk`` number within the line
    (``unit="line"``) or document (``unit="document"``; -1 for a removed duplicate line),
    ``lines`` (the lines it starts: counted once per line or document) and, for rows
    dropped as mostly unknown, a ``note`` with the start of their text. Counts are
    reported from these columns of the cached result, without tokenising again.
    Dropped rows keep no ids.
    """

    def __init__(self, backend_json: str, prefix: list[int], suffix: list[int], max_seq_len: int,
                 min_tokens: int, unk_id: int | None, unit: str = "line", row_offset: int = 0,
                 dedup: tuple[str, str] | None = None, separator: int | None = None,
                 split: tuple[float, int] = (0.0, 0)):
        self.backend_json = backend_json
        self.max_seq_len = max_seq_len
        self.separator = separator  # unit "block": the end-of-text token between documents
        self.split = split  # unit "block": (validation fraction, seed), as SplitSelector applies them
        self.prefix = list(prefix)
        self.suffix = list(suffix)
        self.body = max_seq_len - len(prefix) - len(suffix)
        self.min_tokens = min_tokens
        self.unk_id = unk_id
        self.unit = unit
        self.row_offset = row_offset
        self.dedup = dedup  # (keep.npy, starts.npy): which lines survive deduplication
        self._backend = None
        self._keep = self._starts = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_backend"] = state["_keep"] = state["_starts"] = None  # rebuilt in each worker
        return state

    def _tokenizer(self):
        if self._backend is None:
            from tokenizers import Tokenizer

            self._backend = Tokenizer.from_str(self.backend_json)
            self._backend.no_truncation()
            self._backend.no_padding()
        return self._backend

    def _kept_lines(self, row: int, count: int) -> np.ndarray | None:
        if self.dedup is None:
            return None
        if self._keep is None:
            self._keep = np.load(self.dedup[0], mmap_mode="r")
            self._starts = np.load(self.dedup[1], mmap_mode="r")
        start = int(self._starts[self.row_offset + row])
        return self._keep[start:start + count]

    def __call__(self, texts: list[str | None], indices: list[int]) -> dict:
        documents, batch = [], []
        for text, row in zip(texts, indices):
            lines = split_lines(text)
            kept = self._kept_lines(row, len(lines))
            entries = []  # (line, status, index into batch)
            for j, line in enumerate(lines):
                if is_blank(line):
                    entries.append((line, BLANK, -1))
                elif kept is not None and not kept[j]:
                    entries.append((line, DUPLICATE, -1))
                else:
                    entries.append((line, KEPT, len(batch)))
                    batch.append(line)
            documents.append((text, entries))
        encoded = self._tokenizer().encode_batch_fast(batch, add_special_tokens=False) if batch else []
        ids = [encoding.ids for encoding in encoded]
        rows = _Rows()
        if self.unit == "block":
            self._blocks(rows, documents, ids)
            return rows.columns()
        for text, entries in documents:
            if self.unit == "line":
                self._lines(rows, entries, ids)
            else:
                self._document(rows, text, entries, ids)
        return rows.columns()

    def _lines(self, rows: "_Rows", entries: list, ids: list[list[int]]) -> None:
        for line, status, index in entries:
            if status != KEPT:
                rows.add([], 0, status, 0, 0, 0)
                continue
            key = line_hash(line)
            for number, piece in enumerate(self._chunks(ids[index])):
                self._add_piece(rows, piece, key, number, 1 if number == 0 else 0, line)

    def _document(self, rows: "_Rows", text: str | None, entries: list, ids: list[list[int]]) -> None:
        lines = [(line, index) for line, status, index in entries if status == KEPT]
        for _ in range(sum(1 for _, status, _ in entries if status == DUPLICATE)):
            rows.add([], 0, DUPLICATE, 0, -1, 0)
        pieces = self._pack([ids[index] for _, index in lines])
        if not pieces:
            rows.add([], 0, BLANK, 0, 0, len(lines))
            return
        key = text_hash(text or "")
        for number, (piece, first) in enumerate(pieces):
            self._add_piece(rows, piece, key, number, len(lines) if number == 0 else 0, lines[first][0])

    def _blocks(self, rows: "_Rows", documents: list, ids: list[list[int]]) -> None:
        """unit "block": each split's documents joined by end-of-text, cut into full blocks.

        A document's split is decided here, from its key, exactly as SplitSelector decides
        it later, and each split has its own stream: no block mixes training and held-out
        text. Every document leaves a PACKED row (for the counts); each block is a KEPT row
        whose key is that of a document in it (hence of its split). Streams do not cross
        ``datasets.map`` batches: each batch's last, shorter block is kept if it has at
        least ``min_tokens`` tokens.
        """
        fraction, seed = self.split
        streams: dict[bool, tuple[list[int], list[int]]] = {False: ([], []), True: ([], [])}  # (tokens, keys)
        for text, entries in documents:
            kept = [index for _, status, index in entries if status == KEPT]
            for _ in range(sum(1 for _, status, _ in entries if status == DUPLICATE)):
                rows.add([], 0, DUPLICATE, 0, -1, 0)
            content = [token for index in kept for token in ids[index]]
            if not content:
                rows.add([], 0, BLANK, 0, 0, len(kept))
                continue
            key = text_hash(text or "")
            rows.add([], len(content), PACKED, key, 0, len(kept))
            held_out = bool(held_out_keys(np.asarray([key], dtype=np.uint64), fraction, seed)[0])
            tokens, keys = streams[held_out]
            tokens.extend(content + [self.separator])
            keys.append(key)
            while len(tokens) >= self.max_seq_len:
                rows.add(tokens[:self.max_seq_len], self.max_seq_len, KEPT, keys[0], -1, 0)
                del tokens[:self.max_seq_len]
                keys[:] = keys[-1:]  # the last document may go on into the next block
        for tokens, keys in streams.values():
            if tokens:
                status = KEPT if len(tokens) >= self.min_tokens else TOO_SHORT
                rows.add(tokens if status == KEPT else [], len(tokens), status, keys[0], -1, 0)

    def _chunks(self, content: list[int]) -> list[list[int]]:
        """The fewest near-equal pieces that fit, so a long line leaves no short tail to drop."""
        count = max(1, -(-len(content) // self.body))
        size, extra = divmod(len(content), count)
        pieces, start = [], 0
        for number in range(count):
            end = start + size + (1 if number < extra else 0)
            pieces.append(content[start:end])
            start = end
        return pieces

    def _pack(self, lines: list[list[int]]) -> list[tuple[list[int], int]]:
        """Consecutive lines of one document packed into pieces of at most ``body`` tokens.

        A line that fits in a fresh piece is never split: it goes whole into the current
        piece, or starts the next one. A line longer than a piece must be split anyway,
        so it first fills the current piece, then whole pieces, and its tail starts the
        next. Returns ``(piece, index of the line it starts with)``.
        """
        body = self.body
        pieces: list[tuple[list[int], int]] = []
        current: list[int] = []
        first = 0
        for number, tokens in enumerate(lines):
            if not tokens:
                continue
            if len(current) + len(tokens) <= body:
                if not current:
                    first = number
                current = current + tokens
                continue
            if len(tokens) <= body:
                pieces.append((current, first))
                current, first = list(tokens), number
                continue
            if not current:
                first = number
            space = body - len(current)
            pieces.append((current + tokens[:space], first))
            rest = tokens[space:]
            while len(rest) > body:
                pieces.append((rest[:body], number))
                rest = rest[body:]
            current, first = list(rest), number
        if current:
            pieces.append((current, first))
        return pieces

    def _add_piece(self, rows: "_Rows", piece: list[int], key: int, chunk: int, lines: int, text: str) -> None:
        length = len(piece) + len(self.prefix) + len(self.suffix)
        if length < self.min_tokens:
            rows.add([], length, TOO_SHORT, key, chunk, lines)
        elif self.unk_id is not None and 2 * piece.count(self.unk_id) >= len(piece):
            rows.add([], length, MOSTLY_UNKNOWN, key, chunk, lines, text[:NOTE_CHARS])
        else:
            rows.add(self.prefix + piece + self.suffix, length, KEPT, key, chunk, lines)


class _Rows:
    """Output columns of :class:`Tokenise`, filled row by row."""

    def __init__(self):
        self.input_ids: list[list[int]] = []
        self.length: list[int] = []
        self.status: list[int] = []
        self.key: list[int] = []
        self.chunk: list[int] = []
        self.lines: list[int] = []
        self.note: list[str] = []

    def add(self, ids: list[int], length: int, status: int, key: int, chunk: int, lines: int, note: str = "") -> None:
        self.input_ids.append(ids)
        self.length.append(length)
        self.status.append(status)
        self.key.append(key)
        self.chunk.append(chunk)
        self.lines.append(lines)
        self.note.append(note)

    def columns(self) -> dict:
        return {
            "input_ids": self.input_ids,
            "length": np.asarray(self.length, dtype=np.int32),
            "status": np.asarray(self.status, dtype=np.int8),
            "key": np.asarray(self.key, dtype=np.uint64),
            "chunk": np.asarray(self.chunk, dtype=np.int32),
            "lines": np.asarray(self.lines, dtype=np.int32),
            "note": self.note,
        }


class LineHashes:
    """Batched ``datasets.map`` function: the hash of every line of every row (0 for blank lines)."""

    def __call__(self, texts: list[str | None]) -> dict:
        # uint64 arrays: hashes above 2**63 do not fit the int64 that plain Python ints would become.
        return {"hashes": [np.fromiter((line_hash(line) for line in split_lines(text)), dtype=np.uint64)
                           for text in texts]}


class SplitSelector:
    """Batched ``datasets.filter`` function: kept rows of one split.

    A line (document) goes to validation when a seeded hash of its text's hash falls below
    the fraction, so all its sequences land in the same split, whatever ``num_proc``, the
    order of the inputs or the sharding.
    """

    def __init__(self, validation: bool, fraction: float, seed: int):
        self.validation = validation
        self.fraction = fraction
        self.seed = seed

    def __call__(self, status: np.ndarray, key: np.ndarray) -> np.ndarray:
        held_out = held_out_keys(np.asarray(key), self.fraction, self.seed)
        return (np.asarray(status) == KEPT) & (held_out if self.validation else ~held_out)


def held_out_lines(lines: list[str], fraction: float, seed: int) -> np.ndarray:
    """Whether ``prepare --unit line --validation-fraction FRACTION --seed SEED`` puts each of
    ``lines`` in the validation split: the rule of :class:`SplitSelector`, for text that
    comes from outside the prepared data (a downstream task evaluated on held-out text)."""
    keys = np.fromiter((line_hash(line) for line in lines), dtype=np.uint64, count=len(lines))
    return held_out_keys(keys, fraction, seed)


def held_out_keys(keys: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The split rule, in one place: a line or document goes to validation when a seeded
    uniform hash of its key falls below the fraction."""
    return uniform_hash(keys, seed) < fraction


def uniform_hash(values: np.ndarray, seed: int) -> np.ndarray:
    """Uniform floats in [0, 1) from integers and a seed (splitmix64, vectorised)."""
    mask = 2**64 - 1
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64(((seed + 1) * 0x9E3779B97F4A7C15) & mask)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(2**53)


# ============================================================================================
# prepare_corpus
# ============================================================================================

def prepare_corpus(tokenizer_dir: str | os.PathLike, inputs: list[str], output_dir: str | os.PathLike,
                   max_seq_len: int | None = None, num_proc: int = 1, validation_fraction: float = 0.01,
                   seed: int = 0, min_tokens: int = 12, force: bool = False,
                   cache_dir: str | os.PathLike | None = None, unit: str = "line", text_column: str = "text",
                   dedup: bool = False, shard: tuple[int, int] | None = None) -> dict:
    """Tokenise ``inputs`` with the tokenizer in ``tokenizer_dir`` into ``output_dir``; returns meta.

    See the module docstring for the format. ``shard=(I, N)`` prepares only the I-th of N
    shards of the inputs. Raises :class:`UserError` for every input problem that stops
    the work; warns (and goes on) for bad lines.
    """
    _check_options(num_proc, validation_fraction, min_tokens, seed, unit, text_column)
    output = Path(output_dir)
    _check_output_path(output)
    tokenizer = load_tokenizer(tokenizer_dir)
    info = describe_tokenizer(tokenizer, tokenizer_dir)
    if unit == "block" and info.objective != "causal":
        raise UserError(f"--unit block joins documents into blocks for causal LMs (GPT-2, Llama); {tokenizer_dir} is "
                        "a masked LM's tokenizer: use --unit line or --unit document")
    max_seq_len = _resolve_max_len(max_seq_len, info, min_tokens)
    listing = collect_inputs(inputs)
    items = listing if shard is None else readers.shard_items(listing, *shard)
    options = {"max_seq_len": max_seq_len, "min_tokens": min_tokens, "validation_fraction": validation_fraction,
               "seed": seed, "unit": unit, "text_column": text_column, "dedup": dedup}
    shard_meta = None
    if shard is not None:
        shard_meta = {"index": shard[0], "count": shard[1], "files": len(listing),
                      "listing": _hash([input_identity(item) for item in listing])}
    request = _hash([FORMAT_VERSION, TOKENISE_VERSION, info.fingerprint, options,
                     [input_identity(item) for item in items], shard_meta])
    existing = _check_output(output, request, force)
    if existing is not None:
        log(f"{output} is up to date (same inputs, tokenizer and options): nothing to do; --force rebuilds it")
        return existing
    cache = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    log(f"tokenizer {info.path} ({info.class_name}, {info.vocab_size} tokens, fingerprint "
        f"{info.fingerprint[:12]}); sequences of at most {max_seq_len} tokens "
        f"(model maximum {info.model_max_length}, from {info.max_length_source}), one per {unit}")
    if shard is not None:
        log(f"shard {shard[0]}/{shard[1]}: {len(items)} of {len(listing)} input files ({readers.names_of(items)})")

    started = time.perf_counter()
    scans = readers.check_inputs(items, text_column)
    log(f"inputs: {readers.describe_inputs(items, scans)}")
    # Blocks are made of documents: read the inputs as document mode does.
    parts = readers.read_parts(items, scans, text_column, _read_unit(unit), cache, num_proc)
    readers.report_scans(list(scans.values()), text_column)
    if not parts:
        raise UserError(f"the inputs ({readers.names_of(items)}) hold no text: pass the corpus files (one sequence per "
                        "line)")
    masks = _dedup_masks(parts, _read_unit(unit), text_column, num_proc, cache) if dedup else None
    tokenised, key = _tokenise(parts, tokenizer, info, options, num_proc, cache, masks)
    del parts  # unmaps the text: its pages leave this process's resident set before the next pass
    counts, examples = _status_counts(tokenised, max_seq_len)
    _log_counts(counts, options, examples)
    if counts["kept"] == 0:
        raise UserError(f"no sequence of {min_tokens} tokens or more in the inputs ({readers.names_of(items)}): check "
                        "that --input is the corpus (one sequence per line) and --tokenizer the teacher's tokenizer")

    temporary = _temporary_dir(output)
    try:
        _write_splits(tokenised, key, temporary, validation_fraction, seed, cache)
        meta = _finish(temporary, info, options, items, list(scans.values()), counts, examples, request, shard_meta)
        _replace(temporary, output)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    elapsed = time.perf_counter() - started
    tokens = meta["num_tokens"]
    log(f"wrote {output}: train {meta['splits']['train']['sequences']:,} sequences / "
        f"{meta['splits']['train']['tokens']:,} tokens, validation {meta['splits']['validation']['sequences']:,} / "
        f"{meta['splits']['validation']['tokens']:,}, ids stored as {info.token_dtype}, in {elapsed:.1f} s "
        f"({tokens / max(elapsed, 1e-9):,.0f} tokens/s)")
    return meta


def _read_unit(unit: str) -> str:
    """How the readers split text files into rows: by line, or by document (also for blocks)."""
    return "line" if unit == "line" else "document"


def _check_options(num_proc: int, validation_fraction: float, min_tokens: int, seed: int, unit: str = "line",
                   text_column: str = "text") -> None:
    if num_proc < 1:
        raise UserError(f"--num-proc {num_proc} must be at least 1")
    if not 0.0 <= validation_fraction < 1.0:
        raise UserError(f"--validation-fraction {validation_fraction} must be in [0, 1) (e.g. 0.01 for 1%)")
    if min_tokens < 1:
        raise UserError(f"--min-tokens {min_tokens} must be at least 1")
    if seed < 0:
        raise UserError(f"--seed {seed} must be >= 0")
    if unit not in UNITS:
        raise UserError(f"--unit {unit} must be one of {', '.join(UNITS)}")
    if not text_column:
        raise UserError("--text-column must name a column")


def _check_output_path(output: Path) -> None:
    """--output must be (or be creatable as) a writable directory: not a file, not below a file."""
    require_output_path(output, "--output", "dir")


def _resolve_max_len(max_seq_len: int | None, info: TokenizerInfo, min_tokens: int) -> int:
    if max_seq_len is None:
        return info.model_max_length
    wrap = len(info.prefix_ids) + len(info.suffix_ids)
    if max_seq_len > info.model_max_length:
        raise UserError(f"--max-seq-len {max_seq_len} is above the model's maximum of {info.model_max_length} "
                        f"({info.max_length_source} in {info.path}): pass --max-seq-len {info.model_max_length} "
                        "or less")
    if max_seq_len <= wrap or max_seq_len < min_tokens:
        raise UserError(f"--max-seq-len {max_seq_len} leaves no room: it must be at least --min-tokens "
                        f"({min_tokens}) and more than the {wrap} special tokens around each sequence")
    return max_seq_len


def _default_cache_dir() -> Path:
    import datasets.config

    return Path(datasets.config.HF_DATASETS_CACHE) / "ds_distil"


def _check_output(output: Path, request: str, force: bool) -> dict | None:
    """Meta of an up-to-date output (nothing to do), None to go on, or a UserError.

    Only prepared data (or an empty directory) is ever replaced, even with ``force``: a
    mistyped ``--output`` must not delete anything else.
    """
    _check_output_path(output)
    if not output.exists() or (output.is_dir() and not any(output.iterdir())):
        return None
    try:
        meta = json.loads((output / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"--output {output} exists and is not prepared data: choose another --output "
                        "(ds-distil only ever replaces data it prepared)")
    if not force and meta.get("request") == request:
        return meta
    if not force:
        raise UserError(f"--output {output} already exists (with other data): pass --force to replace it (the old "
                        "data stays until the new data is complete), or choose another --output")
    return None


def _dedup_masks(parts: list, unit: str, text_column: str, num_proc: int, cache: Path) -> tuple[str, str]:
    """Which lines survive exact deduplication, as two .npy files the tokenising workers memory-map.

    ``starts[r]`` is the index of row ``r``'s first line in the flat list of lines of all
    parts (in order); ``keep[i]`` says whether line ``i`` is kept: blank lines and the first
    occurrence of every line are, later copies are not. Hashing runs in ``datasets.map``
    (cached); the decision is one ``np.unique`` over 8 bytes per line.
    """
    import datasets
    import pyarrow.compute as pc

    identity = [[input_identity(item) for item in part.items] for part in parts]
    key = _hash(["dedup", TOKENISE_VERSION, unit, text_column, identity])[:32]
    directory = cache / "dedup"
    directory.mkdir(parents=True, exist_ok=True)
    keep_path, starts_path = directory / f"{key}.keep.npy", directory / f"{key}.starts.npy"
    if keep_path.is_file() and starts_path.is_file():
        return str(keep_path), str(starts_path)
    values, lengths = [], []
    features = datasets.Features({"hashes": datasets.List(datasets.Value("uint64"))})
    for number, part in enumerate(parts):
        part_key = f"{key}-{number}"
        hashed = part.dataset.map(LineHashes(), batched=True, input_columns=["text"], remove_columns=["text"],
                                  features=features, num_proc=num_proc if num_proc > 1 else None,
                                  cache_file_name=str(directory / f"{part_key}.arrow"), new_fingerprint=part_key,
                                  load_from_cache_file=True, desc="Hashing lines")
        for chunk in hashed.data.column("hashes").chunks:
            lengths.append(pc.list_value_length(chunk).to_numpy(zero_copy_only=False).astype(np.int64))
            values.append(chunk.flatten().to_numpy(zero_copy_only=False))
    flat = np.concatenate(values) if values else np.zeros(0, dtype=np.uint64)
    starts = np.zeros(sum(len(x) for x in lengths) + 1, dtype=np.int64)
    np.cumsum(np.concatenate(lengths) if lengths else [], out=starts[1:])
    real = np.flatnonzero(flat != 0)
    _, first = np.unique(flat[real], return_index=True)
    keep = flat == 0
    keep[real[first]] = True
    for path, array in ((keep_path, keep), (starts_path, starts)):
        partial = path.with_name(path.name + f".partial-{os.getpid()}")
        with open(partial, "wb") as handle:
            np.save(handle, array)
        partial.rename(path)
    return str(keep_path), str(starts_path)


def _tokenise(parts: list, tokenizer, info: TokenizerInfo, options: dict, num_proc: int, cache: Path,
              masks: tuple[str, str] | None):
    """``part.dataset.map(Tokenise)`` for every part, each cached under a key of its inputs, the
    tokenizer and the options; returns the concatenation and a key of the whole result."""
    import datasets

    features = datasets.Features({
        "input_ids": datasets.List(datasets.Value(info.token_dtype)),
        "length": datasets.Value("int32"), "status": datasets.Value("int8"), "key": datasets.Value("uint64"),
        "chunk": datasets.Value("int32"), "lines": datasets.Value("int32"), "note": datasets.Value("string"),
    })
    directory = cache / "tokenised"
    directory.mkdir(parents=True, exist_ok=True)
    backend = bare_backend(tokenizer).to_str()
    jobs, offset = [], 0
    for part in parts:
        identity = [input_identity(item) for item in part.items]
        key = _hash(["tokenise", TOKENISE_VERSION, readers.READ_VERSION, identity, options["text_column"],
                     options["unit"], info.fingerprint, options["max_seq_len"], options["min_tokens"],
                     info.prefix_ids, info.suffix_ids, [masks and Path(masks[0]).name, offset],
                     # blocks are made per split: the split options shape them
                     [options["validation_fraction"], options["seed"]] if options["unit"] == "block" else None])[:32]
        jobs.append((part, key, offset, bool(sorted(directory.glob(f"{key}*.arrow")))))
        offset += len(part.dataset)
    todo = [job for job in jobs if not job[3]]
    if options["unit"] != "line":
        what = "documents"
    else:
        what = "lines" if all(item.kind == "text" for job in todo for item in job[0].items) else "records"
    if not todo:
        log(f"reusing the cached tokenisation ({len(jobs)} input group(s) in {directory})")
    else:
        reused = len(jobs) - len(todo)
        log(f"tokenising {sum(len(job[0].dataset) for job in todo):,} {what} with {num_proc} process(es)"
            + (f" ({reused} input group(s) reused from the cache)" if reused else ""))
    # Forked workers share the parent's heap copy-on-write; the garbage collector walking
    # those objects would copy them page by page into every worker. Frozen, it leaves them.
    if num_proc > 1:
        gc.collect()
        gc.freeze()
    try:
        results = []
        for part, key, offset, _ in jobs:
            function = Tokenise(backend, info.prefix_ids, info.suffix_ids, options["max_seq_len"],
                                options["min_tokens"], info.unk_token_id, options["unit"], offset, masks,
                                separator=_end_of_text(tokenizer, info),
                                split=(options["validation_fraction"], options["seed"]))
            results.append(part.dataset.map(
                function, batched=True, with_indices=True, input_columns=["text"], remove_columns=["text"],
                features=features, num_proc=num_proc if num_proc > 1 else None,
                cache_file_name=str(directory / f"{key}.arrow"), new_fingerprint=key, load_from_cache_file=True,
                desc="Tokenising"))
    finally:
        if num_proc > 1:
            gc.unfreeze()
    tokenised = results[0] if len(results) == 1 else datasets.concatenate_datasets(results)
    return tokenised, _hash([job[1] for job in jobs])[:32]


def _end_of_text(tokenizer, info: TokenizerInfo) -> int | None:
    """The token between documents in blocks: eos, else the wrapping's last token."""
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return (info.suffix_ids or info.prefix_ids or [None])[-1]


def _status_counts(tokenised, max_seq_len: int) -> tuple[dict[str, Any], list[str]]:
    """Counts per status, lines, cut lines, tokens kept and fill ratio (small columns, streamed)."""
    import pyarrow.compute as pc

    table = tokenised.data.table if hasattr(tokenised.data, "table") else tokenised.data
    by_status = {int(v["values"]): int(v["counts"]) for v in pc.value_counts(table.column("status")).to_pylist()}
    chunk = table.column("chunk")
    kept = pc.equal(table.column("status"), KEPT)

    def count(mask) -> int:
        return int(pc.sum(mask).as_py() or 0)

    cut = count(pc.equal(chunk, 1))  # every line (document) that was cut (packed into several) has a chunk 1
    kept_tokens = int(pc.sum(pc.filter(table.column("length"), kept)).as_py() or 0)
    counts = {
        "units": count(pc.equal(chunk, 0)), "text_lines": int(pc.sum(table.column("lines")).as_py() or 0),
        "kept": by_status.get(KEPT, 0), "blank": by_status.get(BLANK, 0),
        "too_short": by_status.get(TOO_SHORT, 0), "mostly_unknown": by_status.get(MOSTLY_UNKNOWN, 0),
        "duplicates": by_status.get(DUPLICATE, 0),
        "cut": cut, "chunks_from_cut": cut + count(pc.greater_equal(chunk, 1)),
        "kept_tokens": kept_tokens,
    }
    counts["fill_ratio"] = fill_ratio(kept_tokens, counts["kept"], max_seq_len)
    examples = []
    if counts["mostly_unknown"]:
        unknown = pc.equal(table.column("status"), MOSTLY_UNKNOWN)
        examples = [str(x) for x in pc.filter(table.column("note"), unknown).slice(0, MAX_EXAMPLES).to_pylist()]
    return counts, examples


def fill_ratio(tokens: int, sequences: int, max_seq_len: int) -> float:
    """Real tokens over the room of full-length sequences: 1.0 when every sequence is full."""
    return round(tokens / (sequences * max_seq_len), 6) if sequences else 0.0


def _log_counts(counts: dict[str, Any], options: dict, examples: list[str]) -> None:
    min_tokens, max_len = options["min_tokens"], options["max_seq_len"]
    dropped = (f"dropped {counts['too_short']:,} of {min_tokens - 1} tokens or fewer and "
               f"{counts['mostly_unknown']:,} at least half unknown tokens; {counts['kept']:,} sequences kept")
    duplicates = f"{counts['duplicates']:,} duplicate lines removed; " if options["dedup"] else ""
    if options["unit"] == "line":
        log(f"{counts['units']:,} lines: {counts['blank']:,} blank skipped; {duplicates}{counts['cut']:,} longer than "
            f"the maximum cut into {counts['chunks_from_cut']:,} chunks; {dropped}")
    elif options["unit"] == "block":
        empty = "empty or only duplicates" if options["dedup"] else "empty"
        log(f"{counts['units']:,} documents ({counts['blank']:,} {empty}), {counts['text_lines']:,} lines: "
            f"{duplicates}joined by end-of-text into {counts['kept']:,} blocks of up to {max_len} tokens (full "
            f"but for the last of each tokenising batch and split); {counts['too_short']:,} last blocks of "
            f"{min_tokens - 1} tokens or fewer dropped")
    else:
        sequences = counts["kept"] + counts["too_short"] + counts["mostly_unknown"]
        empty = "empty or only duplicates" if options["dedup"] else "empty"
        log(f"{counts['units']:,} documents ({counts['blank']:,} {empty}), {counts['text_lines']:,} lines: "
            f"{duplicates}packed into {sequences:,} sequences ({counts['cut']:,} documents span several); {dropped}")
    if counts["kept"]:
        log(f"fill ratio {counts['fill_ratio']:.1%}: {counts['kept_tokens']:,} real tokens in {counts['kept']:,} "
            f"sequences of up to {max_len} tokens (mean {counts['kept_tokens'] / counts['kept']:.1f})")
    if examples:
        shown = ", ".join(repr(example) for example in examples)
        log(f"sequences at least half unknown tokens ([UNK]) look like: {shown}: the tokenizer's vocabulary lacks "
            "their characters (another language or script? the wrong --tokenizer?)")


def _report(counts: dict[str, Any], unit: str, scans: list[FileScan]) -> dict:
    """The counts recorded in meta.json (all integers, so shards can be summed)."""
    report = {"lines" if unit == "line" else "documents": counts["units"]}
    if unit != "line":
        report["lines"] = counts["text_lines"]
    for name in ("blank", "duplicates", "too_short", "mostly_unknown", "cut", "chunks_from_cut", "kept",
                 "kept_tokens"):
        report[name] = counts[name]
    report.update(bad_utf8_lines=sum(s.bad_utf8_count for s in scans),
                  bad_json_lines=sum(s.bad_json_count for s in scans),
                  no_text_lines=sum(s.no_text_count + s.null_text_count for s in scans))
    return report


def _write_splits(tokenised, key: str, directory: Path, fraction: float, seed: int, cache: Path) -> None:
    """Save the kept rows as a DatasetDict (train, validation) of ``input_ids`` and ``length``."""
    import datasets

    view = tokenised.with_format("numpy")
    splits = {}
    (cache / "splits").mkdir(parents=True, exist_ok=True)
    for name in ("train", "validation"):
        split_key = _hash(["split", key, name, fraction, seed])[:32]
        selected = view.filter(SplitSelector(name == "validation", fraction, seed), input_columns=["status", "key"],
                               batched=True, batch_size=100_000,
                               cache_file_name=str(cache / "splits" / f"{split_key}.arrow"),
                               new_fingerprint=split_key, load_from_cache_file=True, desc=f"Selecting {name}")
        splits[name] = selected.with_format(None).select_columns(["input_ids", "length"])
    if len(splits["train"]) == 0:
        raise UserError(f"--validation-fraction {fraction} left no sequence for training: lower it")
    if fraction > 0 and len(splits["validation"]) == 0:
        warn(f"the validation split is empty (none of {len(splits['train'])} sequences was drawn at "
             f"--validation-fraction {fraction}): raise it, or add data, to evaluate on held-out text")
    # One writer: saving is I/O-bound, and worker processes would only add memory.
    datasets.DatasetDict(splits).save_to_disk(str(directory))


def _finish(directory: Path, info: TokenizerInfo, options: dict, items: list[InputFile], scans: list[FileScan],
            counts: dict[str, Any], examples: list[str], request: str, shard: dict | None) -> dict:
    """Token counts, length histogram and meta.json, computed from the saved splits."""
    train = _split_stats(directory / "train", info.vocab_size)
    validation = _split_stats(directory / "validation", info.vocab_size)
    np.save(directory / "token_counts.npy", train["token_counts"])
    lengths = np.flatnonzero(train["length_counts"])
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "created_by": f"ds-distil {__version__}",
        "request": request, "tokenise_version": TOKENISE_VERSION,
        "tokenizer": {**asdict(info), "token_dtype": info.token_dtype},
        **options,
        "token_dtype": info.token_dtype,
        "inputs": [item.describe() for item in items],
        "shard": shard,
        "report": _report(counts, options["unit"], scans),
        "fill_ratio": counts["fill_ratio"],
        "mostly_unknown_examples": examples,
        "splits": {"train": {"sequences": train["sequences"], "tokens": train["tokens"]},
                   "validation": {"sequences": validation["sequences"], "tokens": validation["tokens"]}},
        "num_sequences": train["sequences"] + validation["sequences"],
        "num_tokens": train["tokens"] + validation["tokens"],
        "length_histogram": {"split": "train", "lengths": lengths.tolist(),
                             "counts": train["length_counts"][lengths].tolist()},
    }
    (directory / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def _split_stats(split_dir: Path, vocab_size: int) -> dict:
    """Token counts and lengths of a saved split, read as a stream (not memory-mapped).

    Streaming keeps the process's resident memory flat: touching every page of a
    memory-mapped file would count the whole split in this process's RSS.
    """
    import pyarrow as pa

    state = json.loads((split_dir / "state.json").read_text(encoding="utf-8"))
    token_counts = np.zeros(vocab_size, dtype=np.int64)
    length_counts = np.zeros(1, dtype=np.int64)
    sequences = 0
    for entry in state["_data_files"]:
        with pa.OSFile(str(split_dir / entry["filename"])) as source:
            for batch in pa.ipc.open_stream(source):
                ids = batch.column(batch.schema.get_field_index("input_ids")).flatten().to_numpy()
                token_counts += np.bincount(ids, minlength=vocab_size)[:vocab_size]
                lengths = batch.column(batch.schema.get_field_index("length")).to_numpy()
                binned = np.bincount(lengths)
                if len(binned) > len(length_counts):
                    length_counts = np.pad(length_counts, (0, len(binned) - len(length_counts)))
                length_counts[:len(binned)] += binned
                sequences += batch.num_rows
    return {"sequences": sequences, "tokens": int(token_counts.sum()), "token_counts": token_counts,
            "length_counts": length_counts}


# ============================================================================================
# Merging shards
# ============================================================================================

def merge_prepared(shard_dirs: Sequence[str | os.PathLike], output_dir: str | os.PathLike, force: bool = False,
                   tokenizer_dir: str | os.PathLike | None = None) -> dict:
    """Concatenate the outputs of ``prepare --shard I/N`` (all N, any order) into ``output_dir``.

    Every shard must come from the same inputs, tokenizer and options. Splits are joined in
    shard order by hard-linking their Arrow files (copied across filesystems), so nothing
    is decoded or re-encoded; the result equals preparing the inputs in one run.
    """
    output = Path(output_dir)
    _check_output_path(output)
    shards = [(Path(d), load_prepared(d)) for d in shard_dirs]
    first_dir, first = shards[0]
    for directory, prepared in shards:
        meta = prepared.meta
        if not meta.get("shard"):
            raise UserError(f"{directory} is not a shard (it was prepared without --shard): --merge takes the outputs "
                            "of ds-distil prepare --shard I/N")
        if meta["tokenizer"]["fingerprint"] != first.meta["tokenizer"]["fingerprint"]:
            raise UserError(f"{directory} was prepared with another tokenizer (fingerprint "
                            f"{meta['tokenizer']['fingerprint'][:12]}) than {first_dir} (fingerprint "
                            f"{first.meta['tokenizer']['fingerprint'][:12]}): prepare every shard with the same "
                            "--tokenizer")
        for name in SHARED_OPTIONS:
            if meta.get(name) != first.meta.get(name):
                raise UserError(f"{directory} was prepared with {name}={meta.get(name)!r} but {first_dir} with "
                                f"{name}={first.meta.get(name)!r}: prepare every shard with the same options")
        for name in ("count", "listing"):
            if meta["shard"][name] != first.meta["shard"][name]:
                what = "shard count" if name == "count" else "input files (another --input list, or files changed)"
                raise UserError(f"{directory} and {first_dir} are shards of different runs (their {what} differ): "
                                "prepare every shard from the same --input with the same N in --shard I/N")
    if tokenizer_dir is not None:
        check_tokenizer_matches(first.meta, load_tokenizer(tokenizer_dir), first_dir)
    count = first.meta["shard"]["count"]
    by_index: dict[int, Path] = {}
    for directory, prepared in shards:
        index = prepared.meta["shard"]["index"]
        if index in by_index:
            raise UserError(f"shard {index}/{count} is given twice ({by_index[index]} and {directory}): pass each "
                            "shard directory once")
        by_index[index] = directory
    missing = [i for i in range(count) if i not in by_index]
    if missing:
        listed = ", ".join(str(i) for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise UserError(f"shard(s) {listed} of {count} missing: prepare them (ds-distil prepare --shard I/{count} "
                        f"...) and pass all {count} shard directories to --merge")
    ordered = [next(p for d, p in shards if d == by_index[i]) for i in range(count)]
    request = _hash(["merge", FORMAT_VERSION, [p.meta["request"] for p in ordered]])
    existing = _check_output(output, request, force)
    if existing is not None:
        log(f"{output} is up to date (the same {count} shards): nothing to do; --force rebuilds it")
        return existing

    started = time.perf_counter()
    temporary = _temporary_dir(output)
    try:
        temporary.mkdir()
        for split in ("train", "validation"):
            _link_split([Path(p.path) / split for p in ordered], temporary / split, _hash([request, split])[:16])
        shutil.copyfile(Path(ordered[0].path) / "dataset_dict.json", temporary / "dataset_dict.json")
        np.save(temporary / "token_counts.npy", sum(p.token_counts for p in ordered))
        meta = _merged_meta([p.meta for p in ordered], [p.path for p in ordered], request)
        (temporary / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        load_prepared(temporary)  # the merged data reads back, with the counts meta.json records
        _replace(temporary, output)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    if meta["dedup"]:
        warn("the shards were deduplicated separately (--dedup): a line repeated in two shards is kept in both")
    log(f"merged {count} shards into {output}: train {meta['splits']['train']['sequences']:,} sequences / "
        f"{meta['splits']['train']['tokens']:,} tokens, validation {meta['splits']['validation']['sequences']:,} / "
        f"{meta['splits']['validation']['tokens']:,}; fill ratio {meta['fill_ratio']:.1%}; in "
        f"{time.perf_counter() - started:.1f} s")
    return meta


def _link_split(sources: list[Path], target: Path, fingerprint: str) -> None:
    """A saved split whose Arrow files are those of ``sources``, in order (hard links, else copies)."""
    target.mkdir()
    files = []
    for source in sources:
        state = json.loads((source / "state.json").read_text(encoding="utf-8"))
        files.extend(source / entry["filename"] for entry in state["_data_files"])
    entries = []
    for number, path in enumerate(files):
        name = f"data-{number:05d}-of-{len(files):05d}.arrow"
        try:
            os.link(path, target / name)
        except OSError:  # another filesystem, or links not allowed
            shutil.copyfile(path, target / name)
        entries.append({"filename": name})
    state = json.loads((sources[0] / "state.json").read_text(encoding="utf-8"))
    state.update(_data_files=entries, _fingerprint=fingerprint)
    (target / "state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
    shutil.copyfile(sources[0] / "dataset_info.json", target / "dataset_info.json")


def _merged_meta(metas: list[dict], paths: list[str], request: str) -> dict:
    first = metas[0]
    report = {name: sum(int(m["report"].get(name, 0)) for m in metas) for name in first["report"]}
    splits = {name: {key: sum(m["splits"][name][key] for m in metas) for key in ("sequences", "tokens")}
              for name in ("train", "validation")}
    histogram: dict[int, int] = {}
    for m in metas:
        for length, count in zip(m["length_histogram"]["lengths"], m["length_histogram"]["counts"]):
            histogram[length] = histogram.get(length, 0) + count
    lengths = sorted(histogram)
    return {
        **first,
        "created_by": f"ds-distil {__version__}",
        "request": request,
        "inputs": [item for m in metas for item in m["inputs"]],
        "shard": None,
        "merged_from": [{"path": str(Path(p).resolve()), "shard": m["shard"]["index"], "request": m["request"]}
                        for m, p in zip(metas, paths)],
        "report": report,
        "fill_ratio": fill_ratio(report["kept_tokens"], report["kept"], first["max_seq_len"]),
        "mostly_unknown_examples": [e for m in metas for e in m.get("mostly_unknown_examples", [])][:MAX_EXAMPLES],
        "splits": splits,
        "num_sequences": sum(m["num_sequences"] for m in metas),
        "num_tokens": sum(m["num_tokens"] for m in metas),
        "length_histogram": {"split": "train", "lengths": lengths, "counts": [histogram[n] for n in lengths]},
    }


# ============================================================================================
# Output directory
# ============================================================================================

def _temporary_dir(output: Path) -> Path:
    """A fresh sibling of ``output`` (same filesystem, so the final rename is atomic)."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--output {output}: cannot create {output.parent} ({readers.first_line(err)}): choose "
                        "another --output") from None
    for stale in output.parent.glob(f".{output.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)  # left by a run that died
    temporary = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    return temporary


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _replace(temporary: Path, output: Path) -> None:
    """Move the complete new data into place; the old data is removed only afterwards."""
    if output.exists() and not any(output.iterdir()):
        output.rmdir()  # an empty directory the user made for us
    if output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        output.rename(old)
        temporary.rename(output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        temporary.rename(output)




def _hash(value: Any) -> str:
    return stable_hash(value)


# ============================================================================================
# Reading prepared data
# ============================================================================================

@dataclass
class PreparedData:
    """The output of ``ds-distil prepare``, memory-mapped."""

    path: str
    train: Any  # datasets.Dataset: input_ids (uint16/int32 lists), length (int32)
    validation: Any  # datasets.Dataset, same columns
    meta: dict
    token_counts: np.ndarray  # int64, one per vocabulary id, over the training split

    def lengths(self, split: str = "train") -> np.ndarray:
        """Sequence lengths of a split, read from its ``length`` column (nothing decoded)."""
        return lengths_of(self.train if split == "train" else self.validation)


def lengths_of(dataset) -> np.ndarray:
    """The ``length`` column of a prepared dataset as an int32 array."""
    return np.asarray(dataset.data.column("length").to_numpy(), dtype=np.int32)


def load_prepared(path: str | os.PathLike) -> PreparedData:
    """Open data written by :func:`prepare_corpus`, or raise a UserError naming the fix."""
    import datasets

    directory = Path(path)
    if not directory.exists():
        raise UserError(f"prepared data {directory} does not exist: run ds-distil prepare --output {directory} first")
    meta_file = directory / "meta.json"
    if not meta_file.is_file():
        raise UserError(f"{directory} is not prepared data (no meta.json): run ds-distil prepare --tokenizer TEACHER "
                        f"--input CORPUS --output {directory}")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except ValueError:
        raise UserError(f"{meta_file} is not valid JSON: prepare the data again (ds-distil prepare --force)") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{directory} was prepared in format {meta.get('format')} v{meta.get('format_version')}, "
                        f"this ds-distil reads {FORMAT} v{FORMAT_VERSION}: prepare it again with --force")
    try:
        splits = datasets.load_from_disk(str(directory))
        token_counts = np.load(directory / "token_counts.npy")
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError, its IO errors OSErrors
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise UserError(f"{directory}: the prepared data is damaged or incomplete ({reason}): prepare it again "
                        "(ds-distil prepare --force)") from None
    for name in ("train", "validation"):
        expected = (meta.get("splits") or {}).get(name, {}).get("sequences")
        if expected is not None and len(splits[name]) != expected:
            raise UserError(f"{directory}/{name}: holds {len(splits[name])} sequences but meta.json records "
                            f"{expected} (a truncated or replaced file): prepare it again (ds-distil prepare --force)")
    return PreparedData(str(directory), splits["train"], splits["validation"], meta, token_counts)


def check_tokenizer_matches(meta: dict, tokenizer, data_dir: str | os.PathLike) -> None:
    """Raise a UserError if ``data_dir`` was prepared with another tokenizer than ``tokenizer``."""
    expected = meta["tokenizer"]["fingerprint"]
    actual = tokenizer_fingerprint(tokenizer)
    if actual != expected:
        raise UserError(
            f"{data_dir} was prepared with another tokenizer ({meta['tokenizer']['path']}, fingerprint "
            f"{expected[:12]}) than the teacher's ({getattr(tokenizer, 'name_or_path', '?')}, fingerprint "
            f"{actual[:12]}): prepare the corpus again with ds-distil prepare --tokenizer <teacher dir> "
            f"--output <new dir>, or point at data prepared for this teacher")


# ============================================================================================
# Loaders
# ============================================================================================

class MicroBatches:
    """Map-style dataset whose item ``i`` is a collated micro-batch (for torch's DataLoader).

    ``batches[i]`` holds the global sample indices of item ``i``; collation (padding and
    masking) runs in the DataLoader's worker processes. The result depends only on the
    indices and ``epoch``, never on which worker made it.
    """

    def __init__(self, dataset, batches: Sequence[np.ndarray], collator: Callable, epoch: int,
                 start_step: int | None = None, accumulation_steps: int | None = None):
        self.rows = dataset.with_format("arrow", columns=["input_ids"])
        self.batches = batches
        self.collator = collator
        self.epoch = epoch
        self.start_step = start_step
        self.accumulation_steps = accumulation_steps

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, item: int) -> dict:
        indices = np.asarray(self.batches[item], dtype=np.int64)
        batch = self.collator(fetch_rows(self.rows, indices), indices.tolist(), self.epoch)
        if self.accumulation_steps:  # training: say where in the step loop this item belongs
            batch["step"] = self.start_step + item // self.accumulation_steps
            batch["micro_step"] = item % self.accumulation_steps
        return batch


def fetch_rows(rows, indices: np.ndarray) -> list[dict]:
    """``[{"input_ids": np.ndarray}, ...]`` for ``indices`` of an arrow-formatted dataset."""
    if len(indices) == 0:
        return []
    column = rows[indices.tolist()].column("input_ids").combine_chunks()
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy()
    return [{"input_ids": values[offsets[i]:offsets[i + 1]]} for i in range(len(column))]


def make_train_loader(dataset, sampler, collator, epoch: int, start_step: int = 0, num_workers: int = 1,
                      pin_memory: bool = False, prefetch_factor: int = 2):
    """This rank's micro-batches of ``epoch`` from ``start_step``, in step order.

    Yields ``sampler.accumulation_steps`` consecutive items per step, each a dict from the
    collator plus ``step`` and ``micro_step`` (python ints). ``num_workers`` processes
    collate ahead (``prefetch_factor`` items each) so the step never waits on masking; the
    output is the same for any ``num_workers``.
    """
    batches = sampler.epoch_micro_batches(epoch, start_step)
    items = MicroBatches(dataset, batches, collator, epoch, start_step, sampler.accumulation_steps)
    return _loader(items, num_workers, pin_memory, prefetch_factor)


def eval_batches(num_samples: int, micro_batch_size: int, world_size: int = 1, rank: int = 0) -> list[np.ndarray]:
    """This rank's share of a sequential pass over ``num_samples``: nothing dropped, equal counts.

    Every rank gets the same number of batches (so collectives inside the forward pass,
    e.g. ZeRO-3 gathers, line up); sizes differ by at most one. A rank gets an empty
    batch only if there are fewer samples than ranks.
    """
    if micro_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError("micro_batch_size and world_size must be >= 1 and 0 <= rank < world_size")
    per_rank = max(1, -(-num_samples // (world_size * micro_batch_size)))
    if num_samples >= world_size:
        per_rank = min(per_rank, num_samples // world_size)  # no empty batch when avoidable
    pieces = np.array_split(np.arange(num_samples, dtype=np.int64), world_size * per_rank)
    return pieces[rank * per_rank:(rank + 1) * per_rank]


def make_eval_loader(dataset, collator, micro_batch_size: int, world_size: int = 1, rank: int = 0,
                     epoch: int = 0, num_workers: int = 1, pin_memory: bool = False, prefetch_factor: int = 2):
    """Validation micro-batches for this rank, sequential, with fixed masks (``epoch`` is fixed)."""
    batches = eval_batches(len(dataset), micro_batch_size, world_size, rank)
    return _loader(MicroBatches(dataset, batches, collator, epoch), num_workers, pin_memory, prefetch_factor)


def _loader(items: MicroBatches, num_workers: int, pin_memory: bool, prefetch_factor: int):
    import torch
    from torch.utils.data import DataLoader, SequentialSampler

    workers = max(0, int(num_workers))
    # Every iterator of a DataLoader draws a seed from its generator; with none given, from
    # torch's global RNG, which also drives dropout. A resumed run makes its loader at the
    # resume step, the uninterrupted run at the epoch's start, so that draw would shift
    # every later dropout mask. Masks and order depend on (seed, epoch, index) alone, so
    # the loader gets a private, fixed generator and leaves the global stream alone.
    return DataLoader(items, batch_size=None, sampler=SequentialSampler(items), num_workers=workers,
                      pin_memory=pin_memory, prefetch_factor=prefetch_factor if workers else None,
                      persistent_workers=False, generator=torch.Generator().manual_seed(0))
