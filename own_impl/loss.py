"""The FixMatch objective (Sohn et al. 2020, section 2.2) as one pure function of logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def fixmatch_loss(logits_x: torch.Tensor, y_x: torch.Tensor, logits_u_weak: torch.Tensor,
                  logits_u_strong: torch.Tensor, threshold: float, lambda_u: float,
                  y_u_true: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """loss = l_s + lambda_u * l_u.

    logits_x (B, C) and labels y_x (B,); logits_u_weak, logits_u_strong (muB, C): one unlabelled batch seen
    through the weak and the strong augmentation. y_u_true (muB,): its true labels, for the pseudo_acc diagnostic.
    Statistics are detached tensors on the logits' device (reading them is the caller's sync point).
    """
    loss_x = F.cross_entropy(logits_x, y_x)  # l_s = 1/B sum H(p_b, p_m(y|alpha(x_b)))
    q = torch.softmax(logits_u_weak.detach(), dim=-1)  # q_b = p_m(y|alpha(u_b)): a target, no gradient
    q_max, pseudo = q.max(dim=-1)  # max(q_b), q_hat_b = argmax(q_b)
    mask = (q_max >= threshold).float()  # 1(max(q_b) >= tau)
    # l_u = 1/(muB) sum 1(max q_b >= tau) H(q_hat_b, p_m(y|A(u_b))): the mean runs over all muB, rejected count 0
    loss_u = (F.cross_entropy(logits_u_strong, pseudo, reduction="none") * mask).mean()
    loss = loss_x + lambda_u * loss_u

    stats = {"loss": loss.detach(), "loss_x": loss_x.detach(), "loss_u": loss_u.detach(),
             "mask_rate": mask.mean()}  # fraction of the unlabelled batch ACCEPTED
    if y_u_true is not None:
        correct = (pseudo == y_u_true).float() * mask
        stats["pseudo_acc"] = correct.sum() / mask.sum().clamp(min=1.0)  # among accepted; 0 when none accepted
    return loss, stats
