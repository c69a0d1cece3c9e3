"""Measure ``ds-distil prepare`` at growing input sizes, and project it to Wikipedia + BookCorpus.

Generates synthetic corpora (Zipf-distributed pseudo-words, lines of varied length, a
few longer than the model maximum, documents of 1-30 lines separated by blank lines) as
text files or parquet shards, and a WordPiece tokenizer trained on them, then runs
``python -m ds_distil prepare`` on each size in a fresh process with a fresh cache,
while sampling its whole process tree (the main process and datasets' workers):

    python benchmarks/prepare_scale.py --sizes-mb 1024 2048 --num-proc 2 --workdir /tmp/ds_distil_scale

Reported per size: wall time and its phases (checking the inputs, reading them into
Arrow, tokenising, writing the splits), tokens written, tokens/s, fill ratio, and peaks
over time of
- ``anon``: the summed Pss_Anon of the process tree: private memory (Python objects,
  Arrow buffers being built). PSS splits pages shared by forked workers between them, so
  the sum is what the tree really holds (summing RSS would count the parent's
  copy-on-write pages once per worker);
- ``pss``: the summed Pss, which also counts pages of memory-mapped Arrow files the
  processes have touched: clean page cache, shared and reclaimable;
- ``main rss``: VmRSS of the main process alone (what ``ps`` shows);
- ``page cache``: how much of the job's files (corpus, cache, output) is resident in
  the kernel's page cache (mincore(2) on every file, every few seconds): what the job
  leaves in, or needs from, the shared page cache; clean and reclaimable, not held;
- disk: the output and the tokenisation cache, per input byte.
The machine's load average (``uptime``) is printed before and after: on a shared
machine the rates are lower bounds. ``--project`` extrapolates the largest size to
Wikipedia + BookCorpus (3.3 B words, ~20 GB of text) on one 64-core node and on N nodes
(``--shard I/N`` + ``--merge``); the assumptions are printed with the numbers.
Everything generated is deleted at the end unless ``--keep`` is given.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
SYLLABLES = ("ka ti ro mu se na lo pe ri sa to ve mi ko da ne lu fa ga ho be ze yo wi "
             "an el in or us th st re ch ou er").split()
# The target of the projection: BERT's and DistilBERT's pretraining corpus.
TARGET_WORDS = 3.3e9
TARGET_BYTES = 20e9
BERT_TOKENS_PER_WORD = 1.3  # WordPiece (bert-base-uncased) on English Wikipedia/books: ~1.3 tokens per word


def make_words(count: int, seed: int) -> list[str]:
    """Distinct pseudo-words of 1-4 syllables."""
    rng = np.random.default_rng(seed)
    words: set[str] = set()
    while len(words) < count:
        n = int(rng.integers(1, 5))
        words.add("".join(SYLLABLES[i] for i in rng.integers(len(SYLLABLES), size=n)))
    return sorted(words)


def make_line_pool(words: list[str], lines: int, seed: int) -> list[str]:
    """Lines of Zipf-distributed words; ~2% are long enough to be cut at 512 tokens."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, len(words) + 1)
    probabilities = (1.0 / ranks) / (1.0 / ranks).sum()
    lengths = np.clip(rng.lognormal(3.3, 0.8, size=lines).astype(int), 3, 400)
    long = rng.random(lines) < 0.02
    lengths[long] = rng.integers(500, 900, size=int(long.sum()))
    drawn = np.array(words)[rng.choice(len(words), size=int(lengths.sum()), p=probabilities)]
    pool = []
    for sentence in np.split(drawn, np.cumsum(lengths)[:-1]):
        text = " ".join(sentence)
        pool.append(text[0].upper() + text[1:] + ".")
    return pool


def documents(pool: list[str], size_bytes: int, seed: int):
    """Documents (lists of 1-30 pool lines) until ``size_bytes`` of text; yields (document, words)."""
    rng = np.random.default_rng(seed)
    written = 0
    while written < size_bytes:
        lines = [pool[i] for i in rng.integers(len(pool), size=int(rng.integers(1, 31)))]
        written += sum(len(line) + 1 for line in lines) + 1
        yield lines, sum(line.count(" ") + 1 for line in lines)


def write_corpus(directory: Path, pool: list[str], size_bytes: int, files: int, fmt: str, seed: int) -> dict:
    """``files`` text files (documents separated by blank lines) or parquet shards (one row per document)."""
    directory.mkdir(parents=True, exist_ok=True)
    per_file = size_bytes / files
    stats = {"lines": 0, "words": 0, "documents": 0, "paths": []}
    batch: list[str] = []
    number, written, handle = 0, 0.0, None

    def open_next():
        nonlocal number
        path = directory / (f"part-{number:03d}.txt" if fmt == "text" else f"train-{number:05d}-of-{files:05d}.parquet")
        number += 1
        stats["paths"].append(str(path))
        return path

    def flush_parquet(path: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": batch}), path, row_group_size=10_000)
        batch.clear()

    path = open_next()
    if fmt == "text":
        handle = open(path, "w", encoding="utf-8")
    for lines, words in documents(pool, size_bytes, seed):
        text = "\n".join(lines)
        stats["lines"] += len(lines)
        stats["words"] += words
        stats["documents"] += 1
        written += len(text) + 2
        if fmt == "text":
            handle.write(text + "\n\n")
        else:
            batch.append(text)
        if written >= per_file * number and number < files:
            if fmt == "text":
                handle.close()
                path = open_next()
                handle = open(path, "w", encoding="utf-8")
            else:
                flush_parquet(path)
                path = open_next()
    if fmt == "text":
        handle.close()
    else:
        flush_parquet(path)
    stats["bytes"] = sum(os.path.getsize(p) for p in stats["paths"])
    return stats


def make_tokenizer(directory: Path, pool: list[str]) -> None:
    sys.path.insert(0, str(REPO_ROOT))
    from ds_distil.scratch import train_wordpiece_tokenizer

    train_wordpiece_tokenizer(pool[:20_000], vocab_size=8192, output_dir=directory, model_max_length=512)


# ============================================================================================
# Measuring
# ============================================================================================

class PageCache:
    """Bytes of the files under some directories that are resident in the page cache (mincore)."""

    PROT_READ, MAP_SHARED = 0x1, 0x01

    def __init__(self, roots: list[Path]):
        self.roots = roots
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.libc.mmap.restype = ctypes.c_void_p
        self.libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                   ctypes.c_long]
        self.libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]

    def resident(self) -> int:
        total = 0
        for root in self.roots:
            for directory, _, names in os.walk(root):
                for name in names:
                    total += self._file(os.path.join(directory, name))
        return total

    def _file(self, path: str) -> int:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return 0
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                return 0
            address = self.libc.mmap(None, size, self.PROT_READ, self.MAP_SHARED, fd, 0)
            if address in (None, ctypes.c_void_p(-1).value):
                return 0
            try:
                pages = (size + self.page - 1) // self.page
                vector = (ctypes.c_ubyte * pages)()
                if self.libc.mincore(address, size, vector) != 0:
                    return 0
                return int((np.frombuffer(vector, dtype=np.uint8) & 1).sum()) * self.page
            finally:
                self.libc.munmap(address, size)
        finally:
            os.close(fd)


class TreeMemory:
    """Samples the memory of a process tree and the page cache of its files (see the module docstring)."""

    def __init__(self, pid: int, cache_roots: list[Path], interval: float = 0.2, cache_interval: float = 2.0):
        self.pid = pid
        self.interval = interval
        self.cache_interval = cache_interval
        self.page_cache = PageCache(cache_roots)
        self.peak_anon = self.peak_pss = self.peak_main_rss = self.peak_main_anon = 0  # kB
        self.peak_page_cache = self.last_page_cache = 0  # bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.last_page_cache = self.page_cache.resident()
        self.peak_page_cache = max(self.peak_page_cache, self.last_page_cache)

    def _run(self) -> None:
        next_cache = 0.0
        while not self._stop.is_set():
            anon = pss = 0
            for pid in self._tree():
                fields = _memory_fields(pid)
                anon += fields.get("Pss_Anon", 0)
                pss += fields.get("Pss", 0)
            self.peak_anon = max(self.peak_anon, anon)
            self.peak_pss = max(self.peak_pss, pss)
            main = _memory_fields(self.pid)
            self.peak_main_rss = max(self.peak_main_rss, main.get("Rss", 0))
            self.peak_main_anon = max(self.peak_main_anon, main.get("Pss_Anon", 0))
            if time.monotonic() >= next_cache:
                self.peak_page_cache = max(self.peak_page_cache, self.page_cache.resident())
                next_cache = time.monotonic() + self.cache_interval
            self._stop.wait(self.interval)

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as handle:
                        parent = int(handle.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(parent, []).append(int(entry))
        tree, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo.extend(children.get(pid, []))
        return tree


def _memory_fields(pid: int) -> dict[str, int]:
    """Rss, Pss and Pss_Anon of /proc/PID/smaps_rollup in kB (empty if the process is gone)."""
    fields = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in ("Rss", "Pss", "Pss_Anon"):
                    fields[key] = int(value.split()[0])
    except OSError:
        pass
    return fields


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


# Log lines of `ds-distil prepare` that end each phase.
PHASES = [("start", "tokenizer "), ("check", "inputs:"), ("read", ("tokenising", "reusing the cached")),
          ("tokenise", "fill ratio"), ("write", "wrote ")]


def run_prepare(tokenizer: Path, corpus: list[str], output: Path, cache: Path, num_proc: int, unit: str,
                dedup: bool, watch: list[Path]) -> dict:
    command = [sys.executable, "-m", "ds_distil", "prepare", "--tokenizer", str(tokenizer), "--input", *corpus,
               "--output", str(output), "--cache-dir", str(cache), "--num-proc", str(num_proc), "--unit", unit]
    command += ["--dedup"] if dedup else []
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log, marks = [], {}
    with TreeMemory(process.pid, watch) as memory:
        for line in process.stdout:
            now = time.perf_counter() - started
            log.append(line.rstrip("\n"))
            for phase, needle in PHASES:
                needles = needle if isinstance(needle, tuple) else (needle,)
                if phase not in marks and line.startswith("ds-distil prepare:") and any(n in line for n in needles):
                    marks[phase] = now
        process.wait()
    elapsed = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"prepare failed ({process.returncode}):\n" + "\n".join(log[-40:]))
    meta = json.loads((output / "meta.json").read_text())
    phases, previous = {}, 0.0
    for phase, _ in PHASES:
        end = marks.get(phase, previous)
        phases[phase] = end - previous
        previous = end
    phases["exit"] = elapsed - previous
    return {"seconds": elapsed, "phases": phases, "tokens": meta["num_tokens"], "sequences": meta["num_sequences"],
            "fill_ratio": meta["fill_ratio"],
            "peak_anon_mb": memory.peak_anon / 1024, "peak_pss_mb": memory.peak_pss / 1024,
            "peak_main_rss_mb": memory.peak_main_rss / 1024, "peak_main_anon_mb": memory.peak_main_anon / 1024,
            "peak_page_cache_mb": memory.peak_page_cache / 1e6, "end_page_cache_mb": memory.last_page_cache / 1e6,
            "output_mb": _tree_bytes(output) / 1e6, "cache_mb": _tree_bytes(cache) / 1e6,
            "log": [line for line in log if line.startswith("ds-distil prepare:")]}


def machine_load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} CPUs"


# ============================================================================================
# Projection
# ============================================================================================

def project(result: dict, num_proc: int, cores: int, nodes: list[int]) -> list[str]:
    """Wikipedia + BookCorpus on ``cores``-core nodes, scaled from one measured run (lines of text)."""
    tokens = TARGET_WORDS * BERT_TOKENS_PER_WORD
    scale = tokens / result["tokens"]  # how many times the measured run
    # Tokenising runs in num_proc workers; checking, reading and writing are not scaled with the
    # cores here (reading runs min(num_proc, files) loader processes, the rest one process).
    # Starting (imports, tokenizer) and exiting take the same time at any size.
    serial = result["phases"]["check"] + result["phases"]["read"] + result["phases"]["write"]
    parallel = result["phases"]["tokenise"]
    fixed = result["phases"]["start"] + result["phases"]["exit"]
    one_node = scale * (serial + parallel * num_proc / cores) + fixed
    lines = [
        f"projection to Wikipedia + BookCorpus: {TARGET_WORDS / 1e9:.1f} B words x {BERT_TOKENS_PER_WORD} WordPiece "
        f"tokens/word = {tokens / 1e9:.1f} B tokens, ~{TARGET_BYTES / 1e9:.0f} GB of text "
        f"({scale:,.0f} x the measured run)",
        f"  assumptions: rates of this run ({result['tokens'] / parallel / num_proc:,.0f} tokens/s per tokenising "
        f"process; the other phases {result['text_mb'] / max(serial, 1e-9):,.1f} MB of text/s in one process), "
        f"linear in size, tokenising linear in cores, the rest not; measured under the load printed above, "
        f"so lower bounds on a quiet node",
        f"  one {cores}-core node, --num-proc {cores}: ~{one_node / 3600:.1f} h "
        f"(tokenising {scale * parallel * num_proc / cores / 3600:.1f} h, the single-process phases "
        f"{scale * serial / 3600:.1f} h)",
    ]
    for count in nodes:
        lines.append(f"  {count} nodes, --shard I/{count} (inputs in >= {count} files) then --merge (seconds): "
                     f"~{one_node / count / 3600:.2f} h")
    workers = max(result["peak_anon_mb"] - result["peak_main_anon_mb"], 0) / max(num_proc, 1)
    lines += [
        f"  memory per node: ~{(result['peak_main_anon_mb'] + workers * cores) / 1e3:.1f} GB private "
        f"(main {result['peak_main_anon_mb']:.0f} MB + {cores} workers x {workers:.0f} MB, flat in the input size) "
        "plus reclaimable page cache",
        f"  disk: output ~{result['output_mb'] * scale / 1e3:,.0f} GB, cache ~{result['cache_mb'] * scale / 1e3:,.0f} "
        "GB (--cache-dir on node-local disk; delete it afterwards)",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1024, 2048])
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--files", type=int, default=4, help="input files per size (default 4)")
    parser.add_argument("--format", choices=("text", "parquet"), default="text")
    parser.add_argument("--unit", choices=("line", "document"), default="line")
    parser.add_argument("--dedup", action="store_true")
    parser.add_argument("--project", action="store_true",
                        help="project the largest size to Wikipedia + BookCorpus on a 64-core node")
    parser.add_argument("--cores", type=int, default=64, help="cores per node of the projection (default 64)")
    parser.add_argument("--workdir", default="/tmp/ds_distil_scale")
    parser.add_argument("--keep", action="store_true", help="keep the generated corpora and outputs")
    args = parser.parse_args(argv)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine_load()} (before)", flush=True)
    try:
        words = make_words(30_000, seed=0)
        pool = make_line_pool(words, 100_000, seed=1)
        make_tokenizer(work / "tokenizer", pool)
        results = []
        for size in args.sizes_mb:
            corpus, output, cache = work / f"corpus-{size:g}mb", work / f"out-{size:g}mb", work / f"cache-{size:g}mb"
            stats = write_corpus(corpus, pool, int(size * 1e6), args.files, args.format, seed=int(size))
            subprocess.run(["sync"], check=False)
            result = run_prepare(work / "tokenizer", stats["paths"], output, cache, args.num_proc, args.unit,
                                 args.dedup, [corpus, cache, output])
            result.update(size_mb=size, text_mb=stats["bytes"] / 1e6, lines=stats["lines"], words=stats["words"])
            results.append(result)
            phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in result["phases"].items())
            print(f"{size:>7g} MB {args.format} ({args.files} files, unit {args.unit}): {stats['words']:,} words, "
                  f"{result['tokens']:,} tokens, {result['seconds']:.1f} s ({phases}), "
                  f"{result['tokens'] / result['seconds']:,.0f} tokens/s, fill {result['fill_ratio']:.1%}\n"
                  f"    memory, all processes: peak anon {result['peak_anon_mb']:.0f} MB, peak pss "
                  f"{result['peak_pss_mb']:.0f} MB; main process: peak rss {result['peak_main_rss_mb']:.0f} MB, "
                  f"anon {result['peak_main_anon_mb']:.0f} MB\n"
                  f"    page cache of the job's files: peak {result['peak_page_cache_mb']:.0f} MB, at the end "
                  f"{result['end_page_cache_mb']:.0f} MB; disk: output {result['output_mb']:.0f} MB, cache "
                  f"{result['cache_mb']:.0f} MB", flush=True)
            for line in result["log"]:
                print("    " + line)
            if not args.keep:  # free the disk before the next size
                for path in (corpus, output, cache):
                    shutil.rmtree(path, ignore_errors=True)
        if len(results) >= 2:
            first, last = results[0], results[-1]
            growth = {key: last[key] / first[key] - 1 for key in ("peak_anon_mb", "peak_pss_mb", "peak_main_rss_mb")}
            print(f"from {first['size_mb']:g} MB to {last['size_mb']:g} MB of input: peak anon "
                  f"{growth['peak_anon_mb']:+.1%}, peak pss {growth['peak_pss_mb']:+.1%}, peak main rss "
                  f"{growth['peak_main_rss_mb']:+.1%}")
        print(f"machine: {machine_load()} (after)")
        if args.project:
            for line in project(results[-1], args.num_proc, args.cores, nodes=[4, 16]):
                print(line)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
