"""The collators: dynamic MLM masking for masked LMs, next-token targets for causal LMs.

:func:`make_collator` picks one from the objective the data was prepared for (meta.json).
:class:`CausalCollator` pads and sets each real position's target to the next token
(no masking, nothing random). The rest of this docstring is about MLM masking.

Dynamic MLM masking in the collator: fresh masks every epoch, identical on any rank count.

Each sequence draws its masks from its own generator, seeded by ``(seed, epoch,
sample_index)``. A sample's masks therefore depend on nothing else: not on the batch it
lands in, the rank that processes it, the number of ranks or data-loader workers, nor
the padding. A resumed run and a run on a different number of ranks see exactly the same
masks.

Per sequence, with ``n`` maskable tokens (not special, not padding):

- ``k = floor(p * n) + Bernoulli(frac(p * n))`` targets, so ``E[k] = p * n`` exactly
  (the reference takes ``ceil(p * tokens)`` over a whole batch instead, which ties one
  sample's masks to its neighbours);
- targets are drawn without replacement, uniformly or, with smoothing, with probability
  proportional to ``max(count, 1) ** -smoothing`` (rarer tokens are masked more often);
- each target becomes [MASK] (``mask_fraction``), a random token (``random_fraction``)
  or stays unchanged (``keep_fraction``). Random tokens are never special tokens (the
  reference could draw [CLS], [PAD] or [MASK] there).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

IGNORE_INDEX = -100  # the label of positions without an MLM target (torch's cross-entropy default)


class MaskingCollator:
    """Pads a micro-batch and draws its MLM targets; see the module docstring."""

    def __init__(self, vocab_size: int, special_ids: Iterable[int], mask_id: int, pad_id: int,
                 mlm_probability: float = 0.15, mask_fraction: float = 0.8, random_fraction: float = 0.1,
                 keep_fraction: float = 0.1, token_counts: Sequence[int] | np.ndarray | None = None,
                 smoothing: float | None = 0.7, seed: int = 0, pad_to_multiple_of: int = 8):
        _check_options(vocab_size, mlm_probability, mask_fraction, random_fraction, keep_fraction,
                       smoothing, seed, pad_to_multiple_of)
        self.vocab_size = int(vocab_size)
        self.mask_id = int(mask_id)
        self.pad_id = int(pad_id)
        self.mlm_probability = float(mlm_probability)
        self.mask_fraction = float(mask_fraction)
        self.random_fraction = float(random_fraction)
        self.keep_fraction = float(keep_fraction)
        self.seed = int(seed)
        self.pad_to_multiple_of = int(pad_to_multiple_of)
        # A lookup table: is this id special? (mask and pad are special whatever the caller says)
        self.is_special = np.zeros(self.vocab_size, dtype=bool)
        ids = np.asarray([*special_ids, self.mask_id, self.pad_id], dtype=np.int64)
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"special token ids {sorted(set(ids.tolist()))} must lie in 0..{self.vocab_size - 1}")
        self.is_special[ids] = True
        self.random_pool = np.flatnonzero(~self.is_special)
        if len(self.random_pool) == 0:
            raise ValueError("the vocabulary has no non-special token to draw random replacements from")
        self.smoothing = float(smoothing or 0.0)
        self.weights = None
        if self.smoothing and token_counts is not None:
            counts = np.asarray(token_counts, dtype=np.float64)
            if counts.shape != (self.vocab_size,):
                raise ValueError(f"token_counts has shape {counts.shape}, expected ({self.vocab_size},)")
            self.weights = np.maximum(counts, 1.0) ** -self.smoothing

    @classmethod
    def from_prepared(cls, prepared, tokenizer=None, **options: Any) -> "MaskingCollator":
        """A collator for data made by ``ds-distil prepare`` (ids and counts from its meta).

        ``prepared`` is a :class:`ds_distil.data.PreparedData`. With ``tokenizer`` given, it is
        first checked against the one the data was prepared with. ``options`` are the keyword
        arguments of the constructor (``mlm_probability``, ``smoothing``, ``seed``...).
        """
        from ds_distil.data import check_tokenizer_matches

        meta = prepared.meta
        if tokenizer is not None:
            check_tokenizer_matches(meta, tokenizer, prepared.path)
        tok = meta["tokenizer"]
        if tok.get("mask_token_id") is None:
            raise ValueError(f"{prepared.path} was prepared for a causal LM (no mask token): use CausalCollator")
        return cls(vocab_size=tok["vocab_size"], special_ids=tok["all_special_ids"], mask_id=tok["mask_token_id"],
                   pad_id=tok["pad_token_id"], token_counts=prepared.token_counts, **options)

    # ---- one sequence ---------------------------------------------------------------------

    def mask_sequence(self, ids: np.ndarray, sample_index: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(corrupted_ids, target_positions)`` for one unpadded sequence.

        The draws come, in a fixed order, from a generator seeded by ``(seed, epoch,
        sample_index)`` alone.
        """
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch, sample_index])))
        candidates = np.flatnonzero(~self.is_special[ids])
        expected = self.mlm_probability * len(candidates)
        k = int(expected) + int(rng.random() < expected - int(expected))
        # Without replacement, weight w: keep the k smallest Exp(1)/w (Efraimidis-Spirakis).
        keys = rng.standard_exponential(len(candidates))
        if self.weights is not None:
            keys /= self.weights[ids[candidates]]
        if 0 < k < len(candidates):
            chosen = np.sort(candidates[np.argpartition(keys, k - 1)[:k]])
        else:
            chosen = candidates[:k]  # k == 0 or every candidate
        action = rng.random(k)
        random_ids = self.random_pool[rng.integers(len(self.random_pool), size=k)]
        corrupted = np.array(ids, dtype=np.int64, copy=True)
        to_mask = action < self.mask_fraction
        to_random = ~to_mask & (action < self.mask_fraction + self.random_fraction)
        corrupted[chosen[to_mask]] = self.mask_id
        corrupted[chosen[to_random]] = random_ids[to_random]
        return corrupted, chosen

    # ---- a micro-batch --------------------------------------------------------------------

    def __call__(self, examples: Sequence[dict], sample_indices: Sequence[int], epoch: int) -> dict:
        """Pad ``examples`` (dicts with ``input_ids``) and draw their targets for ``epoch``.

        Returns LongTensors ``input_ids`` (corrupted), ``attention_mask``, ``labels`` (the
        original id at targets, -100 elsewhere), ``target_mask`` (bool, where a target is),
        ``target_positions`` (flat indices into ``input_ids.view(-1)``, ascending: gather the
        hidden states there to project onto the vocabulary only where needed, with no
        host sync), ``sample_indices``; and python ints ``num_tokens`` (real tokens) and
        ``num_targets``.
        """
        sequences, input_ids, attention, labels = padded_arrays(examples, sample_indices, self.pad_id,
                                                                self.pad_to_multiple_of)
        target_mask = np.zeros(input_ids.shape, dtype=bool)
        for row, (ids, index) in enumerate(zip(sequences, sample_indices)):
            corrupted, chosen = self.mask_sequence(ids, int(index), int(epoch))
            input_ids[row, :len(ids)] = corrupted
            attention[row, :len(ids)] = 1
            labels[row, chosen] = ids[chosen]
            target_mask[row, chosen] = True
        return batch_tensors(input_ids, attention, labels, target_mask, sample_indices, sequences)


class CausalCollator:
    """Pads a micro-batch; the target of each real position is the next token (causal LM).

    ``labels[b, i] = input_ids[b, i + 1]`` where position ``i + 1`` is real, -100 elsewhere
    (the last real token has no next token, padding has none): the student's hidden
    state at ``i`` is scored against ``labels[b, i]``, so the loss code needs no shift.
    The output has the keys of :class:`MaskingCollator` (``target_*`` are the positions
    with a next token); ``input_ids`` are never changed. Nothing is drawn at random, so
    ``seed`` and ``epoch`` only keep the interface.
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 8, seed: int = 0):
        if pad_to_multiple_of < 1:
            raise ValueError("pad_to_multiple_of must be >= 1")
        self.pad_id = int(pad_id)
        self.pad_to_multiple_of = int(pad_to_multiple_of)
        self.seed = int(seed)

    @classmethod
    def from_prepared(cls, prepared, tokenizer=None, seed: int = 0, **_masking: Any) -> "CausalCollator":
        """A collator for causal-LM data made by ``ds-distil prepare`` (masking options do not apply)."""
        from ds_distil.data import check_tokenizer_matches

        if tokenizer is not None:
            check_tokenizer_matches(prepared.meta, tokenizer, prepared.path)
        return cls(pad_id=prepared.meta["tokenizer"]["pad_token_id"], seed=seed)

    def __call__(self, examples: Sequence[dict], sample_indices: Sequence[int], epoch: int) -> dict:
        sequences, input_ids, attention, labels = padded_arrays(examples, sample_indices, self.pad_id,
                                                                self.pad_to_multiple_of)
        for row, ids in enumerate(sequences):
            input_ids[row, :len(ids)] = ids
            attention[row, :len(ids)] = 1
            labels[row, :len(ids) - 1] = ids[1:]
        target_mask = labels != IGNORE_INDEX
        return batch_tensors(input_ids, attention, labels, target_mask, sample_indices, sequences)


def padded_arrays(examples, sample_indices, pad_id: int, pad_to_multiple_of: int):
    """``(sequences, input_ids, attention, labels)``: the examples' token ids, padded to the
    longest rounded up to ``pad_to_multiple_of``, their attention mask and labels that are
    all -100 for the collator to fill in."""
    if len(examples) != len(sample_indices):
        raise ValueError(f"{len(examples)} examples but {len(sample_indices)} sample indices")
    sequences = [np.asarray(example["input_ids"], dtype=np.int64) for example in examples]
    longest = max((len(s) for s in sequences), default=0)
    width = max(1, -(-longest // pad_to_multiple_of)) * pad_to_multiple_of
    shape = (len(sequences), width)
    return (sequences, np.full(shape, pad_id, dtype=np.int64), np.zeros(shape, dtype=np.int64),
            np.full(shape, IGNORE_INDEX, dtype=np.int64))


def batch_tensors(input_ids, attention, labels, target_mask, sample_indices, sequences) -> dict:
    """The micro-batch both collators hand to the step: padded arrays as tensors, the flat
    indices of the positions that carry a target (the fused head projects only those),
    and the real-token and target counts the global loss normalisation sums."""
    import torch

    positions = np.flatnonzero(target_mask.reshape(-1))
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention),
        "labels": torch.from_numpy(labels),
        "target_mask": torch.from_numpy(target_mask),
        "target_positions": torch.from_numpy(positions.astype(np.int64)),
        "sample_indices": torch.as_tensor(np.asarray(sample_indices, dtype=np.int64)),
        "num_tokens": int(sum(len(s) for s in sequences)),
        "num_targets": int(len(positions)),
    }


def objective_of(meta: dict) -> str:
    """The objective prepared data is for (data prepared before decoders existed: masked)."""
    return (meta.get("tokenizer") or {}).get("objective", "masked")


def make_collator(prepared, tokenizer=None, seed: int = 0, **masking: Any):
    """The collator for ``prepared`` data: MLM masking, or next-token targets for causal LMs."""
    if objective_of(prepared.meta) == "causal":
        return CausalCollator.from_prepared(prepared, tokenizer, seed=seed)
    return MaskingCollator.from_prepared(prepared, tokenizer, seed=seed, **masking)


def _check_options(vocab_size: int, mlm_probability: float, mask_fraction: float, random_fraction: float,
                   keep_fraction: float, smoothing: float | None, seed: int, pad_to_multiple_of: int) -> None:
    """Raise ValueError naming the bad option (the config layer turns these into UserErrors)."""
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    if not 0.0 < mlm_probability <= 1.0:
        raise ValueError(f"mlm_probability must be in (0, 1], got {mlm_probability}")
    fractions = (mask_fraction, random_fraction, keep_fraction)
    if min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"mask/random/keep fractions must be >= 0 and sum to 1, got {fractions}")
    if smoothing is not None and smoothing < 0:
        raise ValueError(f"smoothing must be >= 0 (0 or None disables it), got {smoothing}")
    if seed < 0 or pad_to_multiple_of < 1:
        raise ValueError("seed must be >= 0 and pad_to_multiple_of >= 1")
