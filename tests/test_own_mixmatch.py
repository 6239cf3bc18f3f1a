"""own_impl.mixmatch on hand-made tensors, against values worked out by hand and closed-form distributions."""
import math

import pytest
import torch
import torch.nn.functional as F

from own_impl.mixmatch import (draw_mixup_params, guess_labels, interleave, linear_rampup, mixmatch_loss, mixup,
                               sharpen)

LN2, LN3 = math.log(2.0), math.log(3.0)


def test_loss_worked_out_by_hand():
    # Two classes (L = 2). Logits (0, ln 3) give p = (1/4, 3/4); (0, 0) give (1/2, 1/2); (ln 3, 0) give (3/4, 1/4).
    logits_x = torch.tensor([[0.0, LN3], [0.0, 0.0]])
    targets_x = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    # H((1/2, 1/2), (1/4, 3/4)) = -(ln 1/4 + ln 3/4) / 2 = (4 ln 2 - ln 3) / 2;  H((1, 0), (1/2, 1/2)) = ln 2
    loss_x = ((4 * LN2 - LN3) / 2 + LN2) / 2  # mean over |X'| = 2
    logits_u = torch.tensor([[0.0, LN3], [0.0, 0.0], [LN3, 0.0]])
    targets_u = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.75, 0.25]])
    # ||q - p||^2 per row: (1/4)^2 + (1/4)^2 = 1/8;  (1/2)^2 + (1/2)^2 = 1/2;  0.  Sum 5/8 over L |U'| = 2 * 3 = 6
    loss_u = 5 / 48  # (a mean over examples only would be 5/24)
    loss, stats = mixmatch_loss(logits_x, targets_x, logits_u, targets_u, lambda_u=4.8)
    assert math.isclose(stats["loss_x"].item(), loss_x, rel_tol=1e-6)
    assert math.isclose(stats["loss_u"].item(), loss_u, rel_tol=1e-6)
    assert math.isclose(loss.item(), loss_x + 4.8 * 5 / 48, rel_tol=1e-6)  # = loss_x + 0.5
    assert math.isclose(stats["lambda_u"].item(), 4.8, rel_tol=1e-6)


def test_loss_matches_torchssl_formulas_on_random_inputs():
    # TorchSSL: ce_loss(use_hard_labels=False).mean() and F.mse_loss(softmax, targets, reduction='mean').
    g = torch.Generator().manual_seed(0)
    lx, lu = torch.randn(6, 10, generator=g), 3 * torch.randn(12, 10, generator=g)
    tx = torch.softmax(torch.randn(6, 10, generator=g), -1)
    tu = torch.softmax(torch.randn(12, 10, generator=g), -1)
    _, stats = mixmatch_loss(lx, tx, lu, tu, lambda_u=torch.tensor(100.0))
    ref_x = torch.sum(-tx * F.log_softmax(lx, dim=-1), dim=1).mean()
    ref_u = F.mse_loss(torch.softmax(lu, dim=-1), tu, reduction="mean")
    assert torch.allclose(stats["loss_x"], ref_x, rtol=1e-6)
    assert torch.allclose(stats["loss_u"], ref_u, rtol=1e-6)
    assert torch.allclose(stats["loss"], ref_x + 100 * ref_u, rtol=1e-6)


def test_guess_labels_by_hand():
    # View 1 (0, ln 3) -> (1/4, 3/4), view 2 (0, 0) -> (1/2, 1/2): mean (3/8, 5/8); squared (9, 25)/64 -> (9, 25)/34
    views = [torch.tensor([[0.0, LN3]]), torch.tensor([[0.0, 0.0]])]
    expected = torch.tensor([[9 / 34, 25 / 34]])
    assert torch.allclose(guess_labels(views, T=0.5), expected, atol=1e-7)
    stacked = torch.stack(views).to(torch.bfloat16)  # (K, muB, C); (0, ln 3) is not exact in bf16
    q = guess_labels(stacked, T=0.5)
    assert q.dtype == torch.float32 and q.shape == (1, 2)
    assert torch.allclose(q, expected, atol=2e-3)


def test_sharpen():
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(2 * torch.randn(64, 10, generator=g), dim=-1)
    s = sharpen(p, 0.5)
    assert torch.allclose(s.sum(-1), torch.ones(64), atol=1e-6)
    def entropy(d):
        return -(d * d.log()).sum(-1)

    assert torch.all(entropy(s) < entropy(p))  # T < 1 lowers the entropy of every non-uniform row
    assert torch.equal(s.argmax(-1), p.argmax(-1))
    assert torch.allclose(sharpen(p, 1.0), p, atol=1e-7)  # T = 1: identity
    uniform = torch.full((1, 4), 0.25)
    assert torch.allclose(sharpen(uniform, 0.5), uniform)
    # (0.2, 0.8) at T = 1/2: (0.04, 0.64) / 0.68
    assert torch.allclose(sharpen(torch.tensor([0.2, 0.8]), 0.5), torch.tensor([0.04 / 0.68, 0.64 / 0.68]))


def test_mixup_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    perm = torch.tensor([1, 0])
    lam = torch.tensor([0.25, 0.9])  # lam' = max(lam, 1 - lam) = (0.75, 0.9)
    xm, ym = mixup(x, y, perm, lam)
    # row 0: 0.75 (1, 2) + 0.25 (3, 4) = (1.5, 2.5);  row 1: 0.9 (3, 4) + 0.1 (1, 2) = (2.8, 3.8)
    assert torch.allclose(xm, torch.tensor([[1.5, 2.5], [2.8, 3.8]]))
    assert torch.allclose(ym, torch.tensor([[0.75, 0.25], [0.1, 0.9]]))


def test_mixup_weight_on_own_row_is_at_least_half():
    # x = identity rows: mixed row i holds lam'_i at column i and 1 - lam'_i at column perm(i).
    lam = torch.tensor([0.0, 0.2, 0.5, 0.7, 1.0])
    perm = torch.tensor([1, 2, 3, 4, 0])  # no fixed point
    xm, _ = mixup(torch.eye(5), torch.eye(5), perm, lam)
    own = xm.diagonal()
    assert torch.allclose(own, torch.tensor([1.0, 0.8, 0.5, 0.7, 1.0]))
    assert torch.all(own >= 0.5)
    assert torch.allclose(xm[torch.arange(5), perm], 1 - own)
    lam_drawn, _ = draw_mixup_params(1000, 0.5, torch.Generator().manual_seed(2))
    xm, _ = mixup(torch.eye(1000), torch.eye(1000), torch.roll(torch.arange(1000), 1), lam_drawn)
    assert torch.all(xm.diagonal() >= 0.5)


def test_mixup_returns_inputs_when_lambda_is_one_or_perm_is_identity():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, 4, 4, generator=g)  # (N, C, H, W) images
    y = torch.softmax(torch.randn(6, 10, generator=g), -1)
    perm = torch.randperm(6, generator=g)
    for lam in (torch.ones(6), torch.zeros(6), torch.tensor(1.0, dtype=torch.float64)):  # lam' = 1, per row or batch
        xm, ym = mixup(x, y, perm, lam)
        assert torch.equal(xm, x) and torch.equal(ym, y)  # 1 * v + 0 * v[perm] is v exactly
    # lam' v + (1 - lam') v, the references' expression, is v within one rounding
    xm, ym = mixup(x, y, torch.arange(6), torch.rand(6, generator=g))
    torch.testing.assert_close(xm, x, rtol=2e-7, atol=1e-7)
    torch.testing.assert_close(ym, y, rtol=2e-7, atol=1e-7)


def test_mixup_with_one_batch_lambda_is_torchssls_expression_bit_for_bit():
    """A 0-d float64 lambda is used as TorchSSL's mixup_one_target uses its Python float: lam * x + (1 - lam) *
    x[index], each factor rounded to float32."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 3, 4, 4, generator=g), torch.softmax(torch.randn(8, 10, generator=g), -1)
    perm = torch.randperm(8, generator=g)
    lam = 0.3141592653589793  # lam' = 1 - lam, computed in float64 as Python computes max(lam, 1 - lam)
    xm, ym = mixup(x, y, perm, torch.tensor(lam, dtype=torch.float64))
    lam_p = max(lam, 1 - lam)
    assert torch.equal(xm, lam_p * x + (1 - lam_p) * x[perm]) and torch.equal(ym, lam_p * y + (1 - lam_p) * y[perm])


def test_mixup_one_lambda_per_batch():
    x = torch.tensor([[0.0], [10.0]])
    xm, _ = mixup(x, x, torch.tensor([1, 0]), torch.tensor(0.3))  # 0-d: lam' = 0.7 for every row
    assert torch.allclose(xm, torch.tensor([[3.0], [7.0]]))


def test_draw_mixup_params_distribution_and_determinism():
    n = 20000
    lam, perm = draw_mixup_params(n, 0.5, torch.Generator().manual_seed(4))
    lam2, perm2 = draw_mixup_params(n, 0.5, torch.Generator().manual_seed(4))
    assert torch.equal(lam, lam2) and torch.equal(perm, perm2)  # the generator is the only source
    assert torch.equal(perm.sort().values, torch.arange(n))
    assert lam.dtype == torch.float32 and torch.all((lam >= 0) & (lam <= 1))

    def ks(sample, cdf):  # Kolmogorov-Smirnov distance to a closed-form CDF
        s = sample.double().sort().values
        f = cdf(s)
        i = torch.arange(1, len(s) + 1, dtype=torch.float64)
        return max((i / len(s) - f).max().item(), (f - (i - 1) / len(s)).max().item())

    # Beta(1/2, 1/2) is the arcsine law, F(x) = 2/pi asin(sqrt x); Beta(1, 1) is uniform. 1.63/sqrt(n) ~ 1% level.
    assert ks(lam, lambda s: 2 / math.pi * torch.asin(s.sqrt())) < 1.63 / math.sqrt(n)
    uni, _ = draw_mixup_params(n, 1.0, torch.Generator().manual_seed(5))
    assert ks(uni, lambda s: s) < 1.63 / math.sqrt(n)
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)) = 0.1 at a = 0.75
    b, _ = draw_mixup_params(n, 0.75, torch.Generator().manual_seed(6))
    assert abs(b.mean().item() - 0.5) < 0.01 and abs(b.var().item() - 0.1) < 0.005
    with pytest.raises(ValueError):
        draw_mixup_params(4, 0.0)
    # one lambda per batch: a 0-d float64 (TorchSSL's np.random.beta), from the same law
    g = torch.Generator().manual_seed(7)
    per_batch = [draw_mixup_params(6, 0.5, g, per="batch") for _ in range(4000)]
    assert all(lam.dim() == 0 and lam.dtype == torch.float64 and len(p) == 6 for lam, p in per_batch)
    assert ks(torch.stack([lam for lam, _ in per_batch]), lambda s: 2 / math.pi * torch.asin(s.sqrt())) < 0.026


def test_linear_rampup():
    assert linear_rampup(0, 100, 0.4) == 0.0
    assert linear_rampup(10, 100, 0.4) == 0.25
    assert linear_rampup(20, 100, 0.4) == 0.5
    assert linear_rampup(40, 100, 0.4) == 1.0
    assert linear_rampup(41, 100, 0.4) == 1.0 and linear_rampup(10**6, 100, 0.4) == 1.0
    assert linear_rampup(8192, 2**20, 1 / 64) == 0.5  # the official 16,384-step ramp at its 2^20 steps
    assert linear_rampup(0, 100, 0.0) == 1.0  # no ramp


def test_no_gradient_through_targets_and_gradient_on_logits():
    torch.manual_seed(0)
    views = torch.randn(2, 4, 10, requires_grad=True)  # (K, muB, C): the guessing forward's logits
    q = guess_labels(views, T=0.5)
    targets = torch.cat([F.one_hot(torch.tensor([1, 2]), 10).float(), q, q])  # (B + K muB, C) = (10, 10)
    _, t_mix = mixup(torch.zeros(10, 1), targets, torch.randperm(10), torch.rand(10))
    logits = torch.randn(10, 10, requires_grad=True)  # the mixed forward's logits
    loss, _ = mixmatch_loss(logits[:2], t_mix[:2], logits[2:], t_mix[2:], lambda_u=75.0)
    loss.backward()
    assert views.grad is None  # the guesses are targets only
    assert torch.all(logits.grad.abs().sum(dim=1) > 0)  # every row, labelled and unlabelled, gets a gradient

    # targets that still carry a graph are detached by the loss itself
    src = torch.randn(3, 10, requires_grad=True)
    lu = torch.randn(3, 10, requires_grad=True)
    loss, _ = mixmatch_loss(torch.zeros(1, 10), torch.softmax(src[:1], -1), lu, torch.softmax(src, -1), 1.0)
    loss.backward()
    assert src.grad is None and lu.grad.abs().sum() > 0


def test_stats_are_detached_tensors_and_shapes_are_checked():
    loss, stats = mixmatch_loss(torch.zeros(2, 3, requires_grad=True), torch.full((2, 3), 1 / 3),
                                torch.zeros(4, 3, requires_grad=True), torch.full((4, 3), 1 / 3), torch.tensor(2.0))
    assert set(stats) == {"loss", "loss_x", "loss_u", "lambda_u"}
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad and v.dim() == 0 for v in stats.values())
    assert loss.requires_grad and stats["lambda_u"].item() == 2.0
    with pytest.raises(ValueError):
        mixmatch_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(1, 3), 1.0)


def test_interleave_by_hand_and_inverse():
    # batch 4, three chunks: groups of sizes (1, 1, 2); group i of chunk 0 swaps with group i of chunk i
    a, b, c = torch.tensor([0, 1, 2, 3]), torch.tensor([10, 11, 12, 13]), torch.tensor([20, 21, 22, 23])
    out = interleave([a, b, c], 4)
    assert [o.tolist() for o in out] == [[0, 11, 22, 23], [10, 1, 12, 13], [20, 21, 2, 3]]
    assert all(torch.equal(x, y) for x, y in zip(interleave(out, 4), [a, b, c]))
    # batch 5, three chunks: sizes (1, 2, 2), the remainder on the last groups
    chunks = [torch.arange(5) + 10 * k for k in range(3)]
    out = interleave(chunks, 5)
    assert out[0].tolist() == [0, 11, 12, 23, 24]
    assert all(torch.equal(x, y) for x, y in zip(interleave(out, 5), chunks))
