"""L_mse (the reference's alpha_mse): squared error between student and teacher logits.

Golden values by hand, and the fused projection's values and gradients against plain
autograd on full logits, as tests/test_fast_step.py does for L_ce and L_mlm.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ds_distil import losses


def test_mse_sum_golden_value():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 1.0, 0.5], [0.0, 1.0, 1.0]])
    # (1 + 1 + 0) + (0 + 4 + 4): summed over the vocabulary and the rows.
    assert losses.mse_sum(s, t).item() == pytest.approx(10.0)
    assert losses.mse_sum(s.bfloat16(), t.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize("mode", ["kept", "recomputed"])
def test_fused_mse_value_and_gradients_equal_plain_autograd(monkeypatch, mode):
    monkeypatch.setattr(losses, "SOFTMAX_BLOCK_ROWS", 4)
    if mode == "recomputed":
        monkeypatch.setattr(losses, "MAX_KEPT_GRAD_BYTES", 0)
        monkeypatch.setattr(losses, "MAX_LOGITS_PER_CHUNK", 53 * 10)  # chunks of 10 rows
    torch.manual_seed(0)
    n, hidden, vocab = 37, 12, 53
    x = torch.randn(n, hidden, requires_grad=True)
    head = torch.nn.Linear(hidden, vocab)
    targets = torch.randint(0, vocab, (n,))
    targets[torch.arange(n) % 3 != 0] = -100
    teacher = 3 * torch.randn(n, vocab)
    weights = (5.0, 2.0, 0.5)  # ce, mlm, mse

    def grads(total):
        for p in (x, head.weight, head.bias):
            p.grad = None
        total.backward()
        return [p.grad.clone() for p in (x, head.weight, head.bias)]

    fused = losses.projected_loss_sums(x, head.weight, head.bias, targets, teacher, 2.0, mse=True)
    got = grads(weights[0] * fused["ce"] + weights[1] * fused["mlm"] + weights[2] * fused["mse"])
    logits = head(x)
    plain_mse = ((logits - teacher) ** 2).sum()
    plain_ce = losses.kl_sum(logits, teacher, 2.0)
    plain_mlm = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    want = grads(weights[0] * plain_ce + weights[1] * plain_mlm + weights[2] * plain_mse)
    assert float(fused["mse"].detach()) == pytest.approx(float(plain_mse.detach()), rel=1e-5)
    assert float(fused["ce"].detach()) == pytest.approx(float(plain_ce.detach()), rel=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    # Without the flag, or without teacher logits, there is no L_mse.
    assert "mse" not in losses.projected_loss_sums(x, head.weight, head.bias, targets, teacher, 2.0)
    assert "mse" not in losses.projected_loss_sums(x, head.weight, head.bias, targets, None, 2.0, mse=True)


def test_unfused_head_mse_matches_and_weighted_total_uses_the_ce_rows():
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 20)
    h = torch.randn(6, 8)
    targets = torch.full((6,), -100)
    teacher = torch.randn(6, 20)
    out = losses.head_loss_sums(head, h, targets, teacher, 2.0, 20, mse=True)
    with torch.no_grad():
        expected = float(((head(h) - teacher) ** 2).sum())
    assert float(out["mse"].detach()) == pytest.approx(expected, rel=1e-5)
    sums = {"mlm": torch.tensor(6.0), "mse": torch.tensor(12.0)}
    counts = {"ce": torch.tensor(4.0), "mlm": torch.tensor(3.0), "cos": torch.tensor(1.0)}
    w = losses.LossWeights(alpha_ce=0.0, alpha_mlm=2.0, alpha_cos=0.0, alpha_mse=0.5)
    assert losses.weighted_total(sums, counts, w).item() == pytest.approx(2 * 2 + 0.5 * 12 / 4)
