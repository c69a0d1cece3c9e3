"""Length-grouped global batches, the same whatever the number of ranks.

One optimizer step consumes one *global batch* of ``global_batch_size`` sequences, split
into ``global_batch_size / micro_batch_size`` micro-batches that the ranks share:
``accumulation_steps = global / (micro * world)`` micro-batches per rank per step.

How an epoch is laid out (a pure function of ``seed``, ``epoch``, the lengths and the
global batch size, never of the world size, the micro-batch size or the rank, so that
1 rank x micro 2B and 2 ranks x micro B train on the same global batches):

1. Permute all sequence indices with a generator seeded by ``(seed, epoch)``.
2. The last ``N % global_batch_size`` indices of that permutation are left out of this
   epoch (a different random handful each epoch, so no sequence is always skipped; taking
   them before the length grouping avoids always dropping the longest sequences).
3. Sort the rest by length bin (``ceil(length / bin_size)``), keeping the random order
   inside a bin, and cut the result into global batches: each holds sequences of nearly
   equal length, so every micro-batch of a step pads little and all ranks do about the
   same work at every accumulation slot.
4. Shuffle the order of the global batches.
5. Inside a global batch, sort by length (ties by index) and cut into micro-batches of
   ``micro_batch_size``. Micro-batch ``j`` goes to rank ``j % world_size`` as its
   accumulation slot ``j // world_size``: every rank gets length-contiguous micro-batches,
   and at each accumulation slot all ranks work on sequences of similar length, so no rank
   idles at the gradient all-reduce while another pads out a long batch.

Consequences the trainer relies on: ranks get disjoint micro-batches, every rank runs
``steps_per_epoch`` steps, and a run resumed at ``(epoch, step)`` (on any number of ranks)
sees exactly the global batches of the uninterrupted run.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from ds_distil.errors import UserError


class GlobalBatchSampler:
    """Deterministic, world-size-independent, length-grouped batches for one rank."""

    def __init__(self, lengths: Sequence[int] | np.ndarray, global_batch_size: int, micro_batch_size: int,
                 world_size: int = 1, rank: int = 0, seed: int = 0, bin_size: int = 4):
        self.lengths = np.asarray(lengths)
        if self.lengths.ndim != 1 or not np.issubdtype(self.lengths.dtype, np.integer):
            raise ValueError("lengths must be a 1-D array of integers")
        _check_batch_arithmetic(global_batch_size, micro_batch_size, world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        if bin_size < 1 or seed < 0:
            raise ValueError("bin_size must be >= 1 and seed >= 0")
        self.global_batch_size = int(global_batch_size)
        self.micro_batch_size = int(micro_batch_size)
        self.world_size = int(world_size)
        self.rank = int(rank)
        self.seed = int(seed)
        self.bin_size = int(bin_size)
        self.num_samples = len(self.lengths)
        self.micro_batches_per_step = self.global_batch_size // self.micro_batch_size
        self.accumulation_steps = self.micro_batches_per_step // self.world_size
        self.steps_per_epoch = self.num_samples // self.global_batch_size
        self.dropped_per_epoch = self.num_samples - self.steps_per_epoch * self.global_batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"the training data has {self.num_samples} sequences, fewer than one global batch of "
                            f"{self.global_batch_size}: lower the global batch size or prepare more data")
        # Indices fit int32 for any realistic corpus; half the memory of int64 per epoch.
        self._index_dtype = np.int32 if self.num_samples < 2**31 else np.int64
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    # ---- the global layout (identical on every rank) -------------------------------------

    def epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(batches, dropped)`` for ``epoch``.

        ``batches`` has shape ``(steps_per_epoch, global_batch_size)``: row ``s`` is the global
        batch of step ``s``, sorted by length. ``dropped`` holds the indices left out of this
        epoch (``N % global_batch_size`` of them, drawn at random each epoch).
        """
        if epoch < 0:
            raise ValueError("epoch must be >= 0")
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1], self._epoch_cache[2]
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
        perm = rng.permutation(self.num_samples).astype(self._index_dtype)
        n_kept = self.steps_per_epoch * self.global_batch_size
        kept, dropped = perm[:n_kept], np.sort(perm[n_kept:])
        bins = (self.lengths[kept] + self.bin_size - 1) // self.bin_size
        grouped = kept[np.argsort(bins, kind="stable")]  # stable: random order inside a bin
        batches = grouped.reshape(self.steps_per_epoch, self.global_batch_size)
        batches = batches[rng.permutation(self.steps_per_epoch)]
        # Sort each global batch by (length, index) so the micro-batch cut is deterministic.
        order = np.lexsort((batches, self.lengths[batches]), axis=-1)
        batches = np.take_along_axis(batches, order, axis=-1)
        self._epoch_cache = (epoch, batches, dropped)
        return batches, dropped

    def global_batch(self, epoch: int, step: int) -> np.ndarray:
        """All sample indices of step ``step`` of ``epoch``, sorted by length."""
        self._check_step(step)
        return self.epoch_layout(epoch)[0][step]

    def dropped(self, epoch: int) -> np.ndarray:
        """The sample indices that ``epoch`` leaves out (the last partial global batch)."""
        return self.epoch_layout(epoch)[1]

    # ---- this rank's share -----------------------------------------------------------------

    def step_batches(self, epoch: int, step: int) -> list[list[int]]:
        """This rank's ``accumulation_steps`` micro-batches of ``step`` (global sample indices)."""
        micro = self.global_batch(epoch, step).reshape(self.micro_batches_per_step, self.micro_batch_size)
        return micro[self.rank::self.world_size].tolist()

    def epoch_micro_batches(self, epoch: int, start_step: int = 0) -> np.ndarray:
        """This rank's micro-batches from ``start_step`` to the epoch's end, in step order.

        Shape ``((steps_per_epoch - start_step) * accumulation_steps, micro_batch_size)``:
        rows ``a * s .. a * s + a - 1`` are the ``a = accumulation_steps`` micro-batches of
        step ``start_step + s``.
        """
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} is outside 0..{self.steps_per_epoch}")
        batches = self.epoch_layout(epoch)[0][start_step:]
        micro = batches.reshape(len(batches), self.micro_batches_per_step, self.micro_batch_size)
        return micro[:, self.rank::self.world_size, :].reshape(-1, self.micro_batch_size)

    def iter_epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[int, list[list[int]]]]:
        """Yield ``(step, micro_batches)`` for this rank from ``start_step`` to the epoch's end."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} is outside 0..{self.steps_per_epoch}")
        for step in range(start_step, self.steps_per_epoch):
            yield step, self.step_batches(epoch, step)

    def position(self, global_step: int) -> tuple[int, int]:
        """``(epoch, step)`` where a run that has completed ``global_step`` steps continues."""
        return divmod(int(global_step), self.steps_per_epoch)

    # ---- reporting ------------------------------------------------------------------------

    def padding_fraction(self, epoch: int = 0, pad_to_multiple_of: int = 8) -> float:
        """Share of the token slots of all micro-batches of ``epoch`` (all ranks) that are padding.

        Each micro-batch is padded to its longest sequence rounded up to ``pad_to_multiple_of``,
        as the masking collator does.
        """
        batches, _ = self.epoch_layout(epoch)
        lengths = self.lengths[batches].reshape(-1, self.micro_batch_size).astype(np.int64)
        longest = lengths.max(axis=1)
        padded_to = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
        slots = int(padded_to.sum()) * self.micro_batch_size
        return 1.0 - float(lengths.sum()) / slots if slots else 0.0

    def describe(self) -> str:
        """One line of batch arithmetic for the start-of-run log."""
        return (f"{self.num_samples} sequences, global batch {self.global_batch_size} = micro "
                f"{self.micro_batch_size} x accumulation {self.accumulation_steps} x world {self.world_size}, "
                f"{self.steps_per_epoch} steps/epoch, {self.dropped_per_epoch} sequences (a random "
                f"{self.dropped_per_epoch} each epoch) left out per epoch")

    def _check_step(self, step: int) -> None:
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} is outside 0..{self.steps_per_epoch - 1}")


def _check_batch_arithmetic(global_batch_size: int, micro_batch_size: int, world_size: int) -> None:
    """``global = micro * accumulation * world`` with a whole, positive accumulation."""
    if min(global_batch_size, micro_batch_size, world_size) < 1:
        raise UserError(f"batch sizes and world size must be positive (global {global_batch_size}, "
                        f"micro {micro_batch_size}, world {world_size})")
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step:
        raise UserError(f"global batch size {global_batch_size} is not a multiple of micro batch size "
                        f"{micro_batch_size} x world size {world_size} = {per_step}: choose a global batch "
                        f"size that is (e.g. {max(1, round(global_batch_size / per_step)) * per_step})")
