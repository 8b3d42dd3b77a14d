"""Training checkpoints with safetensors + JSON only (no pickle): draft, optimizer, scheduler, RNG, position.

A checkpoint folder holds draft.safetensors (trainable weights + vocab map), optim.safetensors (per-parameter
optimizer tensors), rng.safetensors and state.json (step, data position, optimizer param groups and scalars,
scheduler state, anything the caller adds). Written into a temp folder and renamed, so never half-written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from eagle3.export import EXCLUDED_PREFIXES, atomic_dir, load_safetensors
from eagle3.model import Eagle3Draft


def _draft_state(draft: Eagle3Draft) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in draft.state_dict().items() if not k.startswith(EXCLUDED_PREFIXES)}


def save_train_state(
    out_dir: str | os.PathLike,
    draft: Eagle3Draft,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    meta: dict[str, Any],
) -> Path:
    """Write a resumable checkpoint folder atomically; `meta` must be JSON-serialisable."""
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        save_file(_draft_state(draft), str(tmp / "draft.safetensors"))
        opt = optimizer.state_dict()
        tensors, scalars = {}, {}
        for pid, st in opt["state"].items():
            for name, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"{pid}.{name}"] = v.detach().contiguous().cpu()
                else:
                    scalars[f"{pid}.{name}"] = v
        save_file(tensors, str(tmp / "optim.safetensors"))
        save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        state = {
            "meta": meta,
            "optim_param_groups": opt["param_groups"],
            "optim_scalars": scalars,
            "scheduler": scheduler.state_dict(),
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    return out


def load_train_state(
    ckpt_dir: str | os.PathLike,
    draft: Eagle3Draft,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, Any]:
    """Restore everything `save_train_state` wrote (in place) and return the caller's `meta`.

    Every file is read before anything is restored, so a damaged checkpoint leaves draft and optimizer untouched.
    """
    d = Path(ckpt_dir)
    # Checkpoints are written atomically, so a damaged one was cut off or changed afterwards (a copy, a full disk).
    fix = f"the checkpoint {d} is damaged: delete it to resume from an earlier checkpoint, or start the run over"
    try:
        state = json.loads((d / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{d / 'state.json'} cannot be read ({e}); {fix}") from e
    weights, flat, rng = (load_safetensors(d / f"{name}.safetensors", fix) for name in ("draft", "optim", "rng"))
    missing = set(_draft_state(draft)) - set(weights)
    if missing:
        raise ValueError(f"checkpoint {d} lacks draft tensors {sorted(missing)}")
    draft.load_state_dict(weights, strict=False)
    opt_state: dict[int, dict[str, Any]] = {}
    for key, v in flat.items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = v
    for key, v in state["optim_scalars"].items():
        pid, name = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["optim_param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(rng["torch"])
    return state["meta"]


CHECKPOINT_FILES = ("state.json", "draft.safetensors", "optim.safetensors", "rng.safetensors")


def verify_train_state(ckpt_dir: str | os.PathLike) -> None:
    """Raise (naming the file) unless `ckpt_dir` holds a complete checkpoint: state.json parses and every
    safetensors header covers its whole file. Cheap: no tensor data is read."""
    from eagle3.export import check_safetensors

    d = Path(ckpt_dir)
    fix = f"the checkpoint {d} is incomplete or damaged: delete it to resume from an earlier one"
    try:
        json.loads((d / "state.json").read_text())["meta"]["step"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{d / 'state.json'} cannot be read ({e}); {fix}") from e
    for name in CHECKPOINT_FILES[1:]:
        check_safetensors(d / name, fix)
