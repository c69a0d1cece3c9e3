"""MaskingCollator: proportions, special tokens, smoothing, determinism, output shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ds_distil.masking import IGNORE_INDEX, MaskingCollator

VOCAB = 200
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIALS = [PAD, UNK, CLS, SEP, MASK]


def make_examples(n: int, seed: int = 0, min_len: int = 10, max_len: int = 120) -> list[dict]:
    """[CLS] ... [SEP] sequences of ordinary tokens, with a few [UNK] inside."""
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        body = rng.integers(5, VOCAB, size=rng.integers(min_len, max_len))
        body[rng.random(len(body)) < 0.03] = UNK
        examples.append({"input_ids": np.concatenate([[CLS], body, [SEP]])})
    return examples


def collate_all(collator, examples, epoch=0, batch=32):
    out = []
    for start in range(0, len(examples), batch):
        part = examples[start:start + batch]
        out.append((part, collator(part, list(range(start, start + len(part))), epoch)))
    return out


def classify(batches):
    """Counts of maskable tokens, targets, and what each target became."""
    counts = dict(maskable=0, targets=0, masked=0, random=0, kept=0)
    random_ids = []
    for part, out in batches:
        width = out["input_ids"].shape[1]
        for row, example in enumerate(part):
            ids = np.asarray(example["input_ids"])
            padded = np.full(width, PAD)
            padded[:len(ids)] = ids
            target = out["labels"][row].numpy() != IGNORE_INDEX
            corrupted = out["input_ids"][row].numpy()
            counts["maskable"] += int(np.isin(ids, SPECIALS, invert=True).sum())
            counts["targets"] += int(target.sum())
            counts["masked"] += int((target & (corrupted == MASK)).sum())
            changed = target & (corrupted != MASK) & (corrupted != padded)
            counts["random"] += int(changed.sum())
            counts["kept"] += int((target & (corrupted == padded)).sum())
            random_ids.extend(corrupted[changed].tolist())
    return counts, random_ids


def test_proportions_over_many_batches():
    collator = MaskingCollator(VOCAB, SPECIALS, MASK, PAD, smoothing=None, seed=3)
    counts, random_ids = classify(collate_all(collator, make_examples(2000)))
    assert counts["maskable"] > 100_000
    assert counts["targets"] / counts["maskable"] == pytest.approx(0.15, abs=0.002)
    # Binomial std of each share is ~0.003 for ~17k targets; 0.012 is 4 sigma.
    assert counts["masked"] / counts["targets"] == pytest.approx(0.8, abs=0.012)
    # A random draw equal to the original token counts as "kept": 1 in 195, negligible here.
    assert counts["random"] / counts["targets"] == pytest.approx(0.1, abs=0.01)
    assert counts["kept"] / counts["targets"] == pytest.approx(0.1, abs=0.01)
    assert counts["masked"] + counts["random"] + counts["kept"] == counts["targets"]
    # Random replacements cover the ordinary vocabulary and never draw a special token.
    assert not set(random_ids) & set(SPECIALS)
    assert len(set(random_ids)) > 0.9 * (VOCAB - len(SPECIALS))


def test_configurable_proportions():
    collator = MaskingCollator(VOCAB, SPECIALS, MASK, PAD, mlm_probability=0.4, mask_fraction=0.5,
                               random_fraction=0.5, keep_fraction=0.0, smoothing=None, seed=1)
    counts, _ = classify(collate_all(collator, make_examples(600)))
    assert counts["targets"] / counts["maskable"] == pytest.approx(0.4, abs=0.005)
    assert counts["masked"] / counts["targets"] == pytest.approx(0.5, abs=0.02)
    assert counts["kept"] / counts["targets"] < 0.01  # only random draws equal to the original


def test_per_sequence_target_count_is_unbiased_floor_or_ceil():
    collator = MaskingCollator(VOCAB, SPECIALS, MASK, PAD, smoothing=None)
    ids = np.concatenate([[CLS], np.arange(10, 33), [SEP]])  # 23 maskable: 0.15 * 23 = 3.45
    sizes = [len(collator.mask_sequence(ids, index, 0)[1]) for index in range(4000)]
    assert set(sizes) == {3, 4}
    assert np.mean(sizes) == pytest.approx(3.45, abs=0.03)


def test_special_tokens_and_padding_are_never_targets():
    collator = MaskingCollator(VOCAB, SPECIALS, MASK, PAD, mlm_probability=0.9, smoothing=None)
    examples = make_examples(300, seed=5)
    for part, out in collate_all(collator, examples):
        for row, example in enumerate(part):
            ids = np.asarray(example["input_ids"])
            targets = np.flatnonzero(out["labels"][row].numpy() != IGNORE_INDEX)
            assert targets.max() < len(ids)  # never padding
            assert not np.isin(ids[targets], SPECIALS).any()  # never [CLS]/[SEP]/[UNK]
            # Special tokens stay where they were.
            corrupted = out["input_ids"][row].numpy()[:len(ids)]
            special = np.isin(ids, SPECIALS)
            assert np.array_equal(corrupted[special], ids[special])
    # A sequence with nothing maskable gets no target.
    only_special = {"input_ids": np.array([CLS, UNK, UNK, SEP])}
    out = collator([only_special], [0], 0)
    assert out["num_targets"] == 0 and (out["labels"] == IGNORE_INDEX).all()


def test_smoothing_selects_rare_tokens_more_often():
    frequent, rare = 10, 11
    counts = np.full(VOCAB, 1000)
    counts[frequent], counts[rare] = 100_000, 10
    rng = np.random.default_rng(2)
    examples = []
    for _ in range(1500):
        body = rng.integers(20, VOCAB, size=40)
        body[:5], body[5:10] = frequent, rare
        examples.append({"input_ids": np.concatenate([[CLS], rng.permutation(body), [SEP]])})

    def rates(smoothing):
        collator = MaskingCollator(VOCAB, SPECIALS, MASK, PAD, token_counts=counts, smoothing=smoothing, seed=4)
        hits = {frequent: 0, rare: 0}
        for part, out in collate_all(collator, examples):
            labels = out["labels"].numpy()
            for token in hits:
                hits[token] += int((labels == token).sum())
        return hits[rare] / (5 * len(examples)), hits[frequent] / (5 * len(examples))

    rare_rate, frequent_rate = rates(0.7)
    # Weights (10 / 100000)^-0.7: the rare token is picked far more often, the frequent one rarely.
    assert rare_rate > 0.5 and frequent_rate < 0.01 and rare_rate > 20 * frequent_rate
    plain_rare, plain_frequent = rates(None)
    assert plain_rare == pytest.approx(0.15, abs=0.02) and plain_frequent == pytest.approx(0.15, abs=0.02)
    # The total stays at 15% with smoothing: only which tokens are chosen changes.
    collator = MaskingCollator(VOCAB, SPECIALS, MASK, PAD, token_counts=counts, smoothing=0.7, seed=4)
    counts_smoothed, _ = classify(collate_all(collator, examples))
    assert counts_smoothed["targets"] / counts_smoothed["maskable"] == pytest.approx(0.15, abs=0.003)


def test_masks_depend_only_on_seed_epoch_and_sample_index():
    collator = MaskingCollator(VOCAB, SPECIALS, MASK, PAD, seed=9, token_counts=np.arange(VOCAB))
    examples = make_examples(12, seed=1)
    indices = list(range(100, 112))
    whole = collator(examples, indices, epoch=2)
    # The same global batch split over 3 "ranks", in another order and another padding width.
    for part in ([0, 5, 7, 11], [3, 1], [2, 4, 6, 8, 9, 10]):
        split = collator([examples[i] for i in part], [indices[i] for i in part], epoch=2)
        for row, i in enumerate(part):
            n = len(examples[i]["input_ids"])
            assert torch.equal(split["input_ids"][row, :n], whole["input_ids"][i, :n])
            assert torch.equal(split["labels"][row, :n], whole["labels"][i, :n])
    again = MaskingCollator(VOCAB, SPECIALS, MASK, PAD, seed=9, token_counts=np.arange(VOCAB))(examples, indices, 2)
    assert torch.equal(again["input_ids"], whole["input_ids"])
    next_epoch = collator(examples, indices, epoch=3)
    other_seed = MaskingCollator(VOCAB, SPECIALS, MASK, PAD, seed=10, token_counts=np.arange(VOCAB))(examples, indices, 2)
    assert not torch.equal(next_epoch["labels"], whole["labels"])
    assert not torch.equal(other_seed["labels"], whole["labels"])


def test_output_form():
    collator = MaskingCollator(VOCAB, SPECIALS, MASK, PAD)
    examples = [{"input_ids": [CLS] + list(range(10, 27)) + [SEP]}, {"input_ids": np.array([CLS, 50, 51, SEP])}]
    out = collator(examples, [0, 1], 0)
    assert out["input_ids"].shape == (2, 24)  # longest 19, padded to a multiple of 8
    for key in ("input_ids", "attention_mask", "labels", "target_positions", "sample_indices"):
        assert out[key].dtype == torch.int64, key
    assert out["target_mask"].dtype == torch.bool
    assert out["attention_mask"].sum(dim=1).tolist() == [19, 4]
    assert (out["input_ids"][1, 4:] == PAD).all() and (out["labels"][1, 4:] == IGNORE_INDEX).all()
    assert torch.equal(out["target_mask"], out["labels"] != IGNORE_INDEX)
    flat = torch.nonzero(out["target_mask"].view(-1)).view(-1)
    assert torch.equal(out["target_positions"], flat)
    assert out["num_tokens"] == 23 and out["num_targets"] == len(flat) > 0
    assert out["sample_indices"].tolist() == [0, 1]
    # Targets keep the original ids in labels.
    original = torch.full_like(out["labels"], PAD)
    original[0, :19] = torch.tensor(examples[0]["input_ids"])
    original[1, :4] = torch.tensor(examples[1]["input_ids"])
    assert torch.equal(out["labels"][out["target_mask"]], original[out["target_mask"]])


def test_invalid_options_are_rejected():
    with pytest.raises(ValueError, match="sum to 1"):
        MaskingCollator(VOCAB, SPECIALS, MASK, PAD, mask_fraction=0.8, random_fraction=0.1, keep_fraction=0.2)
    with pytest.raises(ValueError, match="mlm_probability"):
        MaskingCollator(VOCAB, SPECIALS, MASK, PAD, mlm_probability=0)
    with pytest.raises(ValueError, match="token_counts has shape"):
        MaskingCollator(VOCAB, SPECIALS, MASK, PAD, token_counts=np.ones(10))
    with pytest.raises(ValueError, match="must lie in"):
        MaskingCollator(VOCAB, [VOCAB + 1], MASK, PAD)
