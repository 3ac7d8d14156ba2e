"""Checkpoint layout (DESIGN.md §4), completeness and retention.

    RUN/checkpoints/step00001000/      as DeepSpeed writes it (client_state: trainer state, rank 0)
        foldscale_rank{r}.pt            each rank's sampler state, carried state and RNG states
        model.json ds_config.json train.json   the resolved configs
        COMPLETE                        written last, by rank 0, after every rank has finished

A checkpoint without COMPLETE is ignored by `--resume auto` (a crash mid-save), so the previous
one stays the one to load.
"""
import json
import os
import re
import shutil
from pathlib import Path

import torch

from foldscale.config import ConfigError

_TAG = re.compile(r"^step(\d{8})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete_checkpoints(root) -> list[Path]:
    """Complete checkpoints under RUN/checkpoints, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _TAG.match(p.name) and (p / "COMPLETE").is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve(resume: str, root) -> Path | None:
    """`auto` -> newest complete checkpoint (or None: start fresh); else a checkpoint directory."""
    if resume == "auto":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "COMPLETE").is_file():
        hint = "it has no COMPLETE marker (interrupted save?)" if path.is_dir() else "no such directory"
        raise ConfigError(f"--resume {path}: not a complete foldscale checkpoint: {hint}. "
                          f"Complete ones: {[str(p) for p in complete_checkpoints(path.parent)] or 'none'}")
    return path


def read_meta(path) -> dict:
    return json.loads((Path(path) / "COMPLETE").read_text())


def atomic_torch_save(obj, path):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path, text: str):
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def prune(root, keep_last: int):
    """Delete complete checkpoints beyond the newest `keep_last`; incomplete ones are left alone."""
    for old in complete_checkpoints(root)[:-keep_last]:
        (old / "COMPLETE").unlink()  # first, so a crash mid-delete never leaves a "complete" husk
        shutil.rmtree(old, ignore_errors=True)
