"""Checkpoints: a Hugging Face export that vLLM and transformers load, plus the training state.

Layout under <run_dir>/checkpoints/step-000042/:
  hf/     model.safetensors (body in body dtype, lm_head fp32), config.json, tokenizer files copied
          from the model directory;
  dcp/    model and optimizer state, sharded, via torch.distributed.checkpoint;
  state.json  {"step": 42}, written last: a directory without it is incomplete and ignored.
The step is the weight version, so a resumed run continues the numbering.

Retention (learner.keep_checkpoint_every, learner.keep_last_checkpoints): after each save the
learner keeps the checkpoints whose version is a multiple of keep_checkpoint_every plus the newest
keep_last_checkpoints, and deletes the others (prune_checkpoints). The kept versions are what
`tether audit` can recompute rollouts with.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from tether.learner.model import publish_dtypes

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_STATE = "state.json"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under run_dir, or None."""
    root = Path(run_dir) / "checkpoints"
    complete = sorted(p for p in root.glob("step-*") if (p / _STATE).is_file()) if root.is_dir() else []
    return complete[-1] if complete else None


def checkpoint_versions(run_dir: str | Path) -> dict[int, Path]:
    """Complete checkpoints under run_dir by version."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return {}
    return {int(json.loads((p / _STATE).read_text())["step"]): p for p in root.glob("step-*") if (p / _STATE).is_file()}


def prune_checkpoints(run_dir: str | Path, keep_every: int, keep_last: int) -> list[Path]:
    """Delete complete checkpoints that retention does not keep; returns the deleted paths.

    Kept: every version that is a multiple of `keep_every` (0 keeps every checkpoint, deleting
    nothing) and the newest `keep_last`. Incomplete directories (a save in progress) are left alone.
    """
    if keep_every <= 0:
        return []
    versions = sorted(checkpoint_versions(run_dir).items())
    newest = {v for v, _ in versions[-keep_last:]} if keep_last > 0 else set()
    deleted = []
    for version, path in versions:
        if version % keep_every and version not in newest:
            # state.json first: a directory interrupted mid-delete reads as incomplete, never as a checkpoint.
            (path / _STATE).unlink()
            shutil.rmtree(path)
            deleted.append(path)
    return deleted


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def export_hf(model: nn.Module, out_dir: Path, model_dir: str | Path, body_dtype: torch.dtype, fp32_lm_head: bool) -> None:
    """Collective: gather the full state dict to rank 0's CPU and write an HF model directory there."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _is_rank0():
        out_dir.mkdir(parents=True, exist_ok=True)
        # publish_dtypes: the head matrix in fp32, the body in body_dtype, a tied matrix once.
        tensors = {
            name: state[name].detach().to(dtype).contiguous()
            for name, dtype in publish_dtypes(model, body_dtype, fp32_lm_head).items()
        }
        save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        for item in Path(model_dir).iterdir():
            if item.is_file() and not item.name.endswith(_WEIGHT_SUFFIXES) and item.name != "model.safetensors.index.json":
                shutil.copy2(item, out_dir / item.name)


def save_checkpoint(
    run_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
    model_dir: str | Path, body_dtype: torch.dtype, fp32_lm_head: bool,
) -> Path:
    """Collective: write the HF export and the sharded training state for `step`."""
    path = checkpoint_dir(run_dir, step)
    export_hf(model, path / "hf", model_dir, body_dtype, fp32_lm_head)
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path / "dcp"))
    _barrier()
    if _is_rank0():
        (path / _STATE).write_text(json.dumps({"step": step}))
    _barrier()
    return path


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Collective: restore model and optimizer from `path`; returns its step (= weight version)."""
    path = Path(path)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return int(json.loads((path / _STATE).read_text())["step"])
