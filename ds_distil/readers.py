"""Turn ``ds-distil prepare`` inputs into ``datasets`` datasets of documents with one ``text`` column.

One place knows every input format, and reads each with ``datasets``' own loaders:

- plain text (``load_dataset("text")``), one row per line, or per blank-line-separated
  block in document mode; JSON Lines (``load_dataset("json")``); CSV and TSV
  (``load_dataset("csv")``, only the text column); parquet files
  (``load_dataset("parquet")``, only the text column); Arrow files (IPC stream files
  memory-mapped with ``Dataset.from_file``, IPC files through ``load_dataset("arrow")``);
  datasets saved with ``save_to_disk`` (``load_from_disk``);
- text, JSON Lines and CSV/TSV compressed with gzip, bzip2, xz or zstd (``.gz``, ``.bz2``,
  ``.xz``, ``.zst``; zstd needs the ``zstandard`` package), decompressed on the fly;
- directories: walked recursively (sorted, hidden files skipped), or, when laid out as a
  dataset repository downloaded from the hub (a README.md dataset card,
  ``data/train-00000-of-00002.parquet``, ``<config>/train-*.parquet``), resolved offline
  with ``datasets``' own data-file patterns to the files of the train split.

Every file is checked before it is read: its content must match its name (magic bytes),
compressed files must decompress to the end (a truncated download is named), text must be
mostly valid UTF-8 and free of NUL bytes (binary data is refused), columnar files must
have the text column, of a string type, and at least one row. Every problem is a
:class:`~ds_distil.errors.UserError` of one line that names the file and the fix.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import re
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import xxhash  # a dependency of datasets: fast, stable 64-bit hashes

from ds_distil.errors import UserError

SCAN_BLOCK = 16 << 20  # bytes decoded at once when checking UTF-8
HEAD_BYTES = 8192  # bytes sniffed for magic numbers and NUL bytes
MAX_REPORTED_LINES = 5  # bad line numbers named per file
CSV_SAMPLE_ROWS = 1000  # rows read to check a CSV column's type
READ_VERSION = 2  # bump when a reader changes what it produces: cached reads then stop matching

COMPRESSION_SUFFIXES = {".gz": "gzip", ".gzip": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd", ".zstd": "zstd"}
COMPRESSION_NAMES = {"gzip": ".gz", "bz2": ".bz2", "xz": ".xz", "zstd": ".zst"}
FORMAT_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow", ".feather": "arrow",
                   ".ipc": "arrow", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl",
                   ".ndjson": "jsonl"}
COMPRESSION_MAGIC = [(b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd")]
ARCHIVE_MAGIC = [(b"PK\x03\x04", "a zip archive", "unzip"), (b"PK\x05\x06", "a zip archive", "unzip"),
                 (b"Rar!", "a rar archive", "unrar x"), (b"7z\xbc\xaf\x27\x1c", "a 7z archive", "7z x"),
                 (b"\x04\x22\x4d\x18", "lz4-compressed", "lz4 -d")]
PARQUET_MAGIC = b"PAR1"
ARROW_FILE_MAGIC = b"ARROW1"
ARROW_STREAM_MAGIC = b"\xff\xff\xff\xff"
# Files a dataset repository holds beside its data (datasets ignores the same names).
REPO_MARKERS = ("README.md", ".gitattributes", ".cache/huggingface")
# Sharded split files as the hub writes them: train-00000-of-00002.parquet.
SHARD_NAME = re.compile(r"^(train|training|validation|valid|val|dev|test|testing|eval|evaluation)-\d{5}-of-\d{5}")
KIND_LABELS = {"text": "text file", "jsonl": "JSON Lines file", "csv": "CSV file", "tsv": "TSV file",
               "parquet": "parquet file", "arrow": "Arrow file", "saved": "saved dataset"}
TEXT_KINDS = ("text", "jsonl", "csv", "tsv")  # read line by line: checked by a full scan


def log(message: str) -> None:
    print(f"ds-distil prepare: {message}", flush=True)


def warn(message: str) -> None:
    print(f"ds-distil prepare: warning: {message}", file=sys.stderr, flush=True)


# ============================================================================================
# Finding the inputs
# ============================================================================================

@dataclass(frozen=True)
class InputFile:
    """One input: a file, or a dataset saved with ``save_to_disk`` (a directory)."""

    path: str
    kind: str  # "text" | "jsonl" | "csv" | "tsv" | "parquet" | "arrow" | "saved"
    compression: str | None = None  # "gzip" | "bz2" | "xz" | "zstd"

    def describe(self) -> dict:
        described = {"path": self.path, "kind": self.kind}
        if self.compression:
            described["compression"] = self.compression
        return described


def collect_inputs(inputs: Sequence[str]) -> list[InputFile]:
    """Expand directories and classify every input, in a deterministic order."""
    if not inputs:
        raise UserError("no --input given: pass text, JSON Lines, CSV, parquet or Arrow files, directories of "
                        "them, dataset repositories or saved datasets")
    found: list[InputFile] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise UserError(f"input {raw} does not exist: check the path given to --input")
        if path.is_dir():
            inside = _expand_directory(path)
            if not inside:
                raise UserError(f"input directory {raw} holds no files: put the corpus there (one sequence per line)")
            found.extend(inside)
        else:
            found.append(classify(path))
    return found


def is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _expand_directory(directory: Path) -> list[InputFile]:
    if is_saved_dataset(directory):
        return [InputFile(str(directory), "saved")]
    if is_dataset_repository(directory):
        return [classify(Path(p)) for p in repository_files(directory)]
    return list(_walk(directory))


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
            yield classify(entry)


def is_dataset_repository(directory: Path) -> bool:
    """A directory downloaded from the hub: a dataset card, git attributes, or sharded split files."""
    if any((directory / marker).exists() for marker in REPO_MARKERS):
        return True
    return any(SHARD_NAME.match(p.name) for p in directory.rglob("*")
               if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts))


def repository_files(directory: Path) -> list[str]:
    """The train split's data files of a dataset repository, found offline as ``datasets`` would."""
    from datasets.data_files import DataFilesDict, get_data_patterns, sanitize_patterns

    config_name, patterns = _card_patterns(directory)
    try:
        if patterns is None:
            patterns = get_data_patterns(str(directory))
        files = DataFilesDict.from_patterns(sanitize_patterns(patterns), base_path=str(directory))
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"input {directory} looks like a dataset repository but its data files cannot be found "
                        f"({first_line(err)}): pass the data files or their directory instead") from None
    where = f"{directory}" + (f" (config {config_name})" if config_name else "")
    if "train" not in files:
        raise UserError(f"input {where} is a dataset repository without a train split (splits: "
                        f"{', '.join(sorted(files))}): pass the files of the split to use")
    train = [str(Path(p)) for p in files["train"]]
    left_out = ", ".join(f"{name} ({len(paths)} file{'s' if len(paths) > 1 else ''})"
                         for name, paths in files.items() if name != "train")
    log(f"{where}: dataset repository, split train: {len(train)} file{'s' if len(train) > 1 else ''}"
        + (f"; left out: {left_out}" if left_out else ""))
    return train


def _card_patterns(directory: Path) -> tuple[str | None, Any]:
    """``(config name, data-file patterns)`` from the dataset card's YAML ``configs``, or ``(None, None)``."""
    readme = directory / "README.md"
    if not readme.is_file():
        return None, None
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard

    try:
        configs = MetadataConfigs.from_dataset_card_data(DatasetCard.load(readme).data)
    except Exception as err:  # YAML and card validation raise many types
        raise UserError(f"{readme}: the dataset card's YAML header cannot be read ({first_line(err)}): fix it, or pass "
                        "the data files instead of the repository") from None
    if not configs:
        return None, None
    try:
        name = configs.get_default_config_name()
    except ValueError as err:
        raise UserError(f"{readme}: {first_line(err)}: pass the data files of one configuration") from None
    if name is None:
        listed = ", ".join(f"{n} ({_config_dir(c)})" for n, c in list(configs.items())[:8])
        more = f" and {len(configs) - 8} more" if len(configs) > 8 else ""
        raise UserError(f"input {directory} is a dataset repository with {len(configs)} configurations and no default "
                        f"({listed}{more}): pass the directory of the one to use, e.g. --input "
                        f"{directory / _config_dir(next(iter(configs.values())))}")
    config = configs[name]
    if "data_files" in config:
        return name, config["data_files"]
    if "data_dir" in config:
        from datasets.data_files import get_data_patterns

        base = directory / config["data_dir"]
        return name, {split: [f"{config['data_dir']}/{p}" for p in patterns]
                      for split, patterns in get_data_patterns(str(base)).items()}
    return name, None


def _config_dir(config: dict) -> str:
    """The directory a configuration's data files live in (for the error message)."""
    files = config.get("data_files") or config.get("data_dir") or ""
    if isinstance(files, list) and files:
        files = files[0].get("path", "") if isinstance(files[0], dict) else files[0]
    if isinstance(files, dict):
        files = next(iter(files.values()), "")
    if isinstance(files, list):
        files = files[0] if files else ""
    return str(files).split("/")[0] or "."


def classify(path: Path) -> InputFile:
    """Format and compression of a file, from its name and checked against its first bytes."""
    name = path.name.lower()
    suffix = Path(name).suffix
    declared = COMPRESSION_SUFFIXES.get(suffix)
    base_suffix = Path(name[: -len(suffix)]).suffix if declared else suffix
    kind = FORMAT_SUFFIXES.get(base_suffix, "text")
    with open(path, "rb") as handle:
        head = handle.read(512)
    if not head:
        return InputFile(str(path), kind, declared)  # an empty file: nothing to check
    for magic, what, tool in ARCHIVE_MAGIC:
        if head.startswith(magic):
            raise UserError(f"input {path} is {what}, which prepare does not read: unpack it first ({tool} {path}) "
                            "and pass the files")
    if len(head) > 262 and head[257:262] == b"ustar":
        raise UserError(f"input {path} is a tar archive, which prepare does not read: unpack it first "
                        f"(tar xf {path}) and pass the files")
    actual = next((compression for magic, compression in COMPRESSION_MAGIC if head.startswith(magic)), None)
    if declared and actual != declared:
        raise UserError(f"input {path} is named {suffix} but is not {declared} data"
                        + (f" (it is {actual})" if actual else "") + ": rename it or download it again")
    if actual and not declared:
        raise UserError(f"input {path} is {actual}-compressed but its name does not say so: rename it "
                        f"{path.name}{COMPRESSION_NAMES[actual]}")
    if declared:
        if kind in ("parquet", "arrow"):
            raise UserError(f"input {path} is a compressed {kind} file, which prepare does not read: decompress it "
                            "(parquet and Arrow files are compressed inside already)")
        return InputFile(str(path), kind, declared)
    # Uncompressed: the content decides between the binary formats, whatever the name says.
    if head.startswith(PARQUET_MAGIC):
        return InputFile(str(path), "parquet")
    if head.startswith(ARROW_FILE_MAGIC) or head.startswith(ARROW_STREAM_MAGIC):
        return InputFile(str(path), "arrow")
    if kind == "parquet":
        raise UserError(f"input {path} is not a parquet file (it does not start with PAR1): it may be damaged or "
                        "another format; download it again")
    if kind == "arrow":
        raise UserError(f"input {path} is not an Arrow IPC file or stream: it may be damaged or another format")
    return InputFile(str(path), kind)


def input_identity(item: InputFile) -> list:
    """Path, size and modification time of an input (of every file inside a saved dataset)."""
    path = Path(item.path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [item.kind, str(path.resolve())] + [[str(p.relative_to(path)) if p != path else "", p.stat().st_size,
                                                p.stat().st_mtime_ns] for p in files]


def input_size(item: InputFile) -> int:
    path = Path(item.path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ============================================================================================
# Sharding
# ============================================================================================

def parse_shard(spec: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)``, 0 <= I < N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec or "")
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise UserError(f"--shard {spec}: expected I/N with 0 <= I < N (e.g. --shard 0/8 ... --shard 7/8, or "
                        "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return int(match.group(1)), int(match.group(2))


def shard_bounds(sizes: Sequence[int], count: int) -> list[int]:
    """Boundaries of ``count`` contiguous, non-empty runs of items with near-equal total sizes.

    Shard ``k`` holds items ``bounds[k]:bounds[k + 1]``. Depends only on the sizes, so every
    machine computes the same shards; contiguity makes the merged output keep input order.
    """
    n = len(sizes)
    cumulative = np.cumsum(np.asarray(sizes, dtype=np.float64) + 1.0)  # +1: empty files still weigh
    total = cumulative[-1]
    bounds = [0]
    for k in range(1, count):
        target = total * k / count
        cut = int(np.searchsorted(cumulative, target, side="left"))  # items 0..cut reach the target
        if cut > 0 and abs(cumulative[cut - 1] - target) <= abs(cumulative[cut] - target):
            cut -= 1
        cut += 1  # count of items in shards < k
        bounds.append(min(max(cut, bounds[-1] + 1), n - (count - k)))
    bounds.append(n)
    return bounds


def shard_items(items: list[InputFile], index: int, count: int) -> list[InputFile]:
    """The ``index``-th of ``count`` deterministic shards of ``items`` (whole files, sizes balanced)."""
    if count == 1:
        return list(items)
    if len(items) < count:
        raise UserError(f"--shard {index}/{count}: the inputs are {len(items)} file(s), fewer than {count} shards: "
                        f"use at most {len(items)} shards, or split big files first (e.g. split -n l/{count} FILE)")
    bounds = shard_bounds([input_size(item) for item in items], count)
    return items[bounds[index]:bounds[index + 1]]


# ============================================================================================
# Checking the inputs
# ============================================================================================

@dataclass
class FileScan:
    """What the check of one input found."""

    path: str
    lines: int = 0
    bytes: int = 0  # decompressed bytes for text-like files, file bytes otherwise
    usable: int = 0  # lines (rows) that can yield text
    rows: int | None = None  # rows of a columnar file
    bad_utf8: list[int] = field(default_factory=list)  # line numbers (1-based), at most MAX_REPORTED_LINES
    bad_utf8_count: int = 0
    bad_json: list[int] = field(default_factory=list)
    bad_json_count: int = 0
    no_text_count: int = 0
    null_text_count: int = 0
    fields: list[str] = field(default_factory=list)  # JSON fields seen (for the error message)


def check_inputs(items: list[InputFile], text_column: str) -> dict[str, FileScan]:
    """Check every input (see the module docstring); returns what was found per path."""
    scans = {}
    for item in _progress(items, "checking inputs"):
        if item.kind in TEXT_KINDS:
            scan = scan_text_file(item.path, item.compression)
            if item.kind in ("csv", "tsv"):
                _check_csv_column(item, text_column, scan)
        elif item.kind == "parquet":
            scan = _check_parquet(item, text_column)
        elif item.kind == "arrow":
            scan = _check_arrow(item, text_column)
        else:
            continue  # saved datasets are checked when loaded
        scans[item.path] = scan
    return scans


def open_decompressed(path: str, compression: str | None):
    """A binary file object over the decompressed content (truncation raises EOFError at the end)."""
    if compression is None:
        return open(path, "rb")
    if compression == "gzip":
        return gzip.open(path, "rb")
    if compression == "bz2":
        return bz2.open(path, "rb")
    if compression == "xz":
        return lzma.open(path, "rb")
    if compression == "zstd":
        return io.BufferedReader(_ZstdReader(path), buffer_size=1 << 20)
    raise ValueError(compression)


class _ZstdReader(io.RawIOBase):
    """zstd frames one after another; unlike zstandard's stream_reader, a truncated file raises EOFError."""

    def __init__(self, path: str):
        try:
            import zstandard
        except ImportError:
            raise UserError(f"input {path} is zstd-compressed and the zstandard package is not installed: pip install "
                            f"zstandard (or decompress it first: zstd -d {path})") from None
        self._context = zstandard.ZstdDecompressor()
        self._error = zstandard.ZstdError
        self._file = open(path, "rb")
        self._frame = self._context.decompressobj()
        self._pending = b""
        self._started = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            compressed = self._file.read(1 << 20)
            if not compressed:
                if self._started and not self._frame.eof:
                    raise EOFError("Compressed file ended before the end-of-stream marker was reached")
                return 0
            while compressed:
                if self._frame.eof:
                    self._frame = self._context.decompressobj()
                self._started = True
                try:
                    self._pending += self._frame.decompress(compressed)
                except self._error as err:
                    raise OSError(f"invalid zstd data: {err}") from None
                compressed = self._frame.unused_data if self._frame.eof else b""
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size

    def close(self) -> None:
        self._file.close()
        super().close()


def _damaged(path: str, err: BaseException) -> UserError:
    if isinstance(err, EOFError):
        return UserError(f"input {path} is truncated: the compressed data ends before its end marker (an interrupted "
                         "download or copy?): download or compress it again")
    return UserError(f"input {path} is damaged: it cannot be decompressed ({first_line(err)}): download or compress "
                     "it again")


def _blocks(path: str, compression: str | None) -> Iterator[bytes]:
    """Decompressed content in blocks of about SCAN_BLOCK bytes that end on a line boundary."""
    try:
        with open_decompressed(path, compression) as handle:
            while True:
                block = handle.read(SCAN_BLOCK)
                if not block:
                    return
                yield block + handle.readline()
    except UserError:
        raise
    except (EOFError, OSError, zlib.error, lzma.LZMAError) as err:
        if compression is None:
            raise UserError(f"cannot read input {path} ({first_line(err)})") from None
        raise _damaged(path, err) from None


def binary_lines(path: str, compression: str | None = None) -> Iterator[bytes]:
    """Lines of a (possibly compressed) file, without their line ends."""
    for block in _blocks(path, compression):
        lines = block.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        for raw in lines:
            yield raw.rstrip(b"\r")


def scan_text_file(path: str, compression: str | None = None) -> FileScan:
    """Count lines, find those that are not valid UTF-8, refuse binary or mostly undecodable data.

    Compressed files are decompressed to the end, so a truncated download is found here,
    before anything is read for real.
    """
    scan = FileScan(path)
    first = True
    for block in _blocks(path, compression):
        if first:
            first = False
            if b"\x00" in block[:HEAD_BYTES]:
                raise UserError(f"input {path} is binary data (it holds NUL bytes), not text: leave it out (if it is "
                                f"UTF-16 text, convert it: iconv -f utf-16 -t utf-8 {path})")
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
    if scan.bad_utf8_count and 2 * scan.bad_utf8_count >= scan.lines:
        raise UserError(f"input {path} is not text: {scan.bad_utf8_count:,} of its {scan.lines:,} lines are not valid "
                        f"UTF-8 (binary data or another encoding): leave it out, or convert it to UTF-8 (e.g. iconv -f "
                        f"latin1 -t utf-8)")
    return scan


def scan_jsonl_file(path: str, compression: str | None, text_column: str) -> FileScan:
    """Check every line of a JSON Lines file: UTF-8, valid JSON, a string ``text_column`` field."""
    scan = FileScan(path)
    for number, raw in enumerate(binary_lines(path, compression), start=1):
        scan.lines += 1
        scan.bytes += len(raw)
        text, bad = decode(raw)
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
        if isinstance(record, dict) and len(scan.fields) < 20:
            scan.fields.extend(k for k in record if k not in scan.fields)
        if not isinstance(record, dict) or not isinstance(record.get(text_column), str):
            scan.no_text_count += 1
        else:
            scan.usable += 1
    return scan


def _note(lines: list[int], number: int) -> None:
    if len(lines) < MAX_REPORTED_LINES:
        lines.append(number)


def decode(raw: bytes) -> tuple[str, bool]:
    """``(text, was_bad)``: strict UTF-8, else with U+FFFD replacement characters."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), True


def report_scans(scans: Sequence[FileScan], text_column: str) -> None:
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
            warn(f"{scan.path}: {scan.no_text_count} JSON line(s) have no string '{text_column}' field; they were "
                 "skipped")


def _numbers(numbers: list[int], total: int) -> str:
    shown = ", ".join(str(n) for n in numbers)
    return shown + (", ..." if total > len(numbers) else "")


def _is_text_type(arrow_type) -> bool:
    import pyarrow as pa

    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type) or (
        hasattr(pa.types, "is_string_view") and pa.types.is_string_view(arrow_type))


def _check_schema(path: str, schema, text_column: str) -> None:
    """The text column exists and holds strings (a UserError listing the columns otherwise)."""
    names = list(schema.names)
    if text_column not in names:
        raise UserError(f"input {path} has no column '{text_column}' (columns: {', '.join(names) or 'none'}): pass "
                        "--text-column NAME with the column that holds the text")
    column_type = schema.field(text_column).type
    if not _is_text_type(column_type):
        text_columns = [f.name for f in schema if _is_text_type(f.type)]
        raise UserError(f"input {path}: column '{text_column}' holds {column_type}, not text: pass --text-column "
                        f"NAME with a text column ({', '.join(text_columns) if text_columns else 'it has none'})")


def _empty_shard(path: str) -> UserError:
    return UserError(f"input {path} holds no rows (an empty shard): leave it out, or download it again if it "
                     "should hold data")


def _check_parquet(item: InputFile, text_column: str) -> FileScan:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(item.path)
        schema = parquet.schema_arrow
        rows = parquet.metadata.num_rows
    except (pa.ArrowInvalid, OSError) as err:
        raise UserError(f"input {item.path} is not a readable parquet file ({first_line(err)}): it is probably "
                        "truncated or damaged; download it again") from None
    if rows == 0:
        raise _empty_shard(item.path)
    _check_schema(item.path, schema, text_column)
    return FileScan(item.path, bytes=os.path.getsize(item.path), usable=rows, rows=rows)


def _check_arrow(item: InputFile, text_column: str) -> FileScan:
    import pyarrow as pa

    try:
        with pa.memory_map(item.path) as source:
            if source.read(6) == ARROW_FILE_MAGIC:
                source.seek(0)
                reader = pa.ipc.open_file(source)
                schema, rows = reader.schema, sum(reader.get_batch(i).num_rows
                                                  for i in range(reader.num_record_batches))
            else:
                source.seek(0)
                reader = pa.ipc.open_stream(source)
                schema, rows = reader.schema, sum(batch.num_rows for batch in reader)
    except (pa.ArrowInvalid, OSError) as err:
        raise UserError(f"input {item.path} is not a readable Arrow file ({first_line(err)}): it is probably truncated "
                        "or damaged; write or download it again") from None
    if rows == 0:
        raise _empty_shard(item.path)
    _check_schema(item.path, schema, text_column)
    return FileScan(item.path, bytes=os.path.getsize(item.path), usable=rows, rows=rows)


def _check_csv_column(item: InputFile, text_column: str, scan: FileScan) -> None:
    import pandas as pd

    try:
        with open_decompressed(item.path, item.compression) as handle:
            sample = pd.read_csv(handle, sep="\t" if item.kind == "tsv" else ",", nrows=CSV_SAMPLE_ROWS,
                                 encoding_errors="replace")
    except pd.errors.EmptyDataError:
        raise _empty_shard(item.path) from None
    except (ValueError, pd.errors.ParserError) as err:
        raise UserError(f"input {item.path} is not a readable {item.kind.upper()} file ({first_line(err)}): fix it, or "
                        "name it .txt if it is plain text") from None
    columns = [str(c) for c in sample.columns]
    if text_column not in columns:
        raise UserError(f"input {item.path} has no column '{text_column}' (columns: {', '.join(columns)}): pass "
                        "--text-column NAME with the column that holds the text")
    if len(sample) == 0:
        raise _empty_shard(item.path)
    dtype = sample[text_column].dtype
    if dtype.kind in "biufc":  # bool, integers, floats, complex: numbers, not text
        text_columns = [c for c in columns if sample[c].dtype.kind not in "biufc"]
        raise UserError(f"input {item.path}: column '{text_column}' holds numbers ({dtype}), not text: pass "
                        f"--text-column NAME with a text column ({', '.join(text_columns) or 'it has none'})")
    scan.usable = max(scan.lines - 1, 0)
    scan.rows = None


# ============================================================================================
# Reading: datasets of documents with one "text" column
# ============================================================================================

@dataclass
class Part:
    """Consecutive inputs read by one loader call: ``dataset`` has a single ``text`` column."""

    dataset: Any
    items: list[InputFile]


def read_parts(items: list[InputFile], scans: dict[str, FileScan], text_column: str, unit: str, cache_dir: Path,
               num_proc: int) -> list[Part]:
    """Every input with rows, read in order, grouped by kind (one loader call per group).

    A row is a line of a text file (``unit="line"``) or a blank-line-separated block
    (``unit="document"``), and a record of any other format. Empty text files are left
    out (``datasets`` builds nothing from a file without rows).
    """
    readable = [i for i in items if i.path not in scans or scans[i.path].usable]
    parts = []
    for kind, group in _consecutive_groups(readable):
        for dataset in _load_group(kind, group, scans, text_column, unit, cache_dir, num_proc):
            parts.append(Part(dataset, group))
    return [part for part in parts if len(part.dataset)]


def _consecutive_groups(items: list[InputFile]) -> Iterator[tuple[str, list[InputFile]]]:
    group: list[InputFile] = []
    for item in items:
        if group and (item.kind != group[0].kind or item.kind == "saved"):
            yield group[0].kind, group
            group = []
        group.append(item)
    if group:
        yield group[0].kind, group


def _load_group(kind: str, group: list[InputFile], scans: dict[str, FileScan], text_column: str, unit: str,
                cache_dir: Path, num_proc: int) -> list:
    import datasets

    paths = [item.path for item in group]
    workers = min(num_proc, len(paths))
    common = {"split": "train", "cache_dir": str(cache_dir / "sources"),
              "num_proc": workers if workers > 1 else None}
    string = datasets.Features({text_column: datasets.Value("string")})
    try:
        if kind == "text":
            if any(item.compression and scans[item.path].bad_utf8_count for item in group):
                return [_load_text_tolerantly(group, unit, cache_dir, num_proc)]
            return [datasets.load_dataset("text", data_files=paths, encoding_errors="replace",
                                          sample_by="paragraph" if unit == "document" else "line", **common)]
        if kind == "jsonl":
            return [_load_jsonl(group, scans, text_column, cache_dir, num_proc, common)]
        if kind in ("csv", "tsv"):
            loaded = datasets.load_dataset("csv", data_files=paths, sep="\t" if kind == "tsv" else ",",
                                           usecols=[text_column], features=string, keep_default_na=False,
                                           encoding_errors="replace", **common)
            return [_as_text(loaded, text_column)]
        if kind == "parquet":
            loaded = datasets.load_dataset("parquet", data_files=paths, columns=[text_column], features=string,
                                           **common)
            return [_as_text(loaded, text_column)]
        if kind == "arrow":
            return [_load_arrow(group, text_column, common)]
        return [load_saved_text(paths[0], text_column)]
    except UserError:
        raise
    except Exception as err:  # the loaders' errors: DatasetGenerationError, ArrowInvalid, pandas errors...
        raise UserError(f"cannot read {names_of(group)} as {KIND_LABELS[kind]}s ({first_line(err)}): check the "
                        "file(s), or convert them to text or parquet") from None


def _load_text_tolerantly(group: list[InputFile], unit: str, cache_dir: Path, num_proc: int):
    """Text files through a generator that replaces bad UTF-8 (``datasets`` ignores ``encoding_errors``
    for compressed files and fails on them)."""
    import datasets

    identity = [input_identity(item) for item in group]
    workers = min(num_proc, len(group))
    return datasets.Dataset.from_generator(
        text_rows, gen_kwargs={"files": [(i.path, i.compression) for i in group], "unit": unit, "identity": identity},
        features=datasets.Features({"text": datasets.Value("string")}), cache_dir=str(cache_dir / "sources"),
        fingerprint=stable_hash(["text", READ_VERSION, unit, identity]), num_proc=workers if workers > 1 else None)


def text_rows(files: list[tuple[str, str | None]], unit: str, identity: list) -> Iterator[dict]:
    """Rows of text files as ``load_dataset("text")`` makes them: lines, or blocks between empty lines."""
    del identity  # only part of the cache key
    for path, compression in files:
        block: list[str] = []
        for raw in binary_lines(path, compression):
            line, _ = decode(raw)
            if unit == "line":
                yield {"text": line}
            elif line:
                block.append(line)
            elif block:
                yield {"text": "\n".join(block)}
                block = []
        if block:
            yield {"text": "\n".join(block)}


def _as_text(dataset, text_column: str):
    dataset = dataset.select_columns([text_column])
    return dataset if text_column == "text" else dataset.rename_column(text_column, "text")


def _load_jsonl(group: list[InputFile], scans: dict[str, FileScan], text_column: str, cache_dir: Path,
                num_proc: int, common: dict):
    """``load_dataset("json")``; if the files do not parse as a table, a tolerant reader that skips bad lines."""
    import datasets

    paths = [item.path for item in group]
    try:
        loaded = datasets.load_dataset("json", data_files=paths, **common)
    except Exception:  # a bad line, bad UTF-8, mixed types: read line by line below
        loaded = None
    if loaded is not None and text_column in loaded.features:
        feature = loaded.features[text_column]
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
            nulls = loaded.data.column(text_column).null_count
            if nulls:
                scans[paths[0]].null_text_count += nulls  # counted once for the group, in the report
                warn(f"{names_of(group)}: {nulls} record(s) have no '{text_column}' value (null or missing); they "
                     "were skipped")
            return _as_text(loaded, text_column)
        if not isinstance(feature, datasets.Json):
            raise UserError(f"input {names_of(group)}: field '{text_column}' holds {feature}, not text: pass "
                            "--text-column NAME with a text field")
    elif loaded is not None:
        raise UserError(f"input {names_of(group)} has no field '{text_column}' (fields: "
                        f"{', '.join(loaded.column_names)}): pass --text-column NAME with the field that holds "
                        "the text")
    # Line by line: count and report bad lines, skip them.
    for item in group:
        scan = scan_jsonl_file(item.path, item.compression, text_column)
        scan.bad_utf8, scan.bad_utf8_count = scans[item.path].bad_utf8, scans[item.path].bad_utf8_count
        scans[item.path] = scan
        if not scan.usable and scan.no_text_count:
            raise UserError(f"input {item.path} has no record with a string '{text_column}' field (fields: "
                            f"{', '.join(scan.fields) or 'none'}): pass --text-column NAME with the field that holds "
                            "the text")
    usable = [item for item in group if scans[item.path].usable]
    identity = [input_identity(item) for item in usable]
    key = stable_hash(["jsonl", READ_VERSION, text_column, identity])
    workers = min(num_proc, len(usable))
    return datasets.Dataset.from_generator(
        jsonl_texts, gen_kwargs={"files": [(i.path, i.compression) for i in usable], "text_column": text_column,
                                 "identity": identity},
        features=datasets.Features({"text": datasets.Value("string")}), cache_dir=str(cache_dir / "sources"),
        fingerprint=key, num_proc=workers if workers > 1 else None)


def jsonl_texts(files: list[tuple[str, str | None]], text_column: str, identity: list) -> Iterator[dict]:
    """Rows ``{"text": ...}`` of JSON Lines files (``datasets`` generator; ``identity`` keys its cache)."""
    del identity  # only part of the cache key
    for path, compression in files:
        for raw in binary_lines(path, compression):
            text, _ = decode(raw)
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get(text_column), str):
                yield {"text": record[text_column]}


def _load_arrow(group: list[InputFile], text_column: str, common: dict):
    """IPC streams (what ``datasets`` writes) memory-mapped in place; IPC files through ``load_dataset``."""
    import datasets

    parts = []
    for item in group:
        with open(item.path, "rb") as handle:
            is_file_format = handle.read(6) == ARROW_FILE_MAGIC
        if is_file_format:
            loaded = datasets.load_dataset("arrow", data_files=[item.path], **common)
        else:
            loaded = datasets.Dataset.from_file(item.path)
        parts.append(_as_text(loaded, text_column))
    return concatenate_text(parts)


def load_saved_text(path: str, text_column: str = "text"):
    """The text column of a dataset saved with ``save_to_disk`` (its train split for a DatasetDict)."""
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
    _check_schema(path, loaded.data.schema, text_column)
    return _as_text(loaded, text_column)


def concatenate_text(parts: list):
    """One dataset from parts whose ``text`` may be string or large_string."""
    import datasets

    if len(parts) == 1:
        return parts[0]
    string = datasets.Value("string")
    parts = [part if part.features["text"] == string else part.cast_column("text", string) for part in parts]
    return datasets.concatenate_datasets(parts)


# ============================================================================================
# Lines of a row
# ============================================================================================

def split_lines(text: str | None) -> list[str]:
    """The lines of a row's text (a text file's row in line mode is already one line)."""
    if not text:
        return [""]
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def is_blank(line: str) -> bool:
    return not line or line.isspace()


def line_hash(line: str) -> int:
    """64-bit hash of a line without its surrounding whitespace (0 only for blank lines)."""
    stripped = line.strip()
    if not stripped:
        return 0
    return xxhash.xxh3_64_intdigest(stripped.encode("utf-8", "surrogatepass")) or 1


def text_hash(text: str) -> int:
    return xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass"))


# ============================================================================================
# Helpers
# ============================================================================================

def stable_hash(value: Any) -> str:
    """sha256 of a JSON rendering: the same on every machine and Python process."""
    import hashlib

    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or of its cause's when it says nothing specific."""
    cause = err
    while cause.__cause__ is not None and (not str(cause).strip() or "error occurred while generating" in str(cause)):
        cause = cause.__cause__
    text = str(cause).strip()
    return (text.splitlines()[0][:160] if text else type(cause).__name__)


def names_of(items: list[InputFile], limit: int = 3) -> str:
    names = ", ".join(item.path for item in items[:limit])
    return names + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _progress(items: list, desc: str) -> Any:
    if len(items) < 20:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=" files")


def human_size(size: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:,.0f} {unit}" if unit == "bytes" else f"{size:,.1f} {unit}"
        size /= 1000
    return f"{size:,.1f} TB"


def describe_inputs(items: list[InputFile], scans: dict[str, FileScan]) -> str:
    """``"2 text files (1 compressed), 1 parquet file (12.3 MB)"`` for the log."""
    parts = []
    for kind, label in KIND_LABELS.items():
        chosen = [item for item in items if item.kind == kind]
        if not chosen:
            continue
        compressed = sum(1 for item in chosen if item.compression)
        size = sum(scans[i.path].bytes for i in chosen if i.path in scans)
        details = [f"{compressed} compressed"] if compressed else []
        if size:
            details.append(human_size(size) + (" of text" if kind in TEXT_KINDS else ""))
        parts.append(f"{len(chosen)} {label}{'s' if len(chosen) > 1 else ''}"
                     + (f" ({', '.join(details)})" if details else ""))
    return ", ".join(parts)

