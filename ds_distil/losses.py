"""The triple loss of DistilBERT: L_ce (soft targets), L_mlm and L_cos.

Every term is computed in fp32, whatever precision the models run in, and returned as a
*sum* over its tokens together with the number of tokens. The trainer divides each sum by
the token count of the whole global batch (all ranks, all accumulation micro-steps), so
the gradient does not depend on how a global batch is split across ranks.

Definitions (../shared/REFERENCE.md):
- L_ce  = T^2 * KL(softmax(t/T) || softmax(s/T)), mean over the selected positions
          (all real tokens, as the reference, or only the MLM positions);
- L_mlm = cross-entropy of the student's unsoftened logits at the MLM positions;
- L_cos = mean over real tokens of 1 - cos(h_student, h_teacher), last hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100
TERMS = ("ce", "mlm", "cos")
# Above this many logits in one go, project and reduce chunk by chunk and recompute each
# chunk's logits in backward instead of keeping them (256 MiB of fp32 logits).
MAX_LOGITS_PER_CHUNK = 64 * 1024 * 1024


@dataclass
class LossWeights:
    alpha_ce: float = 5.0
    alpha_mlm: float = 2.0
    alpha_cos: float = 1.0
    temperature: float = 2.0


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


def head_loss_sums(project: Callable[[torch.Tensor], torch.Tensor], hidden_rows: torch.Tensor,
                   targets: torch.Tensor, teacher_logits: torch.Tensor | None,
                   temperature: float, vocab_size: int) -> dict[str, torch.Tensor]:
    """L_ce and L_mlm sums (and MLM hits) over hidden-state rows, projected only here.

    ``hidden_rows`` are the student's hidden states at the positions a loss needs
    (``[n, hidden]``), ``targets`` their MLM targets (-100 where none), and
    ``teacher_logits`` the teacher's logits at the same rows (None: no L_ce). Large
    inputs are processed in chunks whose logits are recomputed in backward, so
    ``[n, vocab]`` fp32 logits never exist all at once.
    """
    rows_per_chunk = max(1, MAX_LOGITS_PER_CHUNK // max(1, vocab_size))

    def chunk_sums(h: torch.Tensor, tgt: torch.Tensor, t_logits: torch.Tensor | None):
        logits = project(h)
        ce = kl_sum(logits, t_logits, temperature) if t_logits is not None else logits.new_zeros((), dtype=torch.float32)
        mlm = mlm_sum(logits, tgt)
        with torch.no_grad():
            hits = ((logits.argmax(-1) == tgt) & (tgt != IGNORE)).sum()
        return ce, mlm, hits

    n = hidden_rows.shape[0]
    if n <= rows_per_chunk:
        ce, mlm, hits = chunk_sums(hidden_rows, targets, teacher_logits)
    else:
        ce = mlm = hits = 0
        for start in range(0, n, rows_per_chunk):
            sl = slice(start, start + rows_per_chunk)
            t_chunk = teacher_logits[sl] if teacher_logits is not None else None
            c, m, h = checkpoint(chunk_sums, hidden_rows[sl], targets[sl], t_chunk, use_reentrant=False)
            ce, mlm, hits = ce + c, mlm + m, hits + h
    return {"ce": ce, "mlm": mlm, "mlm_hits": hits}


def weighted_total(sums: dict[str, torch.Tensor], counts: dict[str, torch.Tensor],
                   weights: LossWeights) -> torch.Tensor:
    """alpha_ce*L_ce + alpha_mlm*L_mlm + alpha_cos*L_cos with global token counts.

    ``counts`` are the numbers of tokens of each term over the whole global batch; a
    term whose weight is zero contributes nothing (and may be absent from ``sums``).
    """
    total = None
    for term, alpha in (("ce", weights.alpha_ce), ("mlm", weights.alpha_mlm), ("cos", weights.alpha_cos)):
        if alpha == 0 or term not in sums:
            continue
        part = alpha * sums[term] / counts[term].clamp(min=1)
        total = part if total is None else total + part
    return total
