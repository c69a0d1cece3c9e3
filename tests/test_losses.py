"""Golden values for each loss term, computed independently of ds_distil.losses."""

import math

import pytest
import torch

from ds_distil import losses


def _golden_kl(s, t, T):
    """T^2 * sum_rows sum_v p_t (log p_t - log p_s), written out with exp/log by hand."""
    total = 0.0
    for srow, trow in zip(s.tolist(), t.tolist()):
        zs = [x / T for x in srow]
        zt = [x / T for x in trow]
        ls = math.log(sum(math.exp(z) for z in zs))
        lt = math.log(sum(math.exp(z) for z in zt))
        for a, b in zip(zs, zt):
            pt = math.exp(b - lt)
            total += pt * ((b - lt) - (a - ls))
    return total * T * T


def test_kl_sum_golden_value():
    s = torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 3.0, 1.0]])
    t = torch.tensor([[2.0, 1.0, 0.0, -2.0], [1.0, -1.0, 2.0, 0.5]])
    got = losses.kl_sum(s, t, temperature=2.0).item()
    assert got == pytest.approx(_golden_kl(s, t, 2.0), rel=1e-5)  # fp32 vs float64
    # Identical distributions: zero divergence; a hand value for one row.
    assert losses.kl_sum(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-7)
    # p_t = (0.5, 0.5) vs p_s = softmax(0, 2 ln 3 / 1) ... at T=1: p_s = (0.1, 0.9)
    s1 = torch.tensor([[0.0, math.log(9.0)]])
    t1 = torch.tensor([[0.0, 0.0]])
    expected = 0.5 * math.log(0.5 / 0.1) + 0.5 * math.log(0.5 / 0.9)
    assert losses.kl_sum(s1, t1, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_mlm_sum_golden_value_ignores_unlabelled_rows():
    logits = torch.tensor([[0.0, math.log(3.0), 0.0], [5.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    targets = torch.tensor([1, -100, 2])
    # Row 0: p(1) = 3/5. Row 2: p(2) = 1/3. Row 1 is ignored.
    expected = -math.log(3 / 5) - math.log(1 / 3)
    assert losses.mlm_sum(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_cosine_sum_golden_value_ignores_padding():
    hs = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]]])
    ht = torch.tensor([[[0.0, 2.0], [2.0, 2.0], [-3.0, -4.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # cos = 0 (orthogonal) and 1 (parallel); the padded pair (cos -1) is ignored.
    assert losses.cosine_sum(hs, ht, mask).item() == pytest.approx((1 - 0) + (1 - 1), abs=1e-6)


def test_losses_are_fp32_whatever_the_input_precision():
    torch.manual_seed(0)
    s = torch.randn(6, 50)
    t = torch.randn(6, 50)
    ref = losses.kl_sum(s, t, 2.0)
    low = losses.kl_sum(s.bfloat16(), t.bfloat16(), 2.0)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(ref.item(), rel=2e-2)


def test_chunked_head_matches_one_shot_values_and_gradients(monkeypatch):
    torch.manual_seed(0)
    vocab, hidden, n = 37, 8, 23
    head = torch.nn.Linear(hidden, vocab)
    h = torch.randn(n, hidden, requires_grad=True)
    targets = torch.randint(0, vocab, (n,))
    targets[::3] = -100
    t_logits = torch.randn(n, vocab)

    def run():
        h.grad = None
        head.zero_grad()
        out = losses.head_loss_sums(head, h, targets, t_logits, 2.0, vocab)
        (out["ce"] + out["mlm"]).backward()
        return out, h.grad.clone(), head.weight.grad.clone()

    one, gh1, gw1 = run()
    monkeypatch.setattr(losses, "MAX_LOGITS_PER_CHUNK", vocab * 5)  # 5 rows per chunk
    chunked, gh2, gw2 = run()
    for k in ("ce", "mlm", "mlm_hits"):
        assert float(chunked[k].detach()) == pytest.approx(float(one[k].detach()), rel=1e-5)
    torch.testing.assert_close(gh1, gh2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw1, gw2, rtol=1e-5, atol=1e-6)
    # And the values are the independent formulas on full logits.
    full = head(h.detach())
    assert float(one["ce"].detach()) == pytest.approx(_golden_kl(full, t_logits, 2.0), rel=1e-5)
    ce_rows = [-torch.log_softmax(full[i], -1)[targets[i]].item() for i in range(n) if targets[i] >= 0]
    assert float(one["mlm"].detach()) == pytest.approx(sum(ce_rows), rel=1e-5)


def test_weighted_total_uses_global_counts_and_skips_zero_weights():
    sums = {"ce": torch.tensor(10.0), "mlm": torch.tensor(6.0), "cos": torch.tensor(2.0)}
    counts = {"ce": torch.tensor(5.0), "mlm": torch.tensor(3.0), "cos": torch.tensor(4.0)}
    w = losses.LossWeights(alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0)
    assert losses.weighted_total(sums, counts, w).item() == pytest.approx(5 * 2 + 2 * 2 + 1 * 0.5)
    w0 = losses.LossWeights(alpha_ce=0.0, alpha_mlm=2.0, alpha_cos=0.0)
    assert losses.weighted_total({"mlm": sums["mlm"]}, counts, w0).item() == pytest.approx(4.0)
