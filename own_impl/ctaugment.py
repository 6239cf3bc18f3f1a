"""CTAugment (FixMatch's other strong augmentation) as batched ops on uint8 image tensors: its bin rates, its policy
draws, its ops and their Cutout, and its rate update, ported from the official code.

Official code: google-research/fixmatch at d4985a1. Every constant and rule, and where it comes from
(ct = libml/ctaugment.py, tr = cta/lib/train.py, fm = fixmatch.py, au = libml/augment.py, data = libml/data.py;
long cells wrap onto the next line):

| what                     | value / rule                                                     | where                  |
|--------------------------|------------------------------------------------------------------|------------------------|
| ops                      | the 19 registered, in registration order (OPS below)             | ct:104-219             |
| bins per parameter       | 17, except posterize 8 and rescale (17, 6); identity none        | ct:104-219             |
| initial rates            | 1.0 in every bin, float32                                        | ct:48-50               |
| depth                    | 2 ops per image, each uniform over the 19, with replacement      | tr:26; ct:68-70        |
| decay                    | 0.99                                                             | tr:27                  |
| threshold                | 0.80, the flag FixMatch runs with (the class default 0.85 is not | tr:28,43; README:148   |
|                          | used)                                                            |                        |
| rate_to_p                | p = (rate + (1 - decay)) / max, then p < threshold -> 0; float32 | ct:52-56               |
| training draw            | per parameter: bin ~ p / sum(p), level = (bin + U[0, 1)) /       | ct:68-78               |
|                          | n_bins                                                           |                        |
| probe draw               | per parameter: level = U[0, 1); the rates play no part           | ct:61-67               |
| credited bin             | int(level * n_bins * 0.999)                                      | ct:83                  |
| update                   | rate[bin] = rate[bin] * decay + proximity * (1 - decay), per     | ct:80-84; tr:72-76     |
|                          | image, op, param                                                 |                        |
| proximity                | 1 - 0.5 * sum_k abs(softmax_k - onehot_k), which is              | tr:71-76               |
|                          | softmax[label]                                                   |                        |
| probe predictions        | softmax of the EMA model in eval mode (classify_op), no gradient | fm:138; tr:65-69       |
| autocontrast, equalize,  | Image.blend(x, op(x), level)                                     | ct:96,104-106,145-152  |
| invert                   |                                                                  |                        |
| blur, smooth             | Image.blend(x, x.filter(BLUR or SMOOTH), level)                  | ct:100,109-111,199-201 |
| brightness, color,       | ImageEnhance factor 0.1 + 1.9 level, in [0.1, 2)                 | ct:92,114-126,182-184  |
| contrast, sharpness      |                                                                  |                        |
| cutout (an op)           | side 1 + int(level * min(H, W) * 0.499), gray 127, centre        | ct:129-142             |
|                          | uniform                                                          |                        |
| posterize                | bits kept = 1 + int(level * 7.999), 1..8                         | ct:160-163             |
| rescale                  | crop 0.25 level off each side, resize back with                  | ct:166-173             |
|                          | RESCALE_METHODS[int(level2 * 5.99)]                              |                        |
| rotate                   | int(np.round((2 level - 1) * 45)) degrees, NEAREST, black fill   | ct:176-179             |
| shear_x, shear_y         | (2 level - 1) * 0.3, NEAREST affine about the top-left corner    | ct:187-196             |
| solarize                 | threshold int(level * 255.999): levels >= it are inverted        | ct:204-207             |
| translate_x, translate_y | (2 level - 1) * 0.3 PIXELS, NEAREST: the identity, see below     | ct:210-219             |
| Cutout after the policy  | the cutout op at level 1: side 16 for 32x32, gray 127            | fm:40                  |
| which images             | unlabeled strong view: training policy + Cutout; labeled: probe  | fm:29-41               |
|                          | policy                                                           |                        |
| weak augmentation        | flip + reflect-shift 4 px (--augment d.d.d), before CTA, own     | fm:172; au:343,406-411 |
|                          | draw                                                             |                        |
| ops run on               | uint8 RGB PIL images (the [-1, 1] floats round-trip exactly)     | ct:34-40; data:91      |

Surprises in the official code (facts of the code; the paper's own wording was not at hand to compare line by line):
- translate_x/y move by at most 0.3 *pixels* (the ImageNet port in the same repository, imagenet/augment/ct_augment.py,
  moves by up to 100 pixels). PIL's NEAREST scale path reads source column floor(x + 0.5 + delta) = x for |delta|
  <= 0.3, so both ops leave every image unchanged; they still take 2 of 19 op slots and their bins still get updated.
- The threshold FixMatch runs with is the flag's 0.80, not CTAugment's default th=0.85 (the run folders say th0.80).
- The proximity 1 - 0.5 * sum |p - onehot| equals p[label] (the probabilities sum to 1), with no 1/L factor.
- The cutout op at bin 0 can have side 1, whose half-side 0 makes an empty square: a no-op.

Pixel exactness: every op reproduces Pillow's arithmetic (tests/ctaugment_ref.py holds the official ops; checked on
the installed Pillow 13.0.0): the RandAugment stages of own_impl/augment.py where the op is the same (their exactness
argument holds), and here: the level blends in a wider fixed point than augment._pil_blend (CTA levels reach below
2^-17), BLUR's 5x5 ring in integers, and rescale as Pillow's two-pass fixed-point convolution (22 fraction bits, 8-bit
intermediate) with its coefficients computed on the host by Pillow's own float64 formulas (libm sin/cos), applied as
float64 matrix products of integers, which are exact whatever the summation order.

Random numbers: only from the caller's torch.Generator, drawn in a fixed order and amount per call (op indices,
2 uniforms per parameter slot, cutout centres), whatever the rates or the images, so a resumed run replays exactly.
Nothing in draw or apply reads a value back to the host. Not reproduced: the official pool draws each batch's
policies from a pickled copy of the rates ~4 batches old (libml/augment.py:321-339), in forked workers that share
NumPy's global RNG state.
"""
from __future__ import annotations

import functools
import math
import struct
from typing import NamedTuple

import torch

from own_impl import augment as A

# name -> bins per parameter, in the official registration order, which random.choice draws from (OPS.keys()).
BINS = {
    "autocontrast": (17,), "blur": (17,), "brightness": (17,), "color": (17,), "contrast": (17,),
    "cutout": (17,), "equalize": (17,), "invert": (17,), "identity": (), "posterize": (8,),
    "rescale": (17, 6), "rotate": (17,), "sharpness": (17,), "shear_x": (17,), "shear_y": (17,),
    "smooth": (17,), "solarize": (17,), "translate_x": (17,), "translate_y": (17,),
}
OPS = tuple(BINS)
OP_INDEX = {name: k for k, name in enumerate(OPS)}
MAX_PARAMS = 2          # rescale's (scale, method)
MAX_BINS = 17
DEPTH = 2               # cta/lib/train.py:26
DECAY = 0.99            # cta/lib/train.py:27
THRESHOLD = 0.80        # cta/lib/train.py:28, what FixMatch runs with
CUTOUT_FILL = 127       # libml/ctaugment.py:141
RESCALE_METHODS = ("lanczos", "bicubic", "bilinear", "box", "hamming", "nearest")  # libml/ctaugment.py:171

# The CTA ops whose official arithmetic is a RandAugment op of own_impl/augment.py, and that op's name there.
_RA_SAME = {"autocontrast": "AutoContrast", "equalize": "Equalize", "solarize": "Solarize",
            "posterize": "Posterize", "brightness": "Brightness", "color": "Color", "contrast": "Contrast",
            "sharpness": "Sharpness", "rotate": "Rotate", "shear_x": "ShearX", "shear_y": "ShearY",
            "translate_x": "TranslateX", "translate_y": "TranslateY"}
_LEVEL_BLEND_OPS = ("autocontrast", "blur", "equalize", "invert", "smooth")   # Image.blend(x, op(x), level)
_ENHANCE_OPS = ("brightness", "color", "contrast", "sharpness")
_SHIFT_OPS = ("shear_x", "shear_y", "translate_x", "translate_y")             # (2 level - 1) * 0.3


class CTAPolicy(NamedTuple):
    """Drawn ops for N images, slot d applied before slot d + 1. Parameters beyond an op's count hold 0."""
    op_index: torch.Tensor   # (N, depth) int64 into OPS
    level: torch.Tensor      # (N, depth, MAX_PARAMS) float64 in [0, 1]: the official op arguments
    bin: torch.Tensor        # (N, depth, MAX_PARAMS) int64: the bin update_rates credits, int(level * n * 0.999)
    arg: torch.Tensor        # (N, depth, MAX_PARAMS) float64: the level mapped to the op's own unit (table above)
    cutout_cy: torch.Tensor  # (N, depth) int64 row of the cutout op's centre, in [0, H)
    cutout_cx: torch.Tensor  # (N, depth) int64 column, in [0, W)


class Probe(NamedTuple):
    """A step's probe: the labelled batch under probe policies, whose predictions update the rates after the step."""
    images: torch.Tensor     # (B, 3, H, W) float32, normalised as the model's input
    policy: CTAPolicy        # the probe draw that made them
    labels: torch.Tensor     # (B,) int64


class CTAStrongParams(NamedTuple):
    weak: A.WeakParams       # flip and shift, drawn independently of the weak view's
    policy: CTAPolicy        # a training draw
    cutout: A.CutoutParams   # the Cutout after the policy


# ---------------------------------------------------------------- the rates

class CTAugment:
    """The bin rates (a padded (19, 2, 17) float32 tensor) and the rules that draw policies from them and update them.

    Keep it on the device that draws (`device`); its generator must live there too."""

    def __init__(self, depth: int = DEPTH, threshold: float = THRESHOLD, decay: float = DECAY, device="cpu"):
        self.depth, self.threshold, self.decay = depth, threshold, decay
        self.n_bins = _bin_counts(torch.device(device))                         # (19, 2) int64, 0 = no parameter
        self.valid = torch.arange(MAX_BINS, device=device) < self.n_bins[..., None]   # (19, 2, 17) bool
        self.rates = self.valid.float()                                         # 1 in every real bin, 0 padding
        self.probe: Probe | None = None  # the step being made's probe, set by its batch, spent by the loop

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {"rates": self.rates.clone()}

    def load_state_dict(self, state: dict) -> None:
        rates = state["rates"]
        if rates.shape != self.rates.shape or rates.dtype != torch.float32:
            raise ValueError(f"rates must be float32 {tuple(self.rates.shape)}, got {rates.dtype} {tuple(rates.shape)}")
        self.rates = rates.to(self.rates.device).clone()

    def rate_table(self) -> dict[str, list[list[float]]]:
        """op -> one list of rates per parameter, for logging (one host read, so not inside a step)."""
        rates = self.rates.cpu()
        return {name: [rates[k, p, :n].tolist() for p, n in enumerate(BINS[name])] for k, name in enumerate(OPS)}

    def stats(self) -> str:
        """The official log line per op (libml/ctaugment.py:86-89): thresholded probabilities, parameters split by /."""
        p = self.probabilities().cpu()
        return "\n".join("%-16s    %s" % (name, " / ".join(" ".join("%.2f" % v for v in p[OP_INDEX[name], i, :n])
                                                          for i, n in enumerate(BINS[name])))
                         for name in sorted(OPS))

    def probabilities(self) -> torch.Tensor:
        """rate_to_p for every parameter: (19, 2, 17) float32, 0 in padding. Float32 throughout, as NumPy ran it on
        the float32 rate arrays (1 - decay and the threshold rounded to float32 too)."""
        p = self.rates + torch.tensor(1 - self.decay, dtype=torch.float32, device=self.rates.device)
        p = torch.where(self.valid, p, 0)
        p = p / p.amax(-1, keepdim=True)                                       # 0 / 0 for identity: masked below
        below = p < torch.tensor(self.threshold, dtype=torch.float32, device=p.device)
        return torch.where(below | ~self.valid, 0, p)

    # ------------------------------------------------------------ policies

    def draw(self, n: int, height: int, width: int, generator: torch.Generator, probe: bool = False) -> CTAPolicy:
        """`depth` ops per image for n images of height x width. probe=False: training policies (bins drawn in
        proportion to the thresholded rates); probe=True: probe policies (levels uniform). Both modes draw the same
        random tensors, so the generator advances by the same amount whatever the mode, rates or images."""
        device = self.rates.device
        shape = (n, self.depth, MAX_PARAMS)
        _resize_bases(height, device), _resize_bases(width, device)            # ready before apply is compiled
        op = torch.randint(0, len(OPS), (n, self.depth), generator=generator, device=device)
        u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
        r = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
        cy = torch.randint(0, height, (n, self.depth), generator=generator, device=device)
        cx = torch.randint(0, width, (n, self.depth), generator=generator, device=device)
        n_bins = self.n_bins[op]                                               # (N, depth, P)
        has = n_bins > 0
        if probe:
            level = u                                                          # np.random.uniform(0, 1)
        else:
            level = (self._sample_bins(op, u) + r) / n_bins                    # (value + r) / p.shape[0]
        level = torch.where(has, level, 0.0)
        credited = torch.where(has, (level * n_bins * 0.999).long(), 0)        # int() truncates, level >= 0
        return CTAPolicy(op, level, credited, _op_arguments(op, level, height, width), cy, cx)

    def _sample_bins(self, op: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """np.random.choice(n, p=p / p.sum()) by inversion: the number of cdf entries <= u (searchsorted right).
        op: (N, depth); u: (N, depth, P) float64 -> (N, depth, P) int64."""
        p = self.probabilities()
        q = p / p.sum(-1, keepdim=True)                                        # float32, as p / p.sum()
        cdf = q.double().cumsum(-1)
        cdf = cdf / cdf[..., -1:]                                              # choice normalises by cdf[-1]
        cdf = torch.where(self.valid.any(-1, keepdim=True), cdf, 1.0)          # no parameter: bin 0
        drawn = (cdf[op] <= u[..., None]).sum(-1)                              # (N, depth, P); padding cdf = 1 > u
        return torch.minimum(drawn, (self.n_bins[op] - 1).clamp(min=0))       # cdf[-1] = 1 > u: only a guard

    # ------------------------------------------------------------ learning

    def update_rates(self, policy: CTAPolicy, proximity: torch.Tensor) -> None:
        """The official update for each image in order, each of its ops in order: rate[bin] = rate[bin] * decay +
        proximity * (1 - decay) in float64, stored as float32 (NumPy 1.x promoted np.float32 * float to float64).

        Two images (or two slots) hitting the same bin update it one after the other, each result rounded to
        float32; no closed form keeps those roundings, so this loops over the N * depth (image, slot) pairs, a few
        small kernels each, with no host read. Run it eagerly (not under torch.compile): a fused multiply-add
        would skip the product's rounding. policy: a draw from this object (normally probe=True); proximity: (N,)."""
        n, depth, n_params = policy.bin.shape
        op = policy.op_index
        slot = (op[..., None] * n_params + torch.arange(n_params, device=op.device)) * MAX_BINS + policy.bin
        dump = self.rates.numel()                                              # writes of absent parameters land here
        slot = torch.where(self.n_bins[op] > 0, slot, dump)                    # (N, depth, P) flat index
        flat = torch.cat([self.rates.reshape(-1), self.rates.new_zeros(1)])
        gain = proximity.to(device=flat.device, dtype=torch.float64) * (1 - self.decay)   # (N,)
        for i in range(n):
            for d in range(depth):
                at = slot[i, d]
                flat[at] = (flat[at].double() * self.decay + gain[i]).float()
        self.rates = flat[:-1].reshape(self.rates.shape)


def proximity(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """cta/lib/train.py:71-76 on the probe predictions: 1 - 0.5 * sum_k |softmax_k - onehot_k|, the softmax and the
    sum in float32 (as TF and NumPy computed them; the order of the 10-term sum may differ by a float32 ulp), the
    rest in float64. logits (N, K), labels (N,) int64 -> (N,) float64, which equals softmax[label] up to rounding."""
    error = torch.softmax(logits.float(), 1) - torch.nn.functional.one_hot(labels, logits.shape[1]).float()
    return 1 - 0.5 * error.abs().sum(1).double()


@functools.cache
def _bin_counts(device: torch.device) -> torch.Tensor:
    """(19, 2) int64 bins of each op's parameters, 0 where the op has fewer; made once per device."""
    return torch.tensor([list(BINS[name]) + [0] * (MAX_PARAMS - len(BINS[name])) for name in OPS], device=device)


def _is(op: torch.Tensor, names) -> torch.Tensor:
    """op is one of `names`: comparisons only (a host-made index tensor would sync a GPU)."""
    names = (names,) if isinstance(names, str) else names
    hit = op == OP_INDEX[names[0]]
    for name in names[1:]:
        hit = hit | (op == OP_INDEX[name])
    return hit


def _op_arguments(op: torch.Tensor, level: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Each op's argument from its level, in float64 and in the official order of operations (so Python's rounding);
    done at draw time, eagerly, so that no compiler fuses 0.1 + 1.9 * level into an FMA. op (N, D), level (N, D, P)."""
    v = level[..., 0]
    arg = v                                                                    # level blends: alpha = level
    arg = torch.where(_is(op, _ENHANCE_OPS), 0.1 + 1.9 * v, arg)
    arg = torch.where(_is(op, "cutout"), 1 + (v * min(height, width) * 0.499).trunc(), arg)   # side, px
    arg = torch.where(_is(op, "posterize"), 1 + (v * 7.999).trunc(), arg)     # bits kept
    arg = torch.where(_is(op, "rescale"), v * 0.25, arg)                       # fraction cropped per side
    arg = torch.where(_is(op, "rotate"), torch.round((2 * v - 1) * 45), arg)   # degrees; np.round: half to even
    arg = torch.where(_is(op, _SHIFT_OPS), (2 * v - 1) * 0.3, arg)             # shear, or translation in px
    arg = torch.where(_is(op, "solarize"), (v * 255.999).trunc(), arg)         # threshold level
    method = torch.where(_is(op, "rescale"), (level[..., 1] * 5.99).trunc(), 0.0)   # index into RESCALE_METHODS
    return torch.stack([arg, method], -1)


# ---------------------------------------------------------------- applying a policy

def sample_strong_params(cta: CTAugment, n: int, height: int, width: int,
                         generator: torch.Generator) -> CTAStrongParams:
    """All of apply_strong's random numbers, in its order: weak, CTA training policy, Cutout."""
    device = cta.rates.device
    return CTAStrongParams(A.sample_weak_params(n, generator, device), cta.draw(n, height, width, generator),
                           A.sample_cutout_params(n, height, width, generator, device))


def apply_strong(x: torch.Tensor, p: CTAStrongParams) -> torch.Tensor:
    """The unlabeled strong view of the official FixMatch-CTA: an own weak flip-and-shift, the policy, the Cutout."""
    return final_cutout(apply_policy(A.flip_and_shift(x, p.weak), p.policy), p.cutout)


def final_cutout(x: torch.Tensor, p: A.CutoutParams) -> torch.Tensor:
    """fixmatch.py:40: the cutout op at level 1, i.e. side 1 + int(min(H, W) * 0.499) (16 for 32x32), gray 127."""
    side = 1 + int(1.0 * min(x.shape[2:]) * 0.499)
    return A.cutout(x, p, size=side, fill=CUTOUT_FILL)


def apply_policy(x: torch.Tensor, policy: CTAPolicy) -> torch.Tensor:
    """x: (N, 3, H, W) uint8 on the policy's device. Slot 0 on every image, then slot 1. No random numbers here."""
    for d in range(policy.op_index.shape[1]):
        x = apply_ops(x, policy.op_index[:, d], policy.arg[:, d], policy.cutout_cy[:, d], policy.cutout_cx[:, d])
    return x


def apply_ops(x: torch.Tensor, op: torch.Tensor, arg: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor):
    """Op OPS[op[n]] with arguments arg[n] (N, MAX_PARAMS) float64 on image n. Every family runs on the whole batch
    and keeps only its own images, so each image leaves with exactly its op applied."""
    _, _, h, w = x.shape
    ra_op = _ra_op_index(x.device)[op]                                         # (N,) RandAugment twin, or Identity
    a0 = arg[:, 0]
    # augment's TranslateX/Y take a fraction of the side; ours are pixels (an exact division for 32x32).
    m = torch.where(_is(op, "translate_x"), a0 / w, torch.where(_is(op, "translate_y"), a0 / h, a0))
    lut = A._lut_stage(x, ra_op, m)                # AutoContrast and Equalize here are the full ops, blended next
    y = _level_blend_stage(x, lut, op, a0)
    y = A._blend_stage(y, ra_op, m)
    y = A._geometric_stage(y, ra_op, m)
    y = _rescale_stage(y, op, a0, arg[:, 1])
    return _cutout_stage(y, op, a0, cy, cx)


@functools.cache
def _ra_op_index(device: torch.device) -> torch.Tensor:
    """(19,) int64: each CTA op's index in augment.OPS where the arithmetic is the same, else Identity's."""
    return torch.tensor([A.OP_INDEX[_RA_SAME.get(name, "Identity")] for name in OPS], device=device)


# ---------------------------------------------------------------- level blends: autocontrast ... smooth

def _level_blend_stage(x: torch.Tensor, lut: torch.Tensor, op: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Image.blend(x, target, level) for the level-blend ops; other images keep `lut` (x, or Solarize/Posterize)."""
    pick = lambda name: _is(op, name)[:, None, None, None]                   # noqa: E731
    target = lut.int()                                                         # AutoContrast / Equalize results
    target = torch.where(pick("invert"), 255 - x.int(), target)
    target = torch.where(pick("blur"), _blur(x), target)
    target = torch.where(pick("smooth"), A._smooth(x), target)
    out = _blend_any_level(x, target, level[:, None, None, None])
    return torch.where(pick(_LEVEL_BLEND_OPS), out, lut)


def _blur(x: torch.Tensor) -> torch.Tensor:
    """PIL ImageFilter.BLUR: the 16 pixels on the ring of the 5x5 window, / 16, rounded: 1/16 and every partial sum
    are exact in PIL's float32, so it is (s + 8) >> 4 for the ring sum s; a 2-pixel border unchanged, as PIL's
    5x5 filter copies it (and the whole image if smaller than 5x5). (N, C, H, W) uint8 -> int32."""
    h, w = x.shape[2:]
    v = x.int()
    if h < 5 or w < 5:
        return v
    row5 = sum(v[..., k:w - 4 + k] for k in range(5))                         # (N, C, H, W-4) 1x5 sums
    row3 = v[..., 1:w - 3] + v[..., 2:w - 2] + v[..., 3:w - 1]                # (N, C, H, W-4) centred 1x3 sums
    box5 = sum(row5[..., k:h - 4 + k, :] for k in range(5))                   # (N, C, H-4, W-4)
    box3 = row3[..., 1:h - 3, :] + row3[..., 2:h - 2, :] + row3[..., 3:h - 1, :]
    out = v.clone()
    out[..., 2:-2, 2:-2] = (box5 - box3 + 8) >> 4
    return out


# float32 alphas >= 2^-27 have their last bit at 2^-50 or above, so alpha * 2^50 is an integer.
LEVEL_BLEND_FRACTION_BITS = 50
_TINY_ALPHA = 2.0 ** -27


def _blend_any_level(im1: torch.Tensor, im2: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """PIL Image.blend for 0 <= alpha <= 1 (alpha rounded to float32 as PIL's C does): trunc(in1 + alpha * (in2 -
    in1)) in float32. augment._pil_blend's method (integer fixed point, float32 rounding by conversion, so no FMA can
    change it) with 50 fraction bits instead of 40, because CTA levels go below augment's 2^-17 floor: 1/17 of bin
    0 draws a level < 2^-13, and a tiny alpha still matters (in1 - tiny truncates to in1 - 1).

    Exact: below 2^-27 PIL returns in1 (alpha * (in2 - in1) is under half the float32 gap below in1), which is
    returned directly; above it, products (< 2^58) and sums (< 2^59) exceed float64's 53 bits, but each is the exact
    product or sum of two float32 numbers, whose rounding through float64 to float32 equals direct rounding to
    float32 (53 >= 2 * 24 + 2, Figueroa 1995). im1, im2: integer levels; alpha: float, broadcastable."""
    bits = LEVEL_BLEND_FRACTION_BITS
    a32 = alpha.float()
    a = (a32.double() * (1 << bits)).long()                                    # exact where a32 >= 2^-27
    product = A._float32_round((im2.long() - im1.long()) * a)                  # fl32(alpha * (in2 - in1)) * 2^50
    total = A._float32_round(im1.long() * (1 << bits) + product)               # fl32(in1 + that) * 2^50
    out = (total >> bits).clamp(0, 255)                                        # floor = trunc as total >= 0
    return torch.where(a32 < _TINY_ALPHA, im1.long(), out).to(torch.uint8)


# ---------------------------------------------------------------- rescale

_PRECISION_BITS = 22      # Pillow Resample.c: 32 - 8 - 2 fraction bits of its integer coefficients


def _rescale_stage(x: torch.Tensor, op: torch.Tensor, scale: torch.Tensor, method: torch.Tensor) -> torch.Tensor:
    """x.crop((s W, s H, W (1 - s), H (1 - s))).resize((W, H), method) on the rescale images, s = scale: PIL's
    horizontal pass then vertical pass, each sum(pixel * k) + 2^21 >> 22 clipped to 0..255, as (N, out, in)
    matrices of its integer coefficients (0 outside the crop)."""
    _, _, h, w = x.shape
    on = _is(op, "rescale")
    scale = torch.where(on, scale, 0.0)                                        # other ops' arguments: no crop
    method = torch.where(on, method, 0.0).long()
    wx = _crop_resize_matrices(scale, method, w)                               # (N, W, W) float64
    wy = _crop_resize_matrices(scale, method, h)                               # (N, H, H)
    rows = _requantize(x.double() @ wx.transpose(1, 2)[:, None])               # (N, C, H, W) levels
    out = _requantize(wy[:, None] @ rows).to(torch.uint8)
    return torch.where(on[:, None, None, None], out, x)


def _requantize(s: torch.Tensor) -> torch.Tensor:
    """Pillow's clip8 of an accumulator started at 2^21: floor((s + 2^21) / 2^22) clipped; s an exact integer."""
    return torch.floor((s + (1 << (_PRECISION_BITS - 1))) * 2.0 ** -_PRECISION_BITS).clamp(0, 255)


def _crop_resize_matrices(scale: torch.Tensor, method: torch.Tensor, size: int) -> torch.Tensor:
    """Per image, the (size, size) float64 matrix of one axis: crop [round(s size), round(size (1 - s))) (Python's
    round, half to even, as PIL's crop rounds its box), resized back to size. scale (N,) float64, method (N,) int64."""
    lo = torch.round(scale * size)
    hi = torch.round(size * (1 - scale))
    width = (hi - lo).long()                                                   # (N,)
    smallest, bases = _resize_bases(size, scale.device)                        # (widths, 6, size, size)
    kernel = bases[width - smallest, method]                                   # (N, size out, size in crop)
    j = torch.arange(size, device=scale.device) - lo.long()[:, None]          # (N, size): column in the crop
    inside = (j >= 0) & (j < width[:, None])
    index = j.clamp(0, size - 1)[:, None, :].expand(-1, size, -1)
    return kernel.gather(2, index) * inside[:, None, :]


# (size, device) -> _resize_bases' result. A plain dict, filled by draw (eager): torch.compile then reads a ready
# table instead of tracing the ~10^5 Python float operations that build it (it traces through functools.cache).
_RESIZE_BASES: dict = {}


def _resize_bases(size: int, device: torch.device) -> tuple[int, torch.Tensor]:
    """(smallest crop width, (widths, 6, size, size) float64): Pillow's integer coefficients for resizing a width-w
    line to `size`, per reachable crop width w (size - 2 ceil(size/4) .. size) and method, made once per device."""
    key = (size, torch.device(device))
    if key not in _RESIZE_BASES:
        smallest = max(1, size - 2 * math.ceil(size / 4))
        bases = [[_pil_resize_matrix(w, size, m) for m in RESCALE_METHODS] for w in range(smallest, size + 1)]
        _RESIZE_BASES[key] = smallest, torch.tensor(bases, dtype=torch.float64, device=device)
    return _RESIZE_BASES[key]


def _pil_resize_matrix(in_size: int, out_size: int, method: str) -> list[list[int]]:
    """(out_size, out_size) integer coefficients (columns >= in_size are 0) of Pillow's resize of a line of in_size
    pixels to out_size, on the host in Python floats, Pillow's float64 operations in its order (Resample.c
    precompute_coeffs and normalize_coeffs_8bpc; NEAREST: Geometry.c ImagingScaleAffine; same size: a copy)."""
    one = 1 << _PRECISION_BITS
    matrix = [[0] * out_size for _ in range(out_size)]
    if in_size == out_size:
        for i in range(out_size):
            matrix[i][i] = one
        return matrix
    if method == "nearest":
        step = float(in_size) / out_size
        xo = 0.0 + step * 0.5
        for x in range(out_size):
            xin = -1 if xo < 0.0 else int(xo)
            if 0 <= xin < in_size:
                matrix[x][xin] = one
            xo += step
        return matrix
    support, kernel = _FILTERS[method]
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    inverse = 1.0 / filterscale
    for xx in range(out_size):
        center = 0.0 + (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        count = min(int(center + support + 0.5), in_size) - xmin
        weights = [kernel((x + xmin - center + 0.5) * inverse) for x in range(count)]
        total = 0.0
        for value in weights:
            total += value
        if total != 0.0:
            weights = [value / total for value in weights]
        for x, value in enumerate(weights):
            matrix[xx][xmin + x] = int(-0.5 + value * one) if value < 0 else int(0.5 + value * one)
    return matrix


def _f32(v: float) -> float:
    """A C float literal as it enters double arithmetic."""
    return struct.unpack("f", struct.pack("f", v))[0]


_HAMMING_A, _HAMMING_B = _f32(0.54), _f32(0.46)


def _box(x: float) -> float:
    return 1.0 if -0.5 < x <= 0.5 else 0.0


def _bilinear(x: float) -> float:
    x = -x if x < 0.0 else x
    return 1.0 - x if x < 1.0 else 0.0


def _hamming(x: float) -> float:
    x = -x if x < 0.0 else x
    if x == 0.0:
        return 1.0
    if x >= 1.0:
        return 0.0
    x = x * math.pi
    return math.sin(x) / x * (_HAMMING_A + _HAMMING_B * math.cos(x))


def _bicubic(x: float) -> float:
    x = -x if x < 0.0 else x                                                   # a = -0.5 below
    if x < 1.0:
        return ((-0.5 + 2.0) * x - (-0.5 + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * -0.5
    return 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3) if -3.0 <= x < 3.0 else 0.0


_FILTERS = {"box": (0.5, _box), "bilinear": (1.0, _bilinear), "hamming": (1.0, _hamming),
            "bicubic": (2.0, _bicubic), "lanczos": (3.0, _lanczos)}


# ---------------------------------------------------------------- cutout op

def _cutout_stage(x: torch.Tensor, op: torch.Tensor, side: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor):
    """The cutout op: rows [cy - side//2, cy + side//2) x cols [cx - side//2, cx + side//2), clipped, set to 127;
    per-image sides, so augment.cutout (one side for the batch) does not serve. Half-side 0 (other ops, or side 1):
    an empty square."""
    _, _, h, w = x.shape
    half = torch.where(_is(op, "cutout"), side, 0.0).long() // 2              # (N,)
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_rows = (rows >= (cy - half)[:, None]) & (rows < (cy + half)[:, None])   # (N, H)
    in_cols = (cols >= (cx - half)[:, None]) & (cols < (cx + half)[:, None])   # (N, W)
    return x.masked_fill((in_rows[:, :, None] & in_cols[:, None, :])[:, None], CUTOUT_FILL)
