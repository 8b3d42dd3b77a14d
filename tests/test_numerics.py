"""Which dtypes a device multiplies natively, and what the `auto` dtypes resolve to (eagle3.numerics)."""

from __future__ import annotations

import dataclasses
import platform
from pathlib import Path

import pytest
import torch

from eagle3 import numerics


def cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("flags"))
    return set(line.split(":", 1)[1].split())


@pytest.mark.skipif(platform.machine() != "x86_64" or not Path("/proc/cpuinfo").exists(),
                    reason="reads x86 CPU flags from Linux's /proc/cpuinfo")
def test_native_bf16_on_cpu_follows_the_cpu_flags():
    """The kernel's view of the CPU (an independent reference): bf16 is native with AVX512-BF16 or AMX-BF16."""
    flags = cpu_flags()
    assert numerics.native_matmul(torch.bfloat16, "cpu") == bool({"avx512_bf16", "amx_bf16"} & flags)
    assert numerics.native_matmul(torch.float16, "cpu") == ("amx_fp16" in flags)
    assert numerics.native_matmul(torch.float32, "cpu")
    expected = "bfloat16" if {"avx512_bf16", "amx_bf16"} & flags else "float32"
    assert numerics.resolve_dtype("auto", "cpu") == expected


@pytest.fixture(params=[True, False], ids=["native-bf16", "no-native-bf16"])
def native_bf16(request, monkeypatch):
    """Both kinds of machine on this one: native_matmul answers as a CPU with (or without) AVX512-BF16/AMX."""
    monkeypatch.setattr(numerics, "native_matmul",
                        lambda dtype, device: dtype in (torch.float32, torch.float64) or request.param)
    return request.param


def test_auto_resolves_by_the_device_and_explicit_names_pass(native_bf16):
    assert numerics.resolve_dtype("auto", "cpu") == ("bfloat16" if native_bf16 else "float32")
    for name in ("float32", "bfloat16", "float16"):
        assert numerics.resolve_dtype(name, "cpu") == name
    assert numerics.compute_dtype(torch.bfloat16, "cpu") == (torch.bfloat16 if native_bf16 else torch.float32)
    assert numerics.compute_dtype(torch.float32, "cpu") == torch.float32


def test_target_auto_dtype_is_resolved_by_the_actor_and_reported(native_bf16):
    """The actor decides on its own device; its TargetInfo (logged as target_info.dtype) and weights say what ran."""
    from actors.hf_backend import HFTarget, TargetConfig
    from actors.models import TINY

    target = HFTarget(TargetConfig(model=TINY, dtype="auto"))
    want = torch.bfloat16 if native_bf16 else torch.float32
    assert target.info().dtype == str(want).removeprefix("torch.")
    assert next(target.model.parameters()).dtype == want
    assert target.frozen_weights().lm_head.dtype == want


def test_learner_autocast_follows_optim_bf16(native_bf16):
    from jobs.train_loop import autocast_bf16

    cpu = torch.device("cpu")
    assert autocast_bf16("auto", cpu) == native_bf16
    assert autocast_bf16(True, cpu) and not autocast_bf16(False, cpu)  # explicit choices are kept


def test_actors_that_resolved_auto_differently_are_refused():
    """Two nodes, one with native bf16 and one without: the run stops before training and names the fix."""
    from actors.hf_backend import HFTarget, TargetConfig
    from actors.models import TINY
    from jobs.targets import check_agree

    info = HFTarget(TargetConfig(model=TINY)).info()
    cfg = TargetConfig(model=TINY, dtype="auto")
    check_agree([info, info], cfg)  # the same: nothing to say
    with pytest.raises(RuntimeError, match=r"target.dtype='auto' resolved to bfloat16 and float32 on different "
                                           r"target nodes .*set target.dtype to one of them"):
        check_agree([info, dataclasses.replace(info, dtype="bfloat16")], cfg)
    with pytest.raises(RuntimeError, match="disagree about the model"):
        check_agree([info, dataclasses.replace(info, num_layers=info.num_layers + 1)], cfg)
