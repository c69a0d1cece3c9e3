"""Measure ``ds-distil prepare`` at growing input sizes: throughput and peak memory.

Generates synthetic corpora (Zipf-distributed pseudo-words, lines of varied length, a
few longer than the model maximum) and a WordPiece tokenizer trained on them, then runs
``python -m ds_distil prepare`` on each size in a fresh process with a fresh cache, while
sampling the memory of its whole process tree (the main process and datasets' workers).

    python benchmarks/prepare_scale.py --sizes-mb 1024 2048 --num-proc 2 --workdir /tmp/ds_distil_scale

Reported per size: wall time, tokens written, tokens/s, and peaks over time of
- ``anon``: the summed Pss_Anon of the process tree: private memory (Python objects,
  Arrow buffers being built). PSS splits pages shared by forked workers between them, so
  the sum is what the tree really holds (summing RSS would count the parent's
  copy-on-write pages once per worker);
- ``pss``: the summed Pss, which also counts pages of memory-mapped Arrow files the
  processes have touched. Those are clean page cache, shared with every other reader and
  reclaimable, so they grow with the data without being memory the job holds;
- ``main rss``: VmRSS of the main process alone (what ``ps`` shows), mapped pages included;
  ``main anon`` its private part.
Everything generated is deleted at the end unless ``--keep`` is given.
"""

from __future__ import annotations

import argparse
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


def write_corpus(path: Path, pool: list[str], size_bytes: int, seed: int) -> int:
    """Write random pool lines until ``size_bytes``; returns the number of lines."""
    rng = np.random.default_rng(seed)
    encoded = [(line + "\n").encode() for line in pool]
    written = lines = 0
    with open(path, "wb") as handle:
        while written < size_bytes:
            chunk = b"".join(encoded[i] for i in rng.integers(len(encoded), size=10_000))
            handle.write(chunk)
            written += len(chunk)
            lines += 10_000
    return lines


def make_tokenizer(directory: Path, pool: list[str]) -> None:
    sys.path.insert(0, str(REPO_ROOT))
    from ds_distil.scratch import train_wordpiece_tokenizer

    train_wordpiece_tokenizer(pool[:20_000], vocab_size=8192, output_dir=directory, model_max_length=512)


class TreeMemory:
    """Samples the memory of a process and its descendants (see the module docstring)."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid = pid
        self.interval = interval
        self.peak_anon = self.peak_pss = self.peak_main_rss = self.peak_main_anon = 0  # kB
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
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


def run_prepare(tokenizer: Path, corpus: Path, output: Path, cache: Path, num_proc: int) -> dict:
    command = [sys.executable, "-m", "ds_distil", "prepare", "--tokenizer", str(tokenizer), "--input", str(corpus),
               "--output", str(output), "--cache-dir", str(cache), "--num-proc", str(num_proc)]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with TreeMemory(process.pid) as memory:
        log = process.communicate()[0]
    elapsed = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"prepare failed ({process.returncode}):\n{log[-3000:]}")
    meta = json.loads((output / "meta.json").read_text())
    return {"seconds": elapsed, "tokens": meta["num_tokens"], "sequences": meta["num_sequences"],
            "peak_anon_mb": memory.peak_anon / 1024, "peak_pss_mb": memory.peak_pss / 1024,
            "peak_main_rss_mb": memory.peak_main_rss / 1024, "peak_main_anon_mb": memory.peak_main_anon / 1024,
            "log": [line for line in log.splitlines() if line.startswith("ds-distil prepare:")]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[1024, 2048])
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--workdir", default="/tmp/ds_distil_scale")
    parser.add_argument("--keep", action="store_true", help="keep the generated corpora and outputs")
    args = parser.parse_args(argv)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        words = make_words(30_000, seed=0)
        pool = make_line_pool(words, 100_000, seed=1)
        make_tokenizer(work / "tokenizer", pool)
        results = []
        for size in args.sizes_mb:
            corpus = work / f"corpus-{size:g}mb.txt"
            lines = write_corpus(corpus, pool, int(size * 1e6), seed=int(size))
            result = run_prepare(work / "tokenizer", corpus, work / f"out-{size:g}mb", work / f"cache-{size:g}mb",
                                 args.num_proc)
            result.update(size_mb=size, lines=lines)
            results.append(result)
            print(f"{size:>7g} MB  {lines:>10,} lines  {result['tokens']:>13,} tokens  {result['seconds']:7.1f} s  "
                  f"{result['tokens'] / result['seconds']:>10,.0f} tokens/s  peak anon {result['peak_anon_mb']:6.0f} MB  "
                  f"peak pss {result['peak_pss_mb']:6.0f} MB  peak main rss {result['peak_main_rss_mb']:6.0f} MB  "
                  f"(main anon {result['peak_main_anon_mb']:4.0f} MB)",
                  flush=True)
            for line in result["log"]:
                print("    " + line)
            # Free the disk before the next size.
            for path in (corpus, work / f"out-{size:g}mb", work / f"cache-{size:g}mb"):
                if not args.keep:
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        if len(results) >= 2:
            first, last = results[0], results[-1]
            growth = {key: last[key] / first[key] - 1 for key in ("peak_anon_mb", "peak_pss_mb", "peak_main_rss_mb")}
            print(f"from {first['size_mb']:g} MB to {last['size_mb']:g} MB of input: peak anon "
                  f"{growth['peak_anon_mb']:+.1%}, peak pss {growth['peak_pss_mb']:+.1%}, peak main rss "
                  f"{growth['peak_main_rss_mb']:+.1%}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
