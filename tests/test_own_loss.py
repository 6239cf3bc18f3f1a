"""own_impl.fixmatch.fixmatch_loss on hand-made logits, against values worked out by hand."""
import math

import numpy as np
import torch

from own_impl.fixmatch import fixmatch_loss

LN3 = math.log(3.0)


def test_hand_computed_value():
    logits_x = torch.tensor([[0.0, 0.0]])  # p = (1/2, 1/2), label 0: CE = ln 2
    y_x = torch.tensor([0])
    weak = torch.tensor([[10.0, 0.0],  # max p = 1/(1+e^-10) > 0.95: accepted, pseudo-label 0
                         [0.0, 0.0]])  # max p = 1/2 < 0.95: rejected
    strong = torch.tensor([[0.0, LN3],  # p = (1/4, 3/4), pseudo-label 0: CE = ln 4
                           [5.0, -5.0]])  # rejected: contributes 0 whatever its value
    loss, stats = fixmatch_loss(logits_x, y_x, weak, strong, threshold=0.95, lambda_u=2.0,
                                y_u_true=torch.tensor([1, 0]))
    # l_u = (ln 4 + 0) / 2 over ALL muB = 2 samples = ln 2; total = ln 2 + 2 * ln 2
    assert math.isclose(stats["loss_x"].item(), math.log(2), rel_tol=1e-6)
    assert math.isclose(stats["loss_u"].item(), math.log(2), rel_tol=1e-6)
    assert math.isclose(loss.item(), 3 * math.log(2), rel_tol=1e-6)
    assert stats["mask_rate"].item() == 0.5  # fraction ACCEPTED
    assert stats["pseudo_acc"].item() == 0.0  # the one accepted pseudo-label (0) is wrong (true label 1)


def test_threshold_edge_is_accepted():
    # Equal logits give exactly representable probabilities: 1/2 with two classes, 1/4 with four.
    weak2 = torch.zeros(1, 2)
    strong2 = torch.tensor([[0.0, LN3]])  # CE vs pseudo-label 0 (argmax of a tie is the first) = ln 4
    x, y = torch.zeros(1, 2), torch.tensor([0])
    _, at = fixmatch_loss(x, y, weak2, strong2, threshold=0.5, lambda_u=1.0)
    just_above = float(np.nextafter(np.float32(0.5), np.float32(1)))  # the comparison runs in the logits' float32
    _, above = fixmatch_loss(x, y, weak2, strong2, threshold=just_above, lambda_u=1.0)
    assert at["mask_rate"].item() == 1.0
    assert math.isclose(at["loss_u"].item(), math.log(4), rel_tol=1e-6)
    assert above["mask_rate"].item() == 0.0 and above["loss_u"].item() == 0.0
    _, quarter = fixmatch_loss(torch.zeros(1, 4), y, torch.zeros(1, 4), torch.zeros(1, 4), 0.25, 1.0)
    assert quarter["mask_rate"].item() == 1.0


def test_no_gradient_reaches_the_weak_branch():
    # As in training: weak and strong logits are two halves of one output tensor.
    torch.manual_seed(0)
    logits_u = (3 * torch.randn(8, 10)).requires_grad_()
    logits_x = torch.randn(2, 10, requires_grad=True)
    weak, strong = logits_u.chunk(2)
    loss, stats = fixmatch_loss(logits_x, torch.tensor([1, 2]), weak, strong, threshold=0.0, lambda_u=1.0)
    loss.backward()
    assert stats["mask_rate"].item() == 1.0
    assert torch.all(logits_u.grad[:4] == 0)  # the weak half: pseudo-labels are targets only
    assert torch.all(logits_u.grad[4:].abs().sum(dim=1) > 0)
    assert logits_x.grad.abs().sum() > 0


def test_nothing_accepted_gives_zero_unlabelled_loss_and_no_nan():
    weak = torch.zeros(3, 10)  # max p = 0.1 everywhere
    strong = torch.randn(3, 10, requires_grad=True)
    loss, stats = fixmatch_loss(torch.zeros(2, 10), torch.tensor([0, 1]), weak, strong, threshold=0.95,
                                lambda_u=1.0, y_u_true=torch.tensor([0, 1, 2]))
    loss.backward()
    assert stats["loss_u"].item() == 0.0 and stats["mask_rate"].item() == 0.0
    assert stats["pseudo_acc"].item() == 0.0  # no NaN from 0/0
    assert math.isclose(loss.item(), math.log(10), rel_tol=1e-6)
    assert torch.all(strong.grad == 0)
    assert all(bool(torch.isfinite(v)) for v in stats.values())


def test_stats_stay_detached_tensors_on_the_logits_device():
    loss, stats = fixmatch_loss(torch.zeros(1, 3, requires_grad=True), torch.tensor([0]), torch.zeros(2, 3),
                                torch.zeros(2, 3, requires_grad=True), 0.9, 1.0, y_u_true=torch.tensor([0, 0]))
    assert set(stats) == {"loss", "loss_x", "loss_u", "mask_rate", "pseudo_acc"}
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad and v.dim() == 0 for v in stats.values())
    assert loss.requires_grad
