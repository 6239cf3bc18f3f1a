"""MixMatch (Berthelot et al. 2019): its objective as short pure functions, its batch, its forward, and what the
training loop needs from it.

One step, in the paper's symbols (B labelled images, K = 2 weak views of each of muB unlabelled images, N = B + K muB
mixed rows; own_impl/train.py runs it):

    x, y_x, y_u, lam, perm, lambda_u = make_batch(...)   x = [x_hat; u_hat_1; u_hat_2], MixUp's numbers, the ramped
                                                         lambda_U(t): every random number of the step
    q = guess_labels([model(u_hat_k) for k], T)          (muB, C), no gradient, running statistics untouched
    x_mix, t_mix = mixup(x, [p; q; q], perm, lam)        X' = rows [:B], U' = rows [B:]
    logits = interleaved forward of x_mix                1 + K mu passes of B rows, as the official code and TorchSSL
    loss = mixmatch_loss(...) = L_X + lambda_U(t) L_U    then the loop's backward, SGD, EMA

The `usb` recipe follows USB's step where it differs (own_impl/recipes.py: the guess not renormalised, the mixed
chunks NOT interleaved, L_U averaged over classes then examples); the others are unchanged by it.

Settings by source (official code, TorchSSL's config, ours): docs/mixmatch.md.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from contract.spec import MIXMATCH_VIEWS, RunSpec
from own_impl.augment import WeakParams, sample_weak_params
from own_impl.data import DeviceData, Samplers, normalization_table, normalize, to_device
from own_impl.device import autocast
from own_impl.recipes import RECIPES

STATISTICS = ("loss", "loss_x", "loss_u", "lambda_u", "guess_acc", "mix_lambda")  # forward_loss's, in metrics.jsonl
SETTINGS = {  # how the algorithm is realised, for the report's side-by-side settings
    "label_guessing": "K = 2 weak views; mean of the live model's softmax over them, sharpened at T; no "
                      "gradient; one train-mode pass per view, BatchNorm running statistics untouched",
    "mixup_pairing": "one shuffle over Concat(labelled, view 1, view 2), inputs and targets mixed alike",
    "batchnorm_of_the_mixed_batch": "interleaved: 1 + K mu passes of B rows, each mixing labelled and "
                                    "unlabelled rows; running statistics from the first pass only",
    "unlabelled_loss": "squared error between softmax and mixed guesses, mean over examples and classes",
    "lambda_u_ramp_up": "linear from 0 at step 0 to lambda_u at step ramp_up x steps",
}
# draw_mixup_params draws enough rejection rounds that P(every round rejected) stays below this, for any alpha
MAX_REJECT_PROB = 1e-12


def sharpen(p: torch.Tensor, T: float) -> torch.Tensor:
    """Sharpen(p, T)_i = p_i^(1/T) / sum_j p_j^(1/T), over the last dimension. p (..., C): probabilities."""
    p_t = p.pow(1.0 / T)
    return p_t / p_t.sum(dim=-1, keepdim=True)


def guess_labels(logits_u_views: torch.Tensor | Sequence[torch.Tensor], T: float,
                 renormalise: bool = True) -> torch.Tensor:
    """q_b = Sharpen(q_bar_b, T), q_bar_b = 1/K sum_k p_model(y | u_hat_b,k): the guessed labels (muB, C), float32,
    detached.

    logits_u_views: (K, muB, C), or K tensors (muB, C): the model's logits on the K weak views of one unlabelled
    batch. Softmax and sharpening run in float32 whatever the logits' dtype, so bf16 logits give unrounded targets.
    renormalise: q_bar divided by its sum first, as TorchSSL (a no-op but for the last bit); USB leaves it out.
    """
    if not isinstance(logits_u_views, torch.Tensor):
        logits_u_views = torch.stack(list(logits_u_views))  # (K, muB, C)
    q_bar = torch.softmax(logits_u_views.detach(), dim=-1, dtype=torch.float32).mean(dim=0)  # (muB, C)
    if renormalise:
        q_bar = q_bar / q_bar.sum(dim=-1, keepdim=True)
    return sharpen(q_bar, T)


def draw_mixup_params(n: int, alpha: float, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu", per: str = "example") -> tuple[torch.Tensor, torch.Tensor]:
    """The random numbers of one MixUp over n rows: lam ~ Beta(alpha, alpha), and perm (n,) long.

    per "example": lam (n,) float32, n iid draws (the paper's and the official code's); "batch": lam 0-d float64, ONE
    draw for the batch (TorchSSL's np.random.beta), which mixup uses as TorchSSL uses its Python float.

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
    draws, dtype = (n, torch.float32) if per == "example" else (1, torch.float64)
    accept = math.exp(2 * math.lgamma(alpha + 1) - math.lgamma(2 * alpha + 1))
    rounds = 1 if accept >= 1 else max(1, math.ceil(math.log(MAX_REJECT_PROB) / math.log1p(-accept)))

    def log_uniform_root() -> torch.Tensor:  # log(U^(1/alpha)), (rounds, draws); 1 - rand lies in (0, 1]
        return torch.log1p(-torch.rand(rounds, draws, generator=generator, device=device, dtype=dtype)) / alpha

    log_x, log_y = log_uniform_root(), log_uniform_root()  # in logs: U^(1/alpha) underflows for small alpha
    accepted = torch.logaddexp(log_x, log_y) <= 0  # X + Y <= 1
    first = accepted.to(torch.uint8).argmax(dim=0, keepdim=True)  # (1, draws): first accepted round (0 if none)
    lam = torch.sigmoid(log_x - log_y).gather(0, first).squeeze(0)  # X / (X + Y), (draws,)
    perm = torch.randperm(n, generator=generator, device=device)
    return (lam if per == "example" else lam[0]), perm


def mixup(x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor,
          lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp of every row with a shuffled partner: x'_i = lam'_i x_i + (1 - lam'_i) x_perm(i), and the same for y.

    x (N, ...): W = Concat(x_hat, u_hat) (inputs); y (N, C): Concat(p, q, ..., q) (targets); perm (N,) long: the
    Shuffle; lam (N,) drawn from Beta(alpha, alpha), or 0-d for one lambda per batch (TorchSSL's way).
    lam' = max(lam, 1 - lam) >= 1/2 keeps row i closer to its own input, so rows [:B] are X' = MixUp(x_hat_i, W_i)
    and rows [B:] are U' = MixUp(u_hat_i, W_{i+B}). Computed as both references write it, lam' v + (1 - lam') v[perm]
    (official: x * mix + x[::-1] * (1 - mix); TorchSSL's mixup_one_target); a 0-d lam' is used as TorchSSL uses its
    Python float (1 - lam' in its own precision, each factor rounded to v's dtype).
    """
    n = x.shape[0]
    lam_p = torch.maximum(lam, 1 - lam)  # lam', (N,) or 0-d

    def mix(v: torch.Tensor) -> torch.Tensor:
        w = lam_p if lam_p.dim() == 0 else lam_p.to(v.dtype).view(n, *[1] * (v.dim() - 1))  # (N, 1, ...) per row
        return w * v + (1 - w) * v[perm]

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
                  lambda_u: float | torch.Tensor, loss_u_mean: str = "elements"
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = L_X + lambda_U(t) L_U on the mixed batch.

    logits_x, targets_x (B, C): the model on X' and X''s mixed soft targets; logits_u, targets_u (K muB, C): the same
    for U'. lambda_u: this step's weight, already ramped (lambda_U * linear_rampup(...)); a 0-d tensor keeps a
    compiled step from specialising on its value. Targets are detached here as well: no gradient reaches the
    guesses. Computed in float32. Statistics are detached 0-d float32 tensors on the logits' device.
    loss_u_mean: L_U's mean as one over all elements ("elements", F.mse_loss's, as the official code and TorchSSL),
    or over classes then over examples ("classes_then_rows", USB's consistency_loss): the same value, rounded
    differently.
    """
    if logits_x.shape != targets_x.shape or logits_u.shape != targets_u.shape:  # mse would broadcast silently
        raise ValueError(f"logits and targets differ in shape: x {tuple(logits_x.shape)} vs "
                         f"{tuple(targets_x.shape)}, u {tuple(logits_u.shape)} vs {tuple(targets_u.shape)}")
    # L_X = 1/|X'| sum_{x,p in X'} H(p, p_model(y | x; theta)): cross-entropy against soft targets, mean over B
    loss_x = (-targets_x.detach().float() * F.log_softmax(logits_x.float(), dim=-1)).sum(dim=-1).mean()
    # L_U = 1/(L |U'|) sum_{u,q in U'} ||q - p_model(y | u; theta)||_2^2: mean over examples AND classes
    probs_u, targets_u = torch.softmax(logits_u.float(), dim=-1), targets_u.detach().float()
    if loss_u_mean == "elements":
        loss_u = F.mse_loss(probs_u, targets_u)
    elif loss_u_mean == "classes_then_rows":
        loss_u = F.mse_loss(probs_u, targets_u, reduction="none").mean(dim=1).mean()
    else:
        raise ValueError(f"loss_u_mean {loss_u_mean!r} is not 'elements' or 'classes_then_rows'")
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


def keep_order(chunks: Sequence[torch.Tensor], batch: int) -> list[torch.Tensor]:
    """No interleaving (USB's MixMatch): the chunks as they come, X' first."""
    return list(chunks)


# ---------------------------------------------------------------------------------------------------------------
# The step: batch, forward, stand-ins


@functools.cache
def augmenter(recipe: str):
    """Weak augmentation and normalization of every image of a step: (B + K muB) uint8 images and their drawn flip
    and shift -> float32 input. The recipe's weak augmentation: flip then shift (paper, TorchSSL), or crop then flip
    (USB)."""
    apply_weak = RECIPES[recipe].weak_augment

    def augment_and_normalize(images: torch.Tensor, p_weak: WeakParams, table: torch.Tensor,
                              channels_last: bool) -> torch.Tensor:
        return normalize(apply_weak(images, p_weak), channels_last, table)

    return augment_and_normalize


def make_batch(data: DeviceData, samplers: Samplers, spec: RunSpec, step: int, augment_fn=None) -> tuple:
    """(x, y_x, y_u, lam, perm, lambda_u); step: the optimizer steps done before this one. Draws, in order: the
    labelled then unlabelled indices, the weak augmentation of the B + K muB images (independent per row: K distinct
    views), lam, perm. lambda_u is a 0-d tensor, so a compiled step does not specialise on it as it ramps."""
    device = data.train_x.device
    n_x, n_u = spec.batch_size, spec.batch_size * spec.uratio
    idx = to_device(torch.cat([samplers.labelled.next(n_x), samplers.unlabelled.next(n_u)]), device)
    idx_x, idx_u = idx[:n_x], idx[n_x:]  # (B,), (muB,)
    images = data.train_x[torch.cat([idx_x] + [idx_u] * MIXMATCH_VIEWS)]  # (N, 3, H, W): x_b, then u_b K times
    p_weak = sample_weak_params(len(images), samplers.augment, device)
    recipe = RECIPES[spec.recipe]
    x = (augment_fn or augmenter(spec.recipe))(images, p_weak, normalization_table(device, recipe.normalization),
                                               spec.channels_last)
    lam, perm = draw_mixup_params(len(images), spec.mixup_alpha, samplers.augment, device,
                                  per=recipe.mixup_lambda_per)
    ramped = spec.lambda_u * linear_rampup(step, spec.steps, spec.ramp_up)  # TorchSSL's formula, in float64
    lambda_u = to_device(torch.tensor(ramped, dtype=torch.float32), device)
    return x, data.train_y[idx_x], data.train_y[idx_u], lam, perm, lambda_u


def forward_with_scratch_statistics(model: torch.nn.Module, scratch: dict[str, torch.Tensor],
                                    x: torch.Tensor) -> torch.Tensor:
    """model(x) in its current (train) mode, BatchNorm's running statistics read from and written to `scratch`
    (copies of its buffers, dropped after the step) instead of its own; parameters and gradients are the model's."""
    return torch.func.functional_call(model, scratch, (x,))


def forward_loss(model: torch.nn.Module, x: torch.Tensor, y_x: torch.Tensor, y_u: torch.Tensor, lam: torch.Tensor,
                 perm: torch.Tensor, lambda_u: torch.Tensor, spec: RunSpec) -> tuple[torch.Tensor, dict]:
    """Guess, sharpen, mix, the interleaved forward of the mixed batch, then the loss.

    x (N, 3, H, W) = [x_hat; u_hat_1; u_hat_2]; y_x (B,) labels; y_u (muB,) the unlabelled images' true labels, for
    the guess_acc diagnostic only; lam, perm (N,) MixUp's numbers; lambda_u 0-d: this step's ramped weight.
    The recipe's MixMatch fields choose: the guess renormalised or not, the chunks interleaved or not (USB: the
    mixed rows in order, so the first pass sees X' alone), L_U's reduction."""
    recipe = RECIPES[spec.recipe]
    b, n_u = y_x.shape[0], y_u.shape[0]
    scratch = {name: buf.clone() for name, buf in model.named_buffers()}  # running statistics the step drops
    with torch.no_grad(), autocast(spec, x.device):
        views = [forward_with_scratch_statistics(model, scratch, v) for v in x[b:].split(n_u)]  # K x (muB, C)
    q = guess_labels(views, spec.temperature, recipe.mixmatch_renormalise_guess)  # (muB, C) float32, no gradient
    targets = torch.cat([F.one_hot(y_x, spec.num_classes).float()] + [q] * MIXMATCH_VIEWS)  # (N, C): p, q, q
    x_mix, t_mix = mixup(x, targets, perm, lam)  # rows [:B] are X', rows [B:] are U'
    # 1 + K mu chunks of B rows, each mixing X' and U' rows when interleaved
    order = interleave if recipe.mixmatch_interleave else keep_order
    chunks = order(list(x_mix.split(b)), b)
    with autocast(spec, x.device):
        logits = [model(chunks[0])]  # the one pass that updates the running statistics
        logits += [forward_with_scratch_statistics(model, scratch, c) for c in chunks[1:]]
    logits = torch.cat(order(logits, b)).float()  # (N, C), rows back in x_mix's order; the loss in fp32
    loss, stats = mixmatch_loss(logits[:b], t_mix[:b], logits[b:], t_mix[b:], lambda_u, recipe.mixmatch_loss_u_mean)
    stats["guess_acc"] = (q.argmax(dim=-1) == y_u).float().mean()  # guessed label (argmax q) = true label
    stats["mix_lambda"] = torch.maximum(lam, 1 - lam).mean().float()  # mean lambda': weight of each row's own input
    return loss, stats


def stand_ins(spec: RunSpec, image_shape: torch.Size, device: torch.device) -> tuple[tuple, tuple]:
    """Zeros of a step's shapes, to compile on: (augment_fn's arguments, forward_loss's inputs); the augmentation's
    and MixUp's numbers from a throwaway generator."""
    n_x, n_u = spec.batch_size, spec.batch_size * spec.uratio
    n = n_x + MIXMATCH_VIEWS * n_u
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.zeros((n, *image_shape), dtype=torch.uint8, device=device)
    recipe = RECIPES[spec.recipe]
    table = normalization_table(device, recipe.normalization)
    augment_args = (images, sample_weak_params(n, g, device), table, spec.channels_last)
    lam, perm = draw_mixup_params(n, spec.mixup_alpha, g, device, per=recipe.mixup_lambda_per)
    inputs = (normalize(images, spec.channels_last, table), torch.zeros(n_x, dtype=torch.int64, device=device),
              torch.zeros(n_u, dtype=torch.int64, device=device), lam, perm,
              torch.tensor(float(spec.lambda_u), device=device))
    return augment_args, inputs
