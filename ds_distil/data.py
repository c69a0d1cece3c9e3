"""Prepare a corpus for distillation: tokenise it with the teacher's tokenizer into an Arrow dataset.

Inputs: plain text files (one sequence per line, blank lines skipped), directories of
them, JSON Lines files with a "text" field, and datasets saved with save_to_disk that
have a "text" column. Each line is tokenised with the teacher's fast tokenizer, wrapped
in its special tokens ([CLS] ... [SEP] or <s> ... </s>), cut into near-equal chunks
that each fit when longer than the maximum length, and dropped when 11 tokens or fewer
or at least half unknown tokens; the counts are reported.

Output: a datasets DatasetDict (train and validation splits, memory-mapped on read, so
every rank of every node shares the page cache), token_counts.npy (counts over the
training split, for masking smoothing) and meta.json (tokenizer fingerprint, special
token ids, lengths, counts). It is written to a temporary directory and renamed into
place when complete. Tokenisation is cached: running again on the same inputs and
tokenizer reuses it.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ds_distil import __version__
from ds_distil.errors import UserError

FORMAT = "ds-distil-prepared"
FORMAT_VERSION = 1
# Bump when the tokenisation code changes what it writes: old cache entries then stop matching.
TOKENISE_VERSION = 1
JSONL_SUFFIXES = (".jsonl", ".json")
SCAN_BLOCK = 16 << 20  # bytes read at once when checking UTF-8
MAX_REPORTED_LINES = 5  # bad line numbers named per file

# Row status written by the tokenisation pass (dropped rows keep no token ids).
KEPT, BLANK, TOO_SHORT, MOSTLY_UNKNOWN = 0, 1, 2, 3

# Model types whose position ids start after the padding index (max length = positions - pad - 1).
ROBERTA_LIKE = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm",
                "data2vec-text", "xmod"}


# ============================================================================================
# CLI
# ============================================================================================

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``ds-distil prepare``."""
    parser.add_argument("--tokenizer", required=True, metavar="DIR",
                        help="the teacher's directory (or any directory holding its fast tokenizer)")
    parser.add_argument("--input", required=True, nargs="+", metavar="PATH",
                        help="text files (one sequence per line), directories of them, .jsonl files with a "
                             "'text' field, or datasets saved with save_to_disk")
    parser.add_argument("--output", required=True, metavar="DIR", help="directory to write the prepared data to")
    parser.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                        help="tokens per sequence, special tokens included (default: the model's maximum)")
    parser.add_argument("--num-proc", type=int, default=1, metavar="N", help="tokenising processes (default 1)")
    parser.add_argument("--validation-fraction", type=float, default=0.01, metavar="F",
                        help="share of the lines held out for validation (default 0.01)")
    parser.add_argument("--min-tokens", type=int, default=12, metavar="N",
                        help="drop sequences shorter than this, special tokens included (default 12)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation split (default 0)")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="where the datasets cache lives (default: $HF_DATASETS_CACHE/ds_distil); "
                             "safe to delete, it only makes re-runs fast")
    parser.add_argument("--force", action="store_true",
                        help="replace --output if it exists (only once the new data is complete)")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``ds-distil prepare``."""
    prepare_corpus(args.tokenizer, args.input, args.output, max_seq_len=args.max_seq_len, num_proc=args.num_proc,
                   validation_fraction=args.validation_fraction, seed=args.seed, min_tokens=args.min_tokens,
                   force=args.force, cache_dir=args.cache_dir)
    return 0


def log(message: str) -> None:
    print(f"ds-distil prepare: {message}", flush=True)


def warn(message: str) -> None:
    print(f"ds-distil prepare: warning: {message}", file=sys.stderr, flush=True)


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
    mask_token_id: int
    pad_token_id: int
    unk_token_id: int | None
    prefix_ids: list[int]  # what wraps every sequence: [CLS] / <s> ...
    suffix_ids: list[int]  # ... [SEP] / </s>
    model_max_length: int
    max_length_source: str

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
    if tokenizer.mask_token_id is None or tokenizer.pad_token_id is None:
        raise UserError(f"--tokenizer {path} has no mask or pad token: ds-distil distils masked language "
                        "models (BERT/RoBERTa style); use the teacher's own tokenizer")
    return tokenizer


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
    return TokenizerInfo(
        path=str(Path(tokenizer_dir).resolve()), class_name=type(tokenizer).__name__,
        fingerprint=tokenizer_fingerprint(tokenizer), vocab_size=len(tokenizer),
        special_tokens={name: str(value) for name, value in tokenizer.special_tokens_map.items()},
        all_special_ids=sorted(int(i) for i in tokenizer.all_special_ids),
        mask_token_id=int(tokenizer.mask_token_id), pad_token_id=int(tokenizer.pad_token_id),
        unk_token_id=None if tokenizer.unk_token_id is None else int(tokenizer.unk_token_id),
        prefix_ids=prefix, suffix_ids=suffix, model_max_length=max_length, max_length_source=source)


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
        positions = config.get("max_position_embeddings")
        if isinstance(positions, int) and positions > 0:
            if config.get("model_type") in ROBERTA_LIKE:
                positions -= int(config.get("pad_token_id", 1)) + 1
            limits.append((positions, "max_position_embeddings in config.json"))
    if not limits:
        raise UserError(f"{tokenizer_dir} does not say the model's maximum length (no model_max_length in "
                        "tokenizer_config.json, no config.json): pass --max-seq-len N")
    return min(limits)


# ============================================================================================
# Inputs
# ============================================================================================

@dataclass(frozen=True)
class InputFile:
    """One input: a text file, a JSON Lines file or a saved ``datasets`` dataset (a directory)."""

    path: str
    kind: str  # "text" | "jsonl" | "saved"


@dataclass
class FileScan:
    """What a pass over a text or JSON Lines file found."""

    path: str
    lines: int = 0
    bytes: int = 0
    usable: int = 0  # lines that can yield text (JSON Lines: records with a string "text")
    bad_utf8: list[int] = field(default_factory=list)  # line numbers (1-based), at most MAX_REPORTED_LINES
    bad_utf8_count: int = 0
    bad_json: list[int] = field(default_factory=list)
    bad_json_count: int = 0
    no_text_count: int = 0


def is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def collect_inputs(inputs: Sequence[str]) -> list[InputFile]:
    """Expand directories (sorted, hidden files skipped) and classify every input."""
    if not inputs:
        raise UserError("no --input given: pass text files, directories, .jsonl files or saved datasets")
    found: list[InputFile] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise UserError(f"input {raw} does not exist: check the path given to --input")
        if path.is_dir():
            inside = list(_walk(path))
            if not inside:
                raise UserError(f"input directory {raw} holds no files: put the corpus there (one sequence per line)")
            found.extend(inside)
        else:
            found.append(InputFile(str(path), _file_kind(path)))
    return found


def _walk(directory: Path) -> Iterator[InputFile]:
    """Files under ``directory`` in sorted order, hidden ones skipped; saved datasets as one input."""
    if is_saved_dataset(directory):
        yield InputFile(str(directory), "saved")
        return
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            yield from _walk(entry)
        elif entry.is_file():
            yield InputFile(str(entry), _file_kind(entry))


def _file_kind(path: Path) -> str:
    return "jsonl" if path.suffix.lower() in JSONL_SUFFIXES else "text"


def input_identity(item: InputFile) -> list:
    """Path, size and modification time of an input (of every file inside a saved dataset)."""
    path = Path(item.path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [item.kind, str(path.resolve())] + [[str(p.relative_to(path)) if p != path else "", p.stat().st_size,
                                                p.stat().st_mtime_ns] for p in files]


def scan_text_file(path: str) -> FileScan:
    """Count lines and find those that are not valid UTF-8 (whole blocks decode at once)."""
    scan = FileScan(path)
    with open(path, "rb") as handle:
        while True:
            block = handle.read(SCAN_BLOCK)
            if not block:
                break
            block += handle.readline()  # end on a line boundary
            scan.bytes += len(block)
            try:
                block.decode("utf-8")
            except UnicodeDecodeError:
                for number, line in enumerate(block.split(b"\n"), start=scan.lines + 1):
                    try:
                        line.decode("utf-8")
                    except UnicodeDecodeError:
                        _note(scan.bad_utf8, number)
                        scan.bad_utf8_count += 1
            scan.lines += block.count(b"\n") + (0 if block.endswith(b"\n") else 1)
    scan.usable = scan.lines
    return scan


def scan_jsonl_file(path: str) -> FileScan:
    """Check every line of a JSON Lines file: UTF-8, valid JSON, a string ``text`` field."""
    scan = FileScan(path)
    for number, raw in enumerate(_binary_lines(path), start=1):
        scan.lines += 1
        scan.bytes += len(raw)
        text, bad = _decode(raw)
        if bad:
            _note(scan.bad_utf8, number)
            scan.bad_utf8_count += 1
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except ValueError:
            _note(scan.bad_json, number)
            scan.bad_json_count += 1
            continue
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            scan.no_text_count += 1
        else:
            scan.usable += 1
    return scan


def _note(lines: list[int], number: int) -> None:
    if len(lines) < MAX_REPORTED_LINES:
        lines.append(number)


def _binary_lines(path: str) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        for raw in handle:
            yield raw.rstrip(b"\r\n")


def _decode(raw: bytes) -> tuple[str, bool]:
    """``(text, was_bad)``: strict UTF-8, else with U+FFFD replacement characters."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def report_scans(scans: Sequence[FileScan]) -> None:
    """One warning per file with problems; the work goes on."""
    for scan in scans:
        if scan.bad_utf8_count:
            warn(f"{scan.path}: {scan.bad_utf8_count} line(s) are not valid UTF-8 (line "
                 f"{_numbers(scan.bad_utf8, scan.bad_utf8_count)}); they were decoded with U+FFFD replacement "
                 "characters: convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8) if that is wrong")
        if scan.bad_json_count:
            warn(f"{scan.path}: {scan.bad_json_count} line(s) are not valid JSON (line "
                 f"{_numbers(scan.bad_json, scan.bad_json_count)}); they were skipped: fix them, or name the file "
                 ".txt if it is plain text")
        if scan.no_text_count:
            warn(f"{scan.path}: {scan.no_text_count} JSON line(s) have no string 'text' field; they were skipped")


def _numbers(numbers: list[int], total: int) -> str:
    shown = ", ".join(str(n) for n in numbers)
    return shown + (", ..." if total > len(numbers) else "")


def jsonl_texts(paths: list[str], identity: list) -> Iterator[dict]:
    """Rows ``{"text": ...}`` of JSON Lines files (``datasets`` generator; ``identity`` keys its cache).

    Lines that are not JSON objects with a string ``text`` were reported by the scan and
    are skipped here; bad UTF-8 is replaced, as for text files.
    """
    del identity  # only part of the cache key
    for path in paths:
        for raw in _binary_lines(path):
            text, _ = _decode(raw)
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                yield {"text": record["text"]}


def load_saved_text(path: str):
    """The ``text`` column of a dataset saved with ``save_to_disk`` (its train split for a DatasetDict)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except Exception as err:
        raise UserError(f"input {path} looks like a saved dataset but cannot be loaded ({type(err).__name__}: "
                        f"{str(err)[:120]}): save it again with Dataset.save_to_disk") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" in loaded:
            loaded = loaded["train"]
        elif len(loaded) == 1:
            loaded = next(iter(loaded.values()))
        else:
            raise UserError(f"input {path} is a DatasetDict with splits {sorted(loaded)} and no 'train': "
                            "save the split to use on its own (dataset_dict['NAME'].save_to_disk(DIR))")
    if "text" not in loaded.column_names:
        raise UserError(f"input {path} has no 'text' column (columns: {loaded.column_names}): rename the "
                        "column that holds the text to 'text' (dataset.rename_column(OLD, 'text'))")
    return loaded.select_columns(["text"])


def load_raw_text(items: list[InputFile], cache_dir: Path, num_proc: int):
    """All inputs as one memory-mapped dataset with a single ``text`` column, in input order."""
    import datasets

    parts = []
    for kind, group in _consecutive_groups(items):
        paths = [item.path for item in group]
        workers = min(num_proc, len(paths))
        if kind == "text":
            parts.append(datasets.load_dataset(
                "text", data_files=paths, split="train", cache_dir=str(cache_dir / "sources"),
                encoding_errors="replace", num_proc=workers if workers > 1 else None))
        elif kind == "jsonl":
            identity = [input_identity(item) for item in group]
            key = _hash(["jsonl", TOKENISE_VERSION, identity])
            parts.append(datasets.Dataset.from_generator(
                jsonl_texts, gen_kwargs={"paths": paths, "identity": identity},
                features=datasets.Features({"text": datasets.Value("string")}),
                cache_dir=str(cache_dir / "sources"), fingerprint=key,
                num_proc=workers if workers > 1 else None))
        else:
            parts.extend(load_saved_text(path) for path in paths)
    if len(parts) == 1:
        return parts[0]
    # Concatenation needs one schema (a saved dataset may hold large_string text).
    string = datasets.Value("string")
    parts = [part if part.features["text"] == string else part.cast_column("text", string) for part in parts]
    return datasets.concatenate_datasets(parts)


def _consecutive_groups(items: list[InputFile]) -> Iterator[tuple[str, list[InputFile]]]:
    group: list[InputFile] = []
    for item in items:
        if group and (item.kind != group[0].kind or item.kind == "saved"):
            yield group[0].kind, group
            group = []
        group.append(item)
    if group:
        yield group[0].kind, group


# ============================================================================================
# Tokenisation (runs in datasets' worker processes)
# ============================================================================================

class Tokenise:
    """Batched ``datasets.map`` function: lines -> wrapped, chunked, filtered token ids.

    Every output row carries its ``status`` (kept / blank / too short / mostly unknown),
    the input ``line`` it came from and its ``chunk`` number, so that the counts can be
    reported from the cached result without tokenising again. Dropped rows keep no ids.
    """

    def __init__(self, backend_json: str, prefix: list[int], suffix: list[int], max_seq_len: int,
                 min_tokens: int, unk_id: int | None):
        self.backend_json = backend_json
        self.prefix = list(prefix)
        self.suffix = list(suffix)
        self.body = max_seq_len - len(prefix) - len(suffix)
        self.min_tokens = min_tokens
        self.unk_id = unk_id
        self._backend = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_backend"] = None  # rebuilt in each worker
        return state

    def _tokenizer(self):
        if self._backend is None:
            from tokenizers import Tokenizer

            self._backend = Tokenizer.from_str(self.backend_json)
            self._backend.no_truncation()
            self._backend.no_padding()
        return self._backend

    def __call__(self, texts: list[str], indices: list[int]) -> dict:
        present = [i for i, text in enumerate(texts) if text and not text.isspace()]
        encoded = iter(self._tokenizer().encode_batch_fast([texts[i] for i in present], add_special_tokens=False))
        present_set = set(present)
        rows: dict[str, list] = {"input_ids": [], "length": [], "status": [], "line": [], "chunk": []}
        for i, line in enumerate(indices):
            if i not in present_set:
                self._add(rows, [], 0, BLANK, line, 0)
                continue
            content = next(encoded).ids
            for number, piece in enumerate(self._chunks(content)):
                self._add_piece(rows, piece, line, number)
        return {
            "input_ids": rows["input_ids"],
            "length": np.asarray(rows["length"], dtype=np.int32),
            "status": np.asarray(rows["status"], dtype=np.int8),
            "line": np.asarray(rows["line"], dtype=np.int64),
            "chunk": np.asarray(rows["chunk"], dtype=np.int32),
        }

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

    def _add_piece(self, rows: dict, piece: list[int], line: int, number: int) -> None:
        length = len(piece) + len(self.prefix) + len(self.suffix)
        if length < self.min_tokens:
            self._add(rows, [], length, TOO_SHORT, line, number)
        elif self.unk_id is not None and 2 * piece.count(self.unk_id) >= len(piece):
            self._add(rows, [], length, MOSTLY_UNKNOWN, line, number)
        else:
            self._add(rows, self.prefix + piece + self.suffix, length, KEPT, line, number)

    @staticmethod
    def _add(rows: dict, ids: list[int], length: int, status: int, line: int, chunk: int) -> None:
        rows["input_ids"].append(ids)
        rows["length"].append(length)
        rows["status"].append(status)
        rows["line"].append(line)
        rows["chunk"].append(chunk)


class SplitSelector:
    """Batched ``datasets.filter`` function: kept rows of one split.

    A line goes to validation when a hash of ``(seed, line number)`` falls below the
    fraction, so all chunks of a line land in the same split, whatever ``num_proc`` was.
    """

    def __init__(self, validation: bool, fraction: float, seed: int):
        self.validation = validation
        self.fraction = fraction
        self.seed = seed

    def __call__(self, status: np.ndarray, line: np.ndarray) -> np.ndarray:
        held_out = uniform_hash(np.asarray(line), self.seed) < self.fraction
        return (np.asarray(status) == KEPT) & (held_out if self.validation else ~held_out)


def uniform_hash(values: np.ndarray, seed: int) -> np.ndarray:
    """Uniform floats in [0, 1) from integers and a seed (splitmix64, vectorised)."""
    mask = 2**64 - 1
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
                   cache_dir: str | os.PathLike | None = None) -> dict:
    """Tokenise ``inputs`` with the tokenizer in ``tokenizer_dir`` into ``output_dir``; returns meta.

    See the module docstring for the format. Raises :class:`UserError` for every input
    problem that stops the work; warns (and goes on) for bad lines.
    """
    _check_options(num_proc, validation_fraction, min_tokens, seed)
    output = Path(output_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    info = describe_tokenizer(tokenizer, tokenizer_dir)
    max_seq_len = _resolve_max_len(max_seq_len, info, min_tokens)
    items = collect_inputs(inputs)
    options = {"max_seq_len": max_seq_len, "min_tokens": min_tokens,
               "validation_fraction": validation_fraction, "seed": seed}
    request = _hash([FORMAT_VERSION, TOKENISE_VERSION, info.fingerprint, options,
                     [input_identity(item) for item in items]])
    existing = _check_output(output, request, force)
    if existing is not None:
        log(f"{output} is up to date (same inputs, tokenizer and options): nothing to do; --force rebuilds it")
        return existing
    cache = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    log(f"tokenizer {info.path} ({info.class_name}, {info.vocab_size} tokens, fingerprint "
        f"{info.fingerprint[:12]}); sequences of at most {max_seq_len} tokens "
        f"(model maximum {info.model_max_length}, from {info.max_length_source})")

    started = time.perf_counter()
    scans = {i.path: scan_text_file(i.path) if i.kind == "text" else scan_jsonl_file(i.path)
             for i in _progress(items, "checking inputs") if i.kind != "saved"}
    report_scans(list(scans.values()))
    _log_inputs(items, list(scans.values()))
    # datasets cannot build a dataset from a file without rows: leave such files out.
    readable = [i for i in items if i.kind == "saved" or scans[i.path].usable]
    raw = load_raw_text(readable, cache, num_proc) if readable else None
    if raw is None or len(raw) == 0:
        raise UserError(f"the inputs ({_names(items)}) hold no text: pass the corpus files (one sequence per line)")
    tokenised = _tokenise(raw, tokenizer, info, max_seq_len, min_tokens, num_proc, cache, readable)
    del raw  # unmaps the text: its pages leave this process's resident set before the next pass
    counts = _status_counts(tokenised)
    _log_counts(counts, min_tokens)
    if counts["kept"] == 0:
        raise UserError(f"no sequence of {min_tokens} tokens or more in the inputs ({_names(items)}): check that "
                        "--input is the corpus (one sequence per line) and --tokenizer the teacher's tokenizer")

    temporary = _temporary_dir(output)
    try:
        _write_splits(tokenised, temporary, validation_fraction, seed, cache)
        meta = _finish(temporary, info, options, items, list(scans.values()), counts, request)
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


def _check_options(num_proc: int, validation_fraction: float, min_tokens: int, seed: int) -> None:
    if num_proc < 1:
        raise UserError(f"--num-proc {num_proc} must be at least 1")
    if not 0.0 <= validation_fraction < 1.0:
        raise UserError(f"--validation-fraction {validation_fraction} must be in [0, 1) (e.g. 0.01 for 1%)")
    if min_tokens < 1:
        raise UserError(f"--min-tokens {min_tokens} must be at least 1")
    if seed < 0:
        raise UserError(f"--seed {seed} must be >= 0")


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
    if not output.exists() or (output.is_dir() and not any(output.iterdir())):
        return None
    if not output.is_dir():
        raise UserError(f"--output {output} is a file: choose a directory name")
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


def _tokenise(raw, tokenizer, info: TokenizerInfo, max_seq_len: int, min_tokens: int, num_proc: int,
              cache: Path, items: list[InputFile]):
    """``raw.map(Tokenise)``, cached under a key of the inputs (paths, sizes, mtimes), tokenizer and options."""
    import datasets

    key = _hash(["tokenise", TOKENISE_VERSION, [input_identity(item) for item in items], info.fingerprint,
                 max_seq_len, min_tokens, info.prefix_ids, info.suffix_ids])[:32]
    cache_file = cache / "tokenised" / f"{key}.arrow"
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cached = sorted(cache_file.parent.glob(f"{key}*.arrow"))
    if cached:
        log(f"reusing the cached tokenisation ({cache_file.parent}/{key}*.arrow)")
    else:
        log(f"tokenising {len(raw):,} lines with {num_proc} process(es)")
    function = Tokenise(bare_backend(tokenizer).to_str(), info.prefix_ids, info.suffix_ids, max_seq_len,
                        min_tokens, info.unk_token_id)
    features = datasets.Features({
        "input_ids": datasets.List(datasets.Value(info.token_dtype)),
        "length": datasets.Value("int32"), "status": datasets.Value("int8"),
        "line": datasets.Value("int64"), "chunk": datasets.Value("int32"),
    })
    # Forked workers share the parent's heap copy-on-write; the garbage collector walking
    # those objects would copy them page by page into every worker. Frozen, it leaves them.
    if num_proc > 1:
        gc.collect()
        gc.freeze()
    try:
        return raw.map(function, batched=True, with_indices=True, input_columns=["text"], remove_columns=["text"],
                       features=features, num_proc=num_proc if num_proc > 1 else None,
                       cache_file_name=str(cache_file), new_fingerprint=key, load_from_cache_file=True,
                       desc="Tokenising")
    finally:
        if num_proc > 1:
            gc.unfreeze()


def _status_counts(tokenised) -> dict[str, int]:
    """Row counts per status, and how many lines were cut (from two small columns, streamed)."""
    import pyarrow.compute as pc

    table = tokenised.data.table if hasattr(tokenised.data, "table") else tokenised.data
    by_status = {int(v["values"]): int(v["counts"]) for v in pc.value_counts(table.column("status")).to_pylist()}
    chunk = table.column("chunk")

    def count(mask) -> int:
        return int(pc.sum(mask).as_py() or 0)

    cut = count(pc.equal(chunk, 1))  # every line that was cut has a chunk 1
    return {
        "lines": count(pc.equal(chunk, 0)),
        "kept": by_status.get(KEPT, 0), "blank": by_status.get(BLANK, 0),
        "too_short": by_status.get(TOO_SHORT, 0), "mostly_unknown": by_status.get(MOSTLY_UNKNOWN, 0),
        "cut": cut, "chunks_from_cut": cut + count(pc.greater_equal(chunk, 1)),
    }


def _log_counts(counts: dict[str, int], min_tokens: int) -> None:
    log(f"{counts['lines']:,} lines: {counts['blank']:,} blank skipped; {counts['cut']:,} longer than the maximum "
        f"cut into {counts['chunks_from_cut']:,} chunks; dropped {counts['too_short']:,} of {min_tokens - 1} tokens "
        f"or fewer and {counts['mostly_unknown']:,} at least half unknown tokens; {counts['kept']:,} sequences kept")


def _write_splits(tokenised, directory: Path, fraction: float, seed: int, cache: Path) -> None:
    """Save the kept rows as a DatasetDict (train, validation) of ``input_ids`` and ``length``."""
    import datasets

    view = tokenised.with_format("numpy")
    splits = {}
    for name in ("train", "validation"):
        key = _hash(["split", tokenised._fingerprint, name, fraction, seed])[:32]
        selected = view.filter(SplitSelector(name == "validation", fraction, seed), input_columns=["status", "line"],
                               batched=True, batch_size=100_000, cache_file_name=str(cache / "splits" / f"{key}.arrow"),
                               new_fingerprint=key, load_from_cache_file=True, desc=f"Selecting {name}")
        splits[name] = selected.with_format(None).select_columns(["input_ids", "length"])
    if len(splits["train"]) == 0:
        raise UserError(f"--validation-fraction {fraction} left no sequence for training: lower it")
    if fraction > 0 and len(splits["validation"]) == 0:
        warn(f"the validation split is empty (no line of {len(splits['train'])} was drawn at "
             f"--validation-fraction {fraction}): raise it, or add data, to evaluate on held-out text")
    # One writer: saving is I/O-bound, and worker processes would only add memory.
    datasets.DatasetDict(splits).save_to_disk(str(directory))


def _finish(directory: Path, info: TokenizerInfo, options: dict, items: list[InputFile], scans: list[FileScan],
            counts: dict[str, int], request: str) -> dict:
    """Token counts, length histogram and meta.json, computed from the saved splits."""
    train = _split_stats(directory / "train", info.vocab_size)
    validation = _split_stats(directory / "validation", info.vocab_size)
    np.save(directory / "token_counts.npy", train["token_counts"])
    lengths = np.flatnonzero(train["length_counts"])
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "created_by": f"ds-distil {__version__}",
        "request": request,
        "tokenizer": {**asdict(info), "token_dtype": info.token_dtype},
        **options,
        "token_dtype": info.token_dtype,
        "inputs": [{"path": item.path, "kind": item.kind} for item in items],
        "report": {**counts, "bad_utf8_lines": sum(s.bad_utf8_count for s in scans),
                   "bad_json_lines": sum(s.bad_json_count for s in scans),
                   "no_text_lines": sum(s.no_text_count for s in scans)},
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


def _temporary_dir(output: Path) -> Path:
    """A fresh sibling of ``output`` (same filesystem, so the final rename is atomic)."""
    output.parent.mkdir(parents=True, exist_ok=True)
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


def _log_inputs(items: list[InputFile], scans: list[FileScan]) -> None:
    kinds = {"text": "text file", "jsonl": "JSON Lines file", "saved": "saved dataset"}
    parts = []
    for kind, label in kinds.items():
        n = sum(1 for item in items if item.kind == kind)
        if n:
            parts.append(f"{n} {label}{'s' if n > 1 else ''}")
    size = sum(scan.bytes for scan in scans)
    log(f"inputs: {', '.join(parts)}" + (f" ({size / 1e6:,.1f} MB of text)" if size else ""))


def _names(items: list[InputFile], limit: int = 3) -> str:
    names = ", ".join(item.path for item in items[:limit])
    return names + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _progress(items: list, desc: str) -> Any:
    if len(items) < 20:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=" files")


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()


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
    from torch.utils.data import DataLoader, SequentialSampler

    workers = max(0, int(num_workers))
    return DataLoader(items, batch_size=None, sampler=SequentialSampler(items), num_workers=workers,
                      pin_memory=pin_memory, prefetch_factor=prefetch_factor if workers else None,
                      persistent_workers=False)
