"""The triple loss of DistilBERT: L_ce (soft targets), L_mlm (or L_clm) and L_cos.

Every term is computed in fp32, whatever precision the models run in, and returned as a
*sum* over its tokens together with the number of tokens. The trainer divides each sum by
the token count of the whole global batch (all ranks, all accumulation micro-steps), so
the gradient does not depend on how a global batch is split across ranks.

Definitions (../shared/REFERENCE.md):
- L_ce  = T^2 * KL(softmax(t/T) || softmax(s/T)), mean over the selected positions
          (all real tokens, as the reference, or only the MLM positions);
- L_mlm = cross-entropy of the student's unsoftened logits at the MLM positions;
- L_cos = mean over real tokens of 1 - cos(h_student, h_teacher), last hidden states;
- L_mse (optional, the reference's alpha_mse) = sum over the vocabulary of (s - t)^2,
          mean over the L_ce positions.

Causal LMs (DistilGPT2) use the same code: L_clm is L_mlm's cross-entropy at rows whose
target is the next token (masking.CausalCollator shifts the labels, so position i is
scored against token i + 1), and L_ce compares the next-token distributions at every
real position. The ``"mlm"`` key and ``alpha_mlm`` weight below mean "the LM term"
whichever the objective; the trainer names it ``loss_clm`` for a causal student.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100
TERMS = ("ce", "mlm", "cos", "mse")
# Above this many logits in one go, project and reduce chunk by chunk and recompute each
# chunk's logits in backward instead of keeping them (256 MiB of fp32 logits).
MAX_LOGITS_PER_CHUNK = 64 * 1024 * 1024


@dataclass
class LossWeights:
    alpha_ce: float = 5.0
    alpha_mlm: float = 2.0
    alpha_cos: float = 1.0
    temperature: float = 2.0
    alpha_mse: float = 0.0


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over rows of T^2 * KL(softmax(t/T) || softmax(s/T)), in fp32."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(s, t, reduction="sum", log_target=True) * temperature**2


def mlm_sum(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropy over rows whose target is not -100, in fp32."""
    return F.cross_entropy(student_logits.float(), targets, ignore_index=IGNORE, reduction="sum")


def cosine_sum(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
               attention_mask: torch.Tensor) -> torch.Tensor:
    """Sum over real tokens of 1 - cos(h_s, h_t), in fp32."""
    cos = F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)
    return ((1.0 - cos) * attention_mask.to(cos.dtype)).sum()


def mse_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Sum over rows and vocabulary of (s - t)^2, in fp32 (the reference divides it by the rows)."""
    return F.mse_loss(student_logits.float(), teacher_logits.float(), reduction="sum")


def head_loss_sums(project: Callable[[torch.Tensor], torch.Tensor], hidden_rows: torch.Tensor,
                   targets: torch.Tensor, teacher_logits: torch.Tensor | None,
                   temperature: float, vocab_size: int, mse: bool = False) -> dict[str, torch.Tensor]:
    """L_ce and L_mlm sums (and MLM hits; L_mse's with ``mse``) over hidden-state rows, projected only here.

    ``hidden_rows`` are the student's hidden states at the positions a loss needs
    (``[n, hidden]``), ``targets`` their MLM targets (-100 where none), and
    ``teacher_logits`` the teacher's logits at the same rows (None: no L_ce). Large
    inputs are processed in chunks whose logits are recomputed in backward, so
    ``[n, vocab]`` fp32 logits never exist all at once.
    """
    rows_per_chunk = max(1, MAX_LOGITS_PER_CHUNK // max(1, vocab_size))

    def chunk_sums(h: torch.Tensor, tgt: torch.Tensor, t_logits: torch.Tensor | None):
        logits = project(h)
        zero = logits.new_zeros((), dtype=torch.float32)
        ce = kl_sum(logits, t_logits, temperature) if t_logits is not None else zero
        sq = mse_sum(logits, t_logits) if (mse and t_logits is not None) else zero
        mlm = mlm_sum(logits, tgt)
        with torch.no_grad():
            hits = ((logits.argmax(-1) == tgt) & (tgt != IGNORE)).sum()
        return ce, mlm, hits, sq

    n = hidden_rows.shape[0]
    if n <= rows_per_chunk:
        ce, mlm, hits, sq = chunk_sums(hidden_rows, targets, teacher_logits)
    else:
        ce = mlm = hits = sq = 0
        for start in range(0, n, rows_per_chunk):
            sl = slice(start, start + rows_per_chunk)
            t_chunk = teacher_logits[sl] if teacher_logits is not None else None
            c, m, h, q = checkpoint(chunk_sums, hidden_rows[sl], targets[sl], t_chunk, use_reentrant=False)
            ce, mlm, hits, sq = ce + c, mlm + m, hits + h, sq + q
    sums = {"ce": ce, "mlm": mlm, "mlm_hits": hits}
    if mse and teacher_logits is not None:
        sums["mse"] = sq
    return sums


# -------------------------------------------------------------------- fused projection + losses
#
# The vocabulary projection is the largest matmul of the step and its logits the largest
# tensors. ``projected_loss_sums`` computes the logits in the compute precision one chunk
# at a time, reduces them to the loss sums in fp32 in cache-sized row blocks, and writes
# the loss gradient with respect to the logits (known in closed form) into the logits'
# own buffer. Backward is then two matmuls per chunk, with no recompute of the forward
# and no fp32 ``[rows, vocab]`` temporaries (the logits themselves are in the compute dtype):
#   d(T^2 KL)/ds = T * (softmax(s/T) - softmax(t/T))      d(CE)/ds = softmax(s) - onehot
#   d(sum (s - t)^2)/ds = 2 (s - t)   (L_mse, only when asked: it needs a buffer of its own)
# Above ``MAX_KEPT_GRAD_BYTES`` of kept gradients, backward recomputes them chunk by chunk.

# Rows per block of the fp32 softmax arithmetic on CPUs: a block's fp32 temporaries
# (block x vocabulary) stay in cache, 3x faster than whole-chunk ops. On GPUs, blocks of
# about GPU_BLOCK_ELEMENTS logits keep the number of kernel launches small instead.
SOFTMAX_BLOCK_ROWS = 16
GPU_BLOCK_ELEMENTS = 32 * 1024 * 1024
# Most bytes of logit gradients kept from forward for backward (else: recompute).
MAX_KEPT_GRAD_BYTES = 1 << 30


def projected_loss_sums(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                        teacher_logits: torch.Tensor | None, temperature: float,
                        mlm_rows: torch.Tensor | None = None, mse: bool = False) -> dict[str, torch.Tensor]:
    """L_ce and L_mlm sums (and MLM hits) of the logits ``x @ weight.T + bias``, fused;
    with ``mse`` (and teacher logits) also L_mse's sum, under ``"mse"``.

    ``x`` are the rows after the head's transform (``[n, hidden]``), ``weight``/``bias`` the
    vocabulary projection, ``targets`` each row's MLM target (-100: none) and
    ``teacher_logits`` the teacher's logits at the same rows (None: no L_ce).
    ``mlm_rows`` are the indices of the rows that have a target, ascending; computed here
    when not given (a device sync on GPUs: callers pass them from the CPU). Values and gradients
    equal ``kl_sum``/``mlm_sum`` on the full logits; fp32 arithmetic throughout, the logits
    and their gradients rounded to ``x``'s dtype as an autocast matmul would.
    """
    if mlm_rows is None:
        mlm_rows = (targets != IGNORE).nonzero().squeeze(1)
    mse = bool(mse and teacher_logits is not None)
    ce, mlm, hits, sq = _ProjectedLosses.apply(x, weight, bias, targets, teacher_logits, float(temperature), mlm_rows,
                                               mse)
    sums = {"ce": ce, "mlm": mlm, "mlm_hits": hits}
    if mse:
        sums["mse"] = sq
    return sums


class _ProjectedLosses(torch.autograd.Function):
    """The autograd function behind :func:`projected_loss_sums` (one backward per forward)."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets, teacher_logits, temperature, mlm_rows, mse):
        # The matmuls run in the compute dtype: autocast's when it is on (fp32 master weights
        # under DeepSpeed's torch_autocast), else the weight's. Backward runs outside
        # autocast, so the cast operands are kept for it.
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else weight.dtype
        ctx.dtypes = (x.dtype, weight.dtype)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        n, vocab = x.shape[0], weight.shape[0]
        kept_rows = (n * (1 + mse) if teacher_logits is not None else 0) + len(mlm_rows)
        keep = kept_rows * vocab * x.element_size() <= MAX_KEPT_GRAD_BYTES
        # Kept gradients: one chunk (no per-chunk row bookkeeping). Recomputed: bounded chunks.
        rows_per_chunk = max(1, n) if keep else max(1, MAX_LOGITS_PER_CHUNK // max(1, vocab))
        total = torch.zeros(4, dtype=torch.float32, device=x.device)  # ce, mlm, hits, mse
        kept = []
        for start in range(0, n, rows_per_chunk):
            chunk = _chunk_grads(x, weight, bias, targets, teacher_logits, temperature, mlm_rows, start,
                                 min(n, start + rows_per_chunk), total, mse)
            if keep:
                kept.append(chunk)
        ctx.keep, ctx.kept, ctx.temperature, ctx.rows_per_chunk = keep, kept, temperature, rows_per_chunk
        ctx.has_ce, ctx.mse = teacher_logits is not None, mse
        # Teacher logits may be inference tensors: held as an attribute, read only in backward.
        ctx.teacher_logits = None if keep else teacher_logits
        ctx.bias = None if keep else bias
        ctx.save_for_backward(x, weight, targets, mlm_rows)
        hits = total[2].long()
        ctx.mark_non_differentiable(hits)
        return total[0].clone(), total[1].clone(), hits, total[3].clone()

    @staticmethod
    def backward(ctx, grad_ce, grad_mlm, _grad_hits, grad_mse):
        if ctx.kept is None:
            raise RuntimeError("projected_loss_sums: backward ran twice (retain_graph is not supported)")
        x, weight, targets, mlm_rows = ctx.saved_tensors
        n = x.shape[0]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = None  # the first chunk's product, then accumulated
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=x.device) if need_b else None
        for i, start in enumerate(range(0, n, ctx.rows_per_chunk)):
            stop = min(n, start + ctx.rows_per_chunk)
            if ctx.keep:
                chunk, ctx.kept[i] = ctx.kept[i], None  # freed as soon as used
            else:
                chunk = _chunk_grads(x, weight, ctx.bias, targets, ctx.teacher_logits, ctx.temperature, mlm_rows,
                                     start, stop, None, ctx.mse)
            d = _combine(chunk, grad_ce if ctx.has_ce else None, grad_mlm, stop - start, grad_mse if ctx.mse else None)
            if need_x:
                torch.mm(d, weight, out=grad_x[start:stop])
            if need_w and grad_w is None:
                grad_w = torch.mm(d.t(), x[start:stop])
            elif need_w:
                grad_w.addmm_(d.t(), x[start:stop])
            if need_b:
                grad_b += d.sum(0, dtype=torch.float32)
        ctx.kept = ctx.teacher_logits = ctx.bias = None
        x_dtype, w_dtype = ctx.dtypes
        if need_w and grad_w is None:  # no rows at all
            grad_w = torch.zeros_like(weight)
        return (grad_x.to(x_dtype) if need_x else None, grad_w.to(w_dtype) if need_w else None,
                grad_b.to(w_dtype) if need_b else None, None, None, None, None, None)


def _chunk_grads(x, weight, bias, targets, teacher_logits, temperature, mlm_rows, start, stop, total, mse=False):
    """``(d_ce, d_mlm, local_mlm_rows, d_mse)`` of rows ``start:stop``: the logit gradients of each sum.

    Adds the chunk's sums to ``total`` (unless None). ``d_ce`` is None without teacher
    logits, ``d_mse`` without ``mse``.
    """
    logits = F.linear(x[start:stop], weight, bias)
    if start == 0 and stop == x.shape[0]:
        local = mlm_rows
    else:  # several chunks (very large inputs only): a device sync on GPUs
        local = mlm_rows[(mlm_rows >= start) & (mlm_rows < stop)] - start
    # The MLM rows first: the L_ce gradient overwrites the logits below.
    d_mlm = logits.index_select(0, local)
    _mlm_grad_(d_mlm, targets[start:stop].index_select(0, local), total)
    d_ce = d_mse = None
    if teacher_logits is not None:
        if mse:  # before L_ce's gradient overwrites the logits
            d_mse = _mse_grad(logits, teacher_logits[start:stop], total)
        _kl_grad_(logits, teacher_logits[start:stop], temperature, total)
        d_ce = logits
    return d_ce, d_mlm, local, d_mse


def _block_rows(logits: torch.Tensor) -> int:
    if logits.device.type == "cpu":
        return SOFTMAX_BLOCK_ROWS
    return max(1, GPU_BLOCK_ELEMENTS // max(1, logits.shape[1]))


def _kl_grad_(logits, teacher, temperature, total):
    """Adds sum_rows T^2 KL(p_t || q_s) to ``total[0]``; overwrites ``logits`` with its gradient."""
    inv_t = 1.0 / temperature
    rows = _block_rows(logits)
    with torch.no_grad():
        for start in range(0, logits.shape[0], rows):
            block = logits[start:start + rows]
            log_q = F.log_softmax(_fp32_copy(block).mul_(inv_t), dim=-1)
            log_p = F.log_softmax(_fp32_copy(teacher[start:start + rows]).mul_(inv_t), dim=-1)
            p = log_p.exp()
            if total is not None:
                total[0] += torch.linalg.vecdot(p, log_p.sub_(log_q)).sum() * temperature**2
            block.copy_(log_q.exp_().sub_(p).mul_(temperature))


def _mse_grad(logits, teacher, total):
    """Adds sum (s - t)^2 to ``total[3]``; returns its gradient 2 (s - t) (a new buffer)."""
    grad = torch.empty_like(logits)
    rows = _block_rows(logits)
    with torch.no_grad():
        for start in range(0, logits.shape[0], rows):
            diff = _fp32_copy(logits[start:start + rows]).sub_(teacher[start:start + rows].float())
            if total is not None:
                total[3] += torch.linalg.vecdot(diff, diff).sum()
            grad[start:start + rows].copy_(diff.mul_(2.0))
    return grad


def _mlm_grad_(logits, targets, total):
    """Adds the cross-entropy sum and the hits to ``total[1:]``; overwrites ``logits`` with the gradient."""
    rows = _block_rows(logits)
    with torch.no_grad():
        for start in range(0, logits.shape[0], rows):
            block = logits[start:start + rows]
            tgt = targets[start:start + rows].unsqueeze(1)
            s = block.float()
            if total is not None:
                total[2] += (s.argmax(-1, keepdim=True) == tgt).sum()
            log_q = F.log_softmax(s, dim=-1)
            if total is not None:
                total[1] -= log_q.gather(1, tgt).sum()
            block.copy_(log_q.exp_().scatter_add_(1, tgt, torch.full(tgt.shape, -1.0, device=s.device)))


def _fp32_copy(t: torch.Tensor) -> torch.Tensor:
    """An fp32 copy of ``t`` (``.float()`` would alias an fp32 input, which is then modified in place)."""
    return t.to(torch.float32, copy=True)


def _combine(chunk, grad_ce, grad_mlm, rows: int, grad_mse=None):
    """``grad_ce * d_ce + grad_mse * d_mse + grad_mlm * d_mlm`` (the last at the MLM rows):
    the chunk's logit gradient."""
    d_ce, d_mlm, local, d_mse = chunk
    d_mlm = d_mlm.mul_(grad_mlm)
    if d_ce is not None:
        d = d_ce.mul_(grad_ce)
        if d_mse is not None:
            d.add_(d_mse.mul_(grad_mse))
        return d.index_add_(0, local, d_mlm) if len(local) else d
    if len(local) == rows:  # every row has a target (the rows are the MLM positions)
        return d_mlm
    return d_mlm.new_zeros(rows, d_mlm.shape[1]).index_copy_(0, local, d_mlm)


def weighted_total(sums: dict[str, torch.Tensor], counts: dict[str, torch.Tensor],
                   weights: LossWeights) -> torch.Tensor:
    """alpha_ce*L_ce + alpha_mlm*L_mlm + alpha_cos*L_cos (+ alpha_mse*L_mse) with global token counts.

    ``counts`` are the numbers of tokens of each term over the whole global batch (L_mse
    shares L_ce's rows: ``counts["mse"]`` defaults to ``counts["ce"]``); a term whose
    weight is zero contributes nothing (and may be absent from ``sums``).
    """
    total = None
    counts = {"mse": counts.get("ce"), **counts}
    for term, alpha in (("ce", weights.alpha_ce), ("mlm", weights.alpha_mlm), ("cos", weights.alpha_cos),
                        ("mse", weights.alpha_mse)):
        if alpha == 0 or term not in sums:
            continue
        part = alpha * sums[term] / counts[term].clamp(min=1)
        total = part if total is None else total + part
    return total
