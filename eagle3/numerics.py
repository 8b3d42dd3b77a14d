"""Elementwise numerics shared by the fused loss and the TTT attention kernel."""

from __future__ import annotations

from torch import Tensor

EXP_FLOOR = -80.0
"""Arguments of the softmax-type exps are floored here on CPU. torch's CPU exp takes a slow path for arguments
whose result underflows (below about -87, -inf included): 10-40x slower per element (BENCHMARKS.md, "Trainer
slowdown"). A draft's logits spread as it trains, so more of them underflow and its steps slowed down with training.
exp(-80) = 1.8e-35 is a normal float; every sum it joins holds a term >= 1 (the row's max), so it changes no result
beyond fp32 (or fp64) rounding, and a masked (-inf) entry weighs 1.8e-35 instead of 0."""


def exp_floored_(x: Tensor) -> Tensor:
    """exp(max(x, EXP_FLOOR)) in place (x is overwritten; returned). On CUDA a plain exp: it has no slow path."""
    if x.is_cuda:
        return x.exp_()
    return x.clamp_min_(EXP_FLOOR).exp_()
