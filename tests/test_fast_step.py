"""The fused projection + losses (losses.projected_loss_sums) against plain autograd on full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ds_distil import losses, modeling


def _problem(n=37, hidden=12, vocab=53, with_teacher=True, target_every=3, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    x = torch.randn(n, hidden, dtype=dtype, requires_grad=True)
    head = torch.nn.Linear(hidden, vocab).to(dtype)
    targets = torch.randint(0, vocab, (n,))
    keep = torch.arange(n) % target_every == 0
    targets[~keep] = -100
    teacher = (3 * torch.randn(n, vocab)).to(dtype) if with_teacher else None
    return x, head, targets, teacher


def _plain(x, head, targets, teacher, temperature):
    """The definitions on full fp32 logits, written directly with autograd."""
    logits = head(x).float()
    ce = torch.zeros(())
    if teacher is not None:
        log_q = F.log_softmax(logits / temperature, -1)
        p = F.softmax(teacher.float() / temperature, -1)
        ce = (p * (p.log() - log_q)).sum() * temperature**2
    rows = targets != -100
    mlm = -F.log_softmax(logits[rows], -1).gather(1, targets[rows, None]).sum()
    hits = (logits[rows].argmax(-1) == targets[rows]).sum()
    return ce, mlm, hits


def _grads(x, head, out, weights=(5.0, 2.0)):
    for p in (x, head.weight, head.bias):
        p.grad = None
    (weights[0] * out[0] + weights[1] * out[1]).backward()
    return [p.grad.clone() for p in (x, head.weight, head.bias)]


@pytest.mark.parametrize("with_teacher", [True, False])
@pytest.mark.parametrize("mode", ["kept", "recomputed"])
def test_fused_sums_and_gradients_equal_plain_autograd(monkeypatch, with_teacher, mode):
    monkeypatch.setattr(losses, "SOFTMAX_BLOCK_ROWS", 4)  # several blocks, a ragged last one
    if mode == "recomputed":
        monkeypatch.setattr(losses, "MAX_KEPT_GRAD_BYTES", 0)
        monkeypatch.setattr(losses, "MAX_LOGITS_PER_CHUNK", 53 * 10)  # chunks of 10 rows
    x, head, targets, teacher = _problem(with_teacher=with_teacher)
    fused = losses.projected_loss_sums(x, head.weight, head.bias, targets, teacher, 2.0)
    got = _grads(x, head, (fused["ce"], fused["mlm"]))
    plain = _plain(x, head, targets, teacher, 2.0)
    want = _grads(x, head, plain)
    assert float(fused["ce"].detach()) == pytest.approx(float(plain[0].detach()), rel=1e-5, abs=1e-5)
    assert float(fused["mlm"].detach()) == pytest.approx(float(plain[1].detach()), rel=1e-5)
    assert int(fused["mlm_hits"]) == int(plain[2])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_mlm_rows_passed_in_equal_mlm_rows_computed():
    x, head, targets, teacher = _problem()
    a = losses.projected_loss_sums(x, head.weight, head.bias, targets, teacher, 2.0)
    rows = (targets != -100).nonzero().squeeze(1)
    b = losses.projected_loss_sums(x, head.weight, head.bias, targets, teacher, 2.0, mlm_rows=rows)
    for k in ("ce", "mlm", "mlm_hits"):
        assert float(a[k].detach()) == float(b[k].detach())


def test_hits_count_argmax_matches():
    x, head, targets, teacher = _problem(n=9, vocab=7, target_every=1)
    with torch.no_grad():
        targets = head(x).argmax(-1)  # every prediction right...
    targets[::2] = -100  # ...on the rows that have a target
    out = losses.projected_loss_sums(x, head.weight, head.bias, targets, teacher, 2.0)
    assert int(out["mlm_hits"]) == int((targets != -100).sum()) == 4


def test_bf16_compute_stays_within_bf16_precision_of_fp32():
    x, head, targets, teacher = _problem(n=64, hidden=32, vocab=300)
    ref = losses.projected_loss_sums(x, head.weight, head.bias, targets, teacher, 2.0)
    ref_g = _grads(x, head, (ref["ce"], ref["mlm"]))
    xb = x.detach().bfloat16().requires_grad_()
    hb = torch.nn.Linear(32, 300).bfloat16()
    hb.load_state_dict(head.state_dict())
    low = losses.projected_loss_sums(xb, hb.weight, hb.bias, targets, teacher.bfloat16(), 2.0)
    assert low["ce"].dtype == low["mlm"].dtype == torch.float32  # loss arithmetic in fp32
    low_g = _grads(xb, hb, (low["ce"], low["mlm"]))
    assert float(low["ce"].detach()) == pytest.approx(float(ref["ce"].detach()), rel=3e-2)
    assert float(low["mlm"].detach()) == pytest.approx(float(ref["mlm"].detach()), rel=1e-2)
    for g, w in zip(low_g, ref_g):
        assert g.dtype == torch.bfloat16
        assert float((g.float() - w).norm() / w.norm()) < 2e-2


def test_autocast_fp32_master_weights_get_fp32_gradients():
    x, head, targets, teacher = _problem(n=40, hidden=16, vocab=90)
    ref = losses.projected_loss_sums(x, head.weight, head.bias, targets, teacher, 2.0)
    ref_g = _grads(x, head, (ref["ce"], ref["mlm"]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = losses.projected_loss_sums(x, head.weight, head.bias, targets, teacher, 2.0)
    got = _grads(x, head, (out["ce"], out["mlm"]))
    assert float(out["ce"].detach()) == pytest.approx(float(ref["ce"].detach()), rel=3e-2)
    for g, w in zip(got, ref_g):
        assert g.dtype == torch.float32
        assert float((g - w).norm() / w.norm()) < 2e-2


def test_backward_twice_is_refused():
    x, head, targets, teacher = _problem()
    out = losses.projected_loss_sums(x, head.weight, head.bias, targets, teacher, 2.0)
    (out["ce"] + out["mlm"]).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        (out["ce"] + out["mlm"]).backward()


def test_no_rows_and_no_targets():
    x, head, targets, teacher = _problem(n=5)
    empty = losses.projected_loss_sums(x[:0], head.weight, head.bias, targets[:0], teacher[:0], 2.0)
    assert float(empty["ce"].detach()) == float(empty["mlm"].detach()) == 0.0
    none = torch.full_like(targets, -100)
    out = losses.projected_loss_sums(x, head.weight, head.bias, none, teacher, 2.0)
    assert float(out["mlm"].detach()) == 0.0 and int(out["mlm_hits"]) == 0 and float(out["ce"].detach()) > 0
    (out["ce"] + out["mlm"]).backward()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["bert", "distilbert", "roberta"])
def test_head_parts_compose_to_the_hf_head(arch):
    from transformers import (BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM, RobertaConfig,
                              RobertaForMaskedLM)

    torch.manual_seed(0)
    small = dict(vocab_size=50, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, hidden_size=16)
    model = {"bert": lambda: BertForMaskedLM(BertConfig(**small)),
             "roberta": lambda: RobertaForMaskedLM(RobertaConfig(**small)),
             "distilbert": lambda: DistilBertForMaskedLM(DistilBertConfig(vocab_size=50, n_layers=1, n_heads=2,
                                                                          dim=16, hidden_dim=32))}[arch]().eval()
    ids = torch.randint(5, 50, (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        hidden = modeling.encode(model, ids, mask)
        transform, decoder = modeling.head_parts(model)
        torch.testing.assert_close(decoder(transform(hidden)), full)
        torch.testing.assert_close(modeling.project(model, hidden.reshape(-1, 16)), full.reshape(-1, 50))
    assert decoder.weight is model.get_input_embeddings().weight  # tied: the fused path updates the embedding


@pytest.mark.parametrize("mode", ["kept", "recomputed"])
def test_teacher_logits_may_be_inference_tensors(monkeypatch, mode):
    """The teacher runs under inference mode: its logits need no copy to enter the loss."""
    if mode == "recomputed":
        monkeypatch.setattr(losses, "MAX_KEPT_GRAD_BYTES", 0)
    x, head, targets, teacher = _problem()
    want = _grads(x, head, _plain(x, head, targets, teacher, 2.0))
    with torch.inference_mode():
        frozen = teacher.clone()
    assert frozen.is_inference()
    out = losses.projected_loss_sums(x, head.weight, head.bias, targets, frozen, 2.0)
    got = _grads(x, head, (out["ce"], out["mlm"]))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
