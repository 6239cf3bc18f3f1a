"""The MixMatch objective (Berthelot et al. 2019, section 3 and Algorithm 1) as short pure functions of tensors.

One training step, in the paper's symbols (B labelled images, K weak views of each of muB unlabelled images, L = C
classes, N = B + K muB mixed rows):

    x_hat (B, ...) = Augment(x_b), p (B, C) one-hot labels;  u_hat_k (muB, ...) = Augment(u_b), k = 1..K
    q = guess_labels([model(u_hat_k) for k], T)        (muB, C), no gradient: Sharpen(1/K sum_k p_model(y|u_hat_b,k))
    W = Concat(x_hat, u_hat_1, ..., u_hat_K) (N, ...), targets Concat(p, q, ..., q) (N, C)
    lam, perm = draw_mixup_params(N, alpha, generator)          the only random numbers, from the caller's generator
    x_mix, t_mix = mixup(W, targets, perm, lam)                 X' = rows [:B], U' = rows [B:]
    logits = model(x_mix)                                       (N, C); see "BatchNorm" below
    loss, stats = mixmatch_loss(logits[:B], t_mix[:B], logits[B:], t_mix[B:],
                                lambda_u * linear_rampup(step, steps, ramp_up))

Everything here but draw_mixup_params is deterministic; all of it runs on any device.

Settings for CIFAR-10, as each source sets them (official = google-research/mixmatch: mixmatch.py, libml/, README,
runs/*.sh; TorchSSL = config/mixmatch/mixmatch_cifar10_{40,250,4000}_0.yaml and the code they drive):

    symbol     meaning                  official code                          TorchSSL
    B          labelled batch           64 (flag batch)                        batch_size 64
    muB        unlabelled batch         B (same `batch`)                       uratio 1
    K          weak views per u_b       2 (flag nu, asserted)                  2 (BasicDataset alg='mixmatch')
    T          sharpening temperature   0.5 (fixed in model())                 T 0.5
    alpha      Beta(alpha, alpha)       0.75 (README, runs/; flag default 0.5) alpha 0.5
    lambda_U   weight of L_U            75 (README, runs/; flag default 100)   ulb_loss_ratio 100
    ramp-up    lambda_U from 0          16,384 steps (warmup_kimg 1024 at B    ramp_up 0.4 of num_train_iter
                                        64) = 1/64 of the run                  (419,430 steps; argparse default 1/64)
    steps      optimizer steps          2^20 (train_kimg 2^16 at B 64)         num_train_iter 2^20
    optimizer                           Adam, lr 0.002, constant               SGD lr 0.03, momentum 0.9, Nesterov,
                                                                               lr * cos(7 pi k / 16 K)
    decay      weight decay             decoupled: kernels *= 1 - 0.02 * lr    5e-4 L2 in the gradient, not on
                                        after each step (4e-5 per step)        BatchNorm weights or biases
    EMA        evaluated weights        0.999, trainable variables             ema_m 0.999, parameters only
    lambda     MixUp draws              one per example (Beta [N, 1, 1, 1])    ONE per batch (np.random.beta)
    L_U        normalisation            reduce_mean over examples AND classes  F.mse_loss mean: the same
    reported                            median of the last 20 checkpoints      best test accuracy

The paper (section 4.1) gives T = 0.5, K = 2 and, for CIFAR-10, alpha = 0.75 and lambda_U = 75 with the ramp-up over
the first 16,000 steps, matching the official code; those numbers were checked against the code here, not re-read
in the paper.

Conventions kept here, the paper's and the official code's: one lambda per example, lambda' = max(lambda,
1 - lambda); L_U = 1/(L |U'|) sum ||q - p_model||^2, a mean over examples and classes (TorchSSL's mse_loss agrees);
L_X = mean over B of the cross-entropy against soft targets; the ramp-up counts steps from 0 (the steps done before
this one), as TorchSSL's `self.it` and the official global step do.

BatchNorm. The official code runs the mixed batch as 1 + K forward passes of B rows each and, so that each pass sees
both kinds of data, first interleaves them (`interleave` below: chunk 0 is X' with a proportional slice of every
U' chunk swapped in, and so on), keeps only chunk 0's update of the running statistics, and interleaves the logits
back. Without it, the pass over X' alone would normalise labelled rows by labelled-only batch statistics, and the
running statistics used at evaluation would be X''s alone although U' (K muB rows) is most of the batch. TorchSSL
copies this (models/mixmatch/mixmatch.py:146-160, its Bn_Controller restoring the buffers after chunk 0). A
training step here should either (a) do the same: interleave into 1 + K muB / B chunks of B rows, forward each,
keep chunk 0's running-statistics update, interleave the logits back; or (b) run ONE forward over all N mixed rows:
every row is then normalised by statistics of the whole mix, which is what interleaving approximates, from N rows
instead of B, with one running-statistics update from all of them. Either way the label-guessing forward runs in
training mode (batch statistics: official classifier(training=True), TorchSSL model.train()) without gradient and
must NOT update the running statistics (official: its update ops are skipped; TorchSSL: buffers saved and
restored); both references guess with one forward per view (muB rows each). Our step (own_impl/algorithms.py) does
(a), with one forward per view for the guesses.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# draw_mixup_params draws enough rejection rounds that P(every round rejected) stays below this, for any alpha
MAX_REJECT_PROB = 1e-12


def sharpen(p: torch.Tensor, T: float) -> torch.Tensor:
    """Sharpen(p, T)_i = p_i^(1/T) / sum_j p_j^(1/T), over the last dimension. p (..., C): probabilities."""
    p_t = p.pow(1.0 / T)
    return p_t / p_t.sum(dim=-1, keepdim=True)


def guess_labels(logits_u_views: torch.Tensor | Sequence[torch.Tensor], T: float) -> torch.Tensor:
    """q_b = Sharpen(q_bar_b, T), q_bar_b = 1/K sum_k p_model(y | u_hat_b,k): the guessed labels (muB, C), float32,
    detached.

    logits_u_views: (K, muB, C), or K tensors (muB, C): the model's logits on the K weak views of one unlabelled
    batch. Softmax and sharpening run in float32 whatever the logits' dtype, so bf16 logits give unrounded targets.
    """
    if not isinstance(logits_u_views, torch.Tensor):
        logits_u_views = torch.stack(list(logits_u_views))  # (K, muB, C)
    q_bar = torch.softmax(logits_u_views.detach(), dim=-1, dtype=torch.float32).mean(dim=0)  # (muB, C)
    return sharpen(q_bar, T)


def draw_mixup_params(n: int, alpha: float, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu", per: str = "example") -> tuple[torch.Tensor, torch.Tensor]:
    """The random numbers of one MixUp over n rows: lam (n,) float32 ~ Beta(alpha, alpha), and perm (n,) long.

    per "example": n iid draws (the paper's and the official code's); "batch": ONE draw repeated over the n rows
    (TorchSSL's), drawn the same way, so both have one shape and a compiled step serves either.

    torch's Beta sampler takes no generator, so lam comes from Johnk's method, which needs only uniforms: with
    X = U^(1/alpha), Y = V^(1/alpha), X / (X + Y) given X + Y <= 1 is Beta(alpha, alpha). Enough rounds for
    P(all rejected) < MAX_REJECT_PROB (acceptance Gamma(alpha+1)^2 / Gamma(2 alpha+1): pi/4 at alpha 0.5, 18 rounds;
    0.64 at 0.75, 28 rounds) are drawn at once and the first accepted one is taken, so the generator always advances
    by the same amount (a resumed run replays it) and nothing waits on the device. `generator` lives on `device`.
    """
    if alpha <= 0:
        raise ValueError(f"MixUp needs alpha > 0 for Beta(alpha, alpha); got {alpha}")
    if per not in ("example", "batch"):
        raise ValueError(f"one lambda per {per!r} is not accepted; accepted: 'example', 'batch'")
    draws = n if per == "example" else 1
    accept = math.exp(2 * math.lgamma(alpha + 1) - math.lgamma(2 * alpha + 1))
    rounds = 1 if accept >= 1 else max(1, math.ceil(math.log(MAX_REJECT_PROB) / math.log1p(-accept)))
    # In logs (U^(1/alpha) underflows for small alpha); 1 - rand lies in (0, 1], so every log is finite.
    log_x = torch.log1p(-torch.rand(rounds, draws, generator=generator, device=device)) / alpha  # (rounds, draws)
    log_y = torch.log1p(-torch.rand(rounds, draws, generator=generator, device=device)) / alpha
    accepted = torch.logaddexp(log_x, log_y) <= 0  # X + Y <= 1
    first = accepted.to(torch.uint8).argmax(dim=0, keepdim=True)  # (1, draws): first accepted round (0 if none)
    lam = torch.sigmoid(log_x - log_y).gather(0, first).squeeze(0).expand(n).contiguous()  # X / (X + Y), (n,)
    perm = torch.randperm(n, generator=generator, device=device)
    return lam, perm


def mixup(x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor,
          lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp of every row with a shuffled partner: x'_i = lam'_i x_i + (1 - lam'_i) x_perm(i), and the same for y.

    x (N, ...): W = Concat(x_hat, u_hat) (inputs); y (N, C): Concat(p, q, ..., q) (targets); perm (N,) long: the
    Shuffle; lam (N,) drawn from Beta(alpha, alpha), or 0-d for one lambda per batch (TorchSSL's way).
    lam' = max(lam, 1 - lam) >= 1/2 keeps row i closer to its own input, so rows [:B] are X' = MixUp(x_hat_i, W_i)
    and rows [B:] are U' = MixUp(u_hat_i, W_{i+B}). lam' = 1 or perm(i) = i return row i exactly (lerp computes
    end - (end - start) (1 - w) for w >= 1/2).
    """
    n = x.shape[0]
    lam_p = torch.maximum(lam, 1 - lam).expand(n)  # (N,) lam'

    def mix(v: torch.Tensor) -> torch.Tensor:
        w = lam_p.to(v.dtype).view(n, *[1] * (v.dim() - 1))  # (N, 1, ...) broadcast over the row
        return torch.lerp(v[perm], v, w)  # v[perm] + w (v - v[perm])

    return mix(x), mix(y)


def linear_rampup(step: int, total_steps: int, ramp_up_fraction: float) -> float:
    """lambda_U(step) / lambda_U: 0 at step 0, rising linearly to 1 at step ramp_up_fraction * total_steps, 1 after.

    step: the steps done before this one (0 on the first). TorchSSL computes exactly
    clip(it / (ramp_up * num_train_iter), 0, 1) (models/mixmatch/mixmatch.py:167); the official code
    clip(images_seen / (warmup_kimg * 1024), 0, 1), i.e. ramp_up_fraction = 16384 / 2^20 = 1/64 for its run.
    A fraction of 0 means no ramp (where TorchSSL would divide by zero).
    """
    ramp_steps = ramp_up_fraction * total_steps
    if ramp_steps <= 0:
        return 1.0
    return min(max(step / ramp_steps, 0.0), 1.0)


def mixmatch_loss(logits_x: torch.Tensor, targets_x: torch.Tensor, logits_u: torch.Tensor, targets_u: torch.Tensor,
                  lambda_u: float | torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = L_X + lambda_U(t) L_U on the mixed batch.

    logits_x, targets_x (B, C): the model on X' and X''s mixed soft targets; logits_u, targets_u (K muB, C): the same
    for U'. lambda_u: this step's weight, already ramped (lambda_U * linear_rampup(...)); a 0-d tensor keeps a
    compiled step from specialising on its value. Targets are detached here as well: no gradient reaches the
    guesses. Computed in float32. Statistics are detached 0-d float32 tensors on the logits' device.
    """
    if logits_x.shape != targets_x.shape or logits_u.shape != targets_u.shape:  # mse would broadcast silently
        raise ValueError(f"logits and targets differ in shape: x {tuple(logits_x.shape)} vs "
                         f"{tuple(targets_x.shape)}, u {tuple(logits_u.shape)} vs {tuple(targets_u.shape)}")
    # L_X = 1/|X'| sum_{x,p in X'} H(p, p_model(y | x; theta)): cross-entropy against soft targets, mean over B
    loss_x = F.cross_entropy(logits_x.float(), targets_x.detach().float())
    # L_U = 1/(L |U'|) sum_{u,q in U'} ||q - p_model(y | u; theta)||_2^2: mean over examples AND classes
    loss_u = (torch.softmax(logits_u.float(), dim=-1) - targets_u.detach().float()).square().mean()
    loss = loss_x + lambda_u * loss_u

    lam_u = lambda_u.detach() if isinstance(lambda_u, torch.Tensor) else torch.tensor(float(lambda_u))
    stats = {"loss": loss.detach(), "loss_x": loss_x.detach(), "loss_u": loss_u.detach(),
             "lambda_u": lam_u.to(device=loss.device, dtype=torch.float32)}  # the ramped weight used this step
    return loss, stats


def interleave(chunks: Sequence[torch.Tensor], batch: int) -> list[torch.Tensor]:
    """The official code's BatchNorm interleave (libml/layers.py; TorchSSL's MixMatch.interleave is the same).

    chunks: 1 + n tensors of `batch` rows each (X' first, then U' cut into chunks of B rows). Each is cut into n + 1
    near-equal groups of rows; group i of chunk 0 is swapped with group i of chunk i, so every chunk holds rows of
    each input. It is its own inverse: interleave the inputs, forward each chunk, interleave the logits back.
    """
    n = len(chunks) - 1
    sizes = [batch // (n + 1)] * (n + 1)
    for i in range(batch - sum(sizes)):  # the remainder goes to the last groups, one row each
        sizes[-i - 1] += 1
    groups = [list(c.split(sizes)) for c in chunks]
    for i in range(1, n + 1):
        groups[0][i], groups[i][i] = groups[i][i], groups[0][i]
    return [torch.cat(g) for g in groups]
