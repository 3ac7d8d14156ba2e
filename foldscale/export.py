"""DeepSpeed checkpoint (ZeRO 0-3, with or without offload) -> plain safetensors or torch file.

The exported model loads with `FoldedLM.from_pretrained` in a process that never imports
DeepSpeed, so DeepSpeed is imported only inside the function that reads ZeRO 1-3 partitions.
Every export checks itself: the written file, loaded back, must give the same loss on a fixed
batch as the weights read from the DeepSpeed checkpoint.
"""
import contextlib
import io
import json
import math
import pickle
import shutil
import zipfile
from pathlib import Path

import torch

from foldscale import checkpoint as ckpt
from foldscale.config import ConfigError, FoldscaleError, ModelConfig
from foldscale.model import FoldedLM, ModelFileError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": 1e-5, "bf16": 3e-2}
"""Relative loss difference allowed by the self-check: bf16 rounds every weight (~3 digits)."""
_UNREADABLE = (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, KeyError,
               ValueError)


class ExportError(FoldscaleError):
    """A checkpoint that cannot be exported, or an export that fails its self-check."""


def find_checkpoint(run_dir, tag: str | None = None) -> Path:
    """RUN_DIR/checkpoints/TAG, or the newest complete checkpoint when TAG is None."""
    root = Path(run_dir) / "checkpoints"
    if not Path(run_dir).is_dir():
        raise ExportError(f"{run_dir}: no such run directory")
    complete = ckpt.complete_checkpoints(root)
    names = ", ".join(p.name for p in complete) or "none"
    if tag is None:
        if not complete:
            raise ExportError(f"{root}: no complete checkpoint (one with a COMPLETE marker)")
        return complete[-1]
    path = root / tag
    if path not in complete:
        why = "has no COMPLETE marker (interrupted save?)" if path.is_dir() else "does not exist"
        raise ExportError(f"checkpoint {tag} in {root} {why}; complete ones: {names}")
    return path


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise ExportError(f"{path}: missing") from None
    except _UNREADABLE as e:
        raise ExportError(f"{path}: unreadable or truncated ({type(e).__name__}: {e})") from None


def _zero_stage(path: Path) -> int:
    try:
        return json.loads((path / "ds_config.json").read_text()).get("zero_optimization", {}).get("stage", 0)
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise ExportError(f"{path / 'ds_config.json'}: cannot be read ({e})") from None


def deepspeed_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model's fp32 weights as saved in checkpoint PATH, whatever the ZeRO stage.

    ZeRO 0 keeps the whole module state dict in mp_rank_00_model_states.pt. ZeRO 1-3 keep the
    fp32 master weights in the optimizer partitions (under ZeRO 3 the module file holds only
    placeholders), which DeepSpeed's own zero_to_fp32 consolidates.
    """
    if _zero_stage(path) == 0:
        state = _torch_load(path / "mp_rank_00_model_states.pt")
        if not isinstance(state, dict) or "module" not in state:
            raise ExportError(f"{path / 'mp_rank_00_model_states.pt'}: no module state dict in it")
        return {k: v.float() for k, v in state["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints progress on stdout
            state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    except _UNREADABLE as e:
        raise ExportError(f"{path}: DeepSpeed could not consolidate the ZeRO partitions "
                          f"({type(e).__name__}: {e}); a file is missing, truncated or altered") from None
    return {k: v.float() for k, v in state.items()}


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], where) -> FoldedLM:
    """A FoldedLM holding STATE; a tied LM head may be present in STATE (it is the embedding)."""
    try:
        return FoldedLM.from_state_dict(cfg, state, f"{where}: weights do not match model.json").eval()
    except ModelFileError as e:
        raise ExportError(str(e)) from None


def check_batch(path: Path, cfg: ModelConfig, n_segments: int = 4) -> tuple[torch.Tensor, str]:
    """(1, n_segments * l + 1) token ids: the start of the run's validation split when its
    store is still there, else deterministic random ids."""
    from foldscale.data import StoreError, TokenStore
    n = n_segments * cfg.segment_len + 1
    try:
        store_path = json.loads((path / "data.json").read_text()).get("store")
        store = TokenStore.open(store_path) if store_path else None
    except (FileNotFoundError, json.JSONDecodeError, StoreError):
        store = None
    if store is not None and store.vocab_size == cfg.vocab_size:
        docs = store.docs("val") if len(store.docs("val")) else store.docs("train")
        ids, total = [], 0
        for i in docs:
            ids.append(torch.from_numpy(store.doc(int(i)).astype("int64")))
            total += len(ids[-1])
            if total >= n:
                break
        if total >= 2:
            return torch.cat(ids)[:n].unsqueeze(0), f"{store.path} ({min(total, n)} tokens)"
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, cfg.vocab_size, (2, n), generator=g), f"random ids (2 x {n})"


@torch.no_grad()
def batch_loss(model: FoldedLM, ids: torch.Tensor) -> float:
    return model.forward_stream(ids[:, :-1], targets=ids[:, 1:], keep_logits=False).loss.item()


def load_torch_export(path) -> FoldedLM:
    """Load a `--format torch` export: {"config": dict, "state_dict": ...}."""
    path = Path(path)
    obj = _torch_load(path)
    try:
        cfg = ModelConfig.from_dict(obj["config"])
    except (KeyError, TypeError, ConfigError) as e:
        raise ExportError(f"{path}: not a foldscale torch export ({e})") from None
    return build_model(cfg, {k: v.float() for k, v in obj["state_dict"].items()}, path)


def export(run_dir, out, tag: str | None = None, dtype: str = "fp32", fmt: str = "safetensors") -> dict:
    """Write the checkpoint's model to OUT and check it; returns what was done and both losses."""
    path = find_checkpoint(run_dir, tag)
    try:
        cfg = ModelConfig.from_json(path / "model.json")
    except (ConfigError, TypeError) as e:
        raise ExportError(str(e)) from None
    reference = build_model(cfg, deepspeed_weights(path), path)
    state = {k: v.to(DTYPES[dtype]) for k, v in reference.export_state_dict().items()}
    out = Path(out)
    tokenizer = path / "tokenizer.model"
    if fmt == "safetensors":
        if out.is_file():
            raise ExportError(f"--out {out} is a file; safetensors export writes a directory")
        from safetensors.torch import save_file
        out.mkdir(parents=True, exist_ok=True)
        cfg.to_json(out / "config.json")
        save_file(state, str(out / "model.safetensors"))
        if tokenizer.is_file():
            shutil.copyfile(tokenizer, out / "tokenizer.model")
        try:
            exported = FoldedLM.from_pretrained(out).eval()
        except ModelFileError as e:
            raise ExportError(f"the export does not load back: {e}") from None
    else:
        if out.is_dir():
            raise ExportError(f"--out {out} is a directory; torch export writes one .pt file")
        out.parent.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_torch_save({"config": cfg.to_dict(), "state_dict": state}, out)
        exported = load_torch_export(out)
    ids, source = check_batch(path, cfg)
    loss_ds, loss_out = batch_loss(reference, ids), batch_loss(exported, ids)
    result = {"checkpoint": str(path), "step": int(path.name.removeprefix("step")), "out": str(out),
              "format": fmt, "dtype": dtype, "tokenizer": tokenizer.is_file() and fmt == "safetensors",
              "check_batch": source, "loss_deepspeed": loss_ds, "loss_exported": loss_out}
    if not math.isclose(loss_ds, loss_out, rel_tol=TOLERANCE[dtype], abs_tol=1e-6):
        raise ExportError(f"self-check failed: loss {loss_out:.6f} of the export != {loss_ds:.6f} of the "
                          f"DeepSpeed checkpoint on {source}; do not use {out}")
    return result
