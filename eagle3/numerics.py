"""Numerics shared by the trainer's parts: the floored exp of the fused loss and the TTT attention kernel, and
which dtypes a device multiplies natively (what `auto` dtypes resolve to)."""

from __future__ import annotations

import platform

import torch
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


def native_matmul(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether `device` multiplies `dtype` matrices in hardware, i.e. at least about as fast as fp32.

    CPU bf16 needs AVX512-BF16 or AMX on x86 (elsewhere: oneDNN's bf16 support); fp16 needs AMX-FP16 / AVX512-FP16.
    Without them oneDNN falls back to a reference kernel: on an AVX2-only AMD EPYC, a [512, 576] x [576, 8192] bf16
    matmul ran at 0.44 GFLOP/s against 78 for fp32 (BENCHMARKS.md, "CPUs without native bf16"), and the demo's
    trainer step 16x slower than in fp32. CUDA: bf16 on compute capability >= 8 (no emulation), fp16 always."""
    dev = torch.device(device)
    if dtype in (torch.float32, torch.float64):
        return True
    if dev.type == "cuda":
        if dtype == torch.bfloat16:
            try:
                return torch.cuda.is_bf16_supported(including_emulation=False)
            except TypeError:  # older torch: no emulation flag
                return torch.cuda.is_bf16_supported()
        return dtype == torch.float16
    if dev.type != "cpu":
        return False
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    if dtype == torch.bfloat16:
        if x86:
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        if x86:
            return bool(torch.cpu._is_amx_fp16_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return False


DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device | str) -> str:
    """A configured dtype name on `device`: 'auto' is bfloat16 where `device` runs bf16 matmuls natively, else
    float32; any other name is returned as it is (an explicit choice is the user's, even if slow)."""
    if name != "auto":
        return name
    return "bfloat16" if native_matmul(torch.bfloat16, device) else "float32"


def compute_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """`dtype` if `device` multiplies it natively, else float32: for frozen tensors a process may compute in as it
    likes (the trainer's teacher head), e.g. a bf16 target's lm_head on a trainer CPU without bf16 matmuls."""
    return dtype if native_matmul(dtype, device) else torch.float32
