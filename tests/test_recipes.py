"""benchmarks/recipes.py's bookkeeping: arm names to overrides, and the equal-time comparison's choice of snapshot."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import recipes  # noqa: E402


def test_arm_names():
    assert recipes.parse_arm("regen") == ("regen", 7, ["ttt.length=7"])
    assert recipes.parse_arm("target-k9-lr3e-3") == (
        "sharegpt", 9, ["ttt.token_feedback=target", "ttt.branch_fraction=0.25", "ttt.length=9", "optim.lr=0.003"])
    assert recipes.parse_arm("regen-v4096") == ("regen", 7, ["ttt.length=7", "draft.vocab_size=4096"])
    assert recipes.parse_arm("regen-target-k5-v16384-lr3e-4") == (
        "regen", 5, ["ttt.token_feedback=target", "ttt.branch_fraction=0.25", "ttt.length=5", "optim.lr=0.0003",
                     "draft.vocab_size=16384"])
    for bad in ["nope", "regen-lrfast", "regen-kx", "regen-vx", "regen-v4096-k5"]:
        with pytest.raises(SystemExit):
            recipes.parse_arm(bad)


def test_arm_overrides_use_one_learning_rate():
    args = SimpleNamespace(regen_dir="", runs="runs/x", steps=300, lr=1e-3, snapshot_every=150)
    plain = recipes.arm_overrides("official", args)
    assert "optim.lr=0.001" in plain and "data.max_samples=6000" in plain and "name=rc-official" in plain
    own = recipes.arm_overrides("official-lr3e-3", args)
    assert [o for o in own if o.startswith("optim.lr=")] == ["optim.lr=0.003"]
    with pytest.raises(SystemExit, match="--regen-dir"):
        recipes.arm_overrides("regen", args)


def test_equal_time_table_takes_each_arms_last_snapshot_within_the_shortest_run():
    def snap(step, seconds, tau):
        return {"step": step, "trained_tokens": step * 1000, "train_seconds": seconds, "tau_chain": tau}

    report = {"arms": {
        "a": {"snapshots": {"100": snap(100, 200.0, 1.1), "200": snap(200, 400.0, 1.2)}},
        "b": {"snapshots": {"100": snap(100, 300.0, 1.3), "300": snap(300, 900.0, 1.5), "200": snap(200, 390.0, 1.4)}},
    }}
    rows = recipes.equal_time_table(report).splitlines()
    assert rows[0] == "Equal training time (≤ 400 s, each arm's last snapshot within it):"
    assert rows[4].startswith("| a | 200 | 200,000 | 400 | 1.200 |")
    assert rows[5].startswith("| b | 200 | 200,000 | 390 | 1.400 |")


@pytest.mark.parametrize("preset,steps", [("smollm2-sharegpt-cpu", 300), ("smollm2-sharegpt-cpu-1h", 1250)])
def test_presets_train_the_measured_regen_arm(preset, steps):
    # The demo and the 1-hour preset claim the numbers of the recipes' `regen` arm at that many steps: everything
    # that shapes training must be the arm's (run names, snapshots and the end-of-run eval may differ).
    from jobs.config import REGEN_ASSET, load_config, to_dict

    args = SimpleNamespace(regen_dir=str(REGEN_ASSET), runs="runs/x", steps=steps, lr=1e-3, snapshot_every=250)
    arm = to_dict(load_config("smollm2-sharegpt-cpu-official", overrides=recipes.arm_overrides("regen", args)))
    mine = to_dict(load_config(preset))
    for section in ["target", "data", "draft", "ttt"]:
        assert mine[section] == arm[section], section
    # epochs only bounds the run: max_steps stops both within the data's epochs they reach.
    assert {k: v for k, v in mine["optim"].items() if k != "epochs"} == \
        {k: v for k, v in arm["optim"].items() if k != "epochs"}
    assert mine["optim"]["max_steps"] == steps
