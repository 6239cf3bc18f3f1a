"""How two states are compared: per quantity, the largest relative difference over its tensors, where it is, and how
many elements differ. Pure functions of tensors; nothing here knows an implementation."""
from __future__ import annotations

from dataclasses import dataclass

import math

import torch


@dataclass(frozen=True)
class Difference:
    """One quantity at one step: 0.0 and n_diff 0 when every element is equal, bit for bit."""

    rel: float  # ||ours - theirs|| / max(||ours||, ||theirs||), 2-norms over all the quantity's tensors together
    where: str  # the tensor holding the largest share of the difference ("" when equal)
    n_diff: int  # elements not bit-equal, over all its tensors
    n: int  # elements compared

    @property
    def equal(self) -> bool:
        return self.n_diff == 0

    def to_dict(self) -> dict:
        return {"rel": self.rel, "where": self.where, "n_diff": self.n_diff, "n": self.n}


def difference(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> Difference:
    """Compare two named sets of tensors (the same names and shapes); scalars are 0-d tensors or Python numbers.
    Norms over the whole set, not per tensor: a gradient that is pure rounding noise (a conv bias before a
    BatchNorm gets ~0) would otherwise make any change of rounding look like a 100% difference."""
    if ours.keys() != theirs.keys():
        raise KeyError(f"the two sides name different tensors: {sorted(set(ours) ^ set(theirs))[:5]}")
    sq_diff = sq_ours = sq_theirs = 0.0
    where, worst, n_diff, n = "", 0.0, 0, 0
    for name in ours:
        a, b = (torch.as_tensor(t).detach().cpu().double() for t in (ours[name], theirs[name]))
        if a.shape != b.shape:
            raise ValueError(f"{name}: shapes differ: ours {tuple(a.shape)}, theirs {tuple(b.shape)}")
        same = (a == b) | (torch.isnan(a) & torch.isnan(b))
        d = int((~same).sum())
        n_diff, n = n_diff + d, n + b.numel()
        if d:
            part = float(torch.where(same, 0.0, a - b).square().sum())
            sq_diff += part
            if part > worst or not where:
                where, worst = name, part
        sq_ours, sq_theirs = sq_ours + float(a.square().sum()), sq_theirs + float(b.square().sum())
    if n_diff == 0:
        return Difference(0.0, "", 0, n)
    scale = max(sq_ours, sq_theirs) ** 0.5
    return Difference((sq_diff ** 0.5) / scale if scale > 0 else math.inf, where, n_diff, n)


def nudged(t: torch.Tensor, toward_zero: bool = False) -> torch.Tensor:
    """Every non-zero element moved one ulp away from zero (or toward it): the smallest relative change float
    arithmetic can make (zeros stay: one step from 0 is a subnormal, a change of another kind)."""
    return torch.where(t == 0, t, torch.nextafter(t, torch.zeros_like(t) if toward_zero else t * 2))
