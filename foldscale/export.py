"""A checkpoint's model (any ZeRO stage, with or without offload) -> plain safetensors or torch file,
or a directory transformers loads (hf, see hf.py), also from a safetensors export.

The exported model loads with `FoldedLM.from_pretrained` in a process that never imports
DeepSpeed. Every export checks itself: the written file, loaded back, must give the same loss on a
fixed batch as the weights read from the checkpoint. Which checkpoint, whether it is intact, and
its configs and weights are checkpoint.py's business.
"""
import math
import pickle
import shutil
from pathlib import Path

import torch

from foldscale import checkpoint as ckpt
from foldscale.config import ConfigError, FoldscaleError, ModelConfig
from foldscale.model import FoldedLM
from foldscale.weights import ModelFileError, save_weights

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": 1e-5, "bf16": 3e-2}
"""Relative loss difference allowed by the self-check: bf16 rounds every weight (~3 digits)."""


EXPORT_FILES = ("config.json", "model.safetensors", "tokenizer.model")
"""What a safetensors export writes: an --out holding anything else is not replaced."""


class ExportError(FoldscaleError):
    """An export whose loss differs from the checkpoint's: it failed its self-check."""


def check_batch(store_path, cfg: ModelConfig, n_segments: int = 4) -> tuple[torch.Tensor, str]:
    """(1, n_segments * l + 1) token ids: the start of the run's validation split when its
    store is still there, else deterministic random ids."""
    from foldscale.data import StoreError, TokenStore
    n = n_segments * cfg.segment_len + 1
    try:
        store = TokenStore.open(store_path) if store_path else None
    except StoreError:
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


def _refuse_other_files(out: Path, ours: tuple):
    """An --out that holds files an export does not write is the user's, not an earlier export."""
    others = sorted(f.name for f in out.iterdir() if f.name not in ours)
    if others or ((out / "config.json").is_file() and not (out / "model.safetensors").is_file()):
        raise ConfigError(f"--out {out} holds other files ({', '.join(others or ['config.json'])}), not an earlier "
                          "export: give a new or empty directory")


@torch.no_grad()
def batch_loss(model: FoldedLM, ids: torch.Tensor) -> float:
    return model.forward_stream(ids[:, :-1], targets=ids[:, 1:], keep_logits=False).loss.item()


def load_torch_export(path) -> FoldedLM:
    """Load a `--format torch` export: {"config": dict, "state_dict": ...}, tensors and plain
    python only (weights_only)."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        config, state = obj["config"], obj["state_dict"]
    except FileNotFoundError:
        raise ModelFileError(f"{path}: missing") from None
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, KeyError, TypeError) as e:
        raise ModelFileError(f"{path}: not a readable foldscale torch export ({type(e).__name__}: {e})") from None
    return FoldedLM.from_state_dict(ModelConfig.from_dict(config), {k: v.float() for k, v in state.items()},
                                    f"{path}: weights do not match its config").eval()


def checkpoint_model(path) -> FoldedLM:
    """The model of checkpoint PATH (verified), fp32, in eval mode."""
    cfg = ModelConfig.from_dict(ckpt.read_config(path, "model.json"))
    return FoldedLM.from_state_dict(cfg, ckpt.model_weights(path), f"{path}: weights do not match model.json").eval()


def export(run_dir, out, tag: str | None = None, dtype: str = "fp32", fmt: str = "safetensors",
           progress=lambda message: None) -> dict:
    """Write the model of RUN_DIR's newest checkpoint (or TAG) to OUT and check it; returns what was
    done and both losses. A checkpoint that does not verify is refused, never swapped for another.
    PROGRESS(message) is told before each long wait."""
    out, source = Path(out), Path(run_dir)
    if fmt != "torch" and out.is_file():
        raise ConfigError(f"--out {out} is a file; {fmt} export writes a directory")
    if fmt == "torch" and out.is_dir():
        raise ConfigError(f"--out {out} is a directory; torch export writes one .pt file")
    if fmt == "hf":
        from foldscale import hf
        hf.require_transformers()
    if fmt != "torch" and out.is_dir():
        _refuse_other_files(out, EXPORT_FILES + (hf.FILES if fmt == "hf" else ()))
    if (source / "model.safetensors").is_file():  # a safetensors export, not a run
        if tag:
            raise ConfigError(f"--tag: {source} is an exported model, not a run directory; leave out --tag")
        path, step, store = source, None, None
        reference = FoldedLM.from_pretrained(source).eval()
        tokenizer = source / "tokenizer.model" if (source / "tokenizer.model").is_file() else None
    else:
        root = ckpt.run_checkpoints(source)
        path = root / tag if tag else ckpt.newest(root)
        step = ckpt.verify(path)["step"]
        progress(f"{path.name} verified; reading its weights (ZeRO partitions are gathered by DeepSpeed's "
                 "zero_to_fp32: seconds per GB), then the loss self-check")
        reference = checkpoint_model(path)
        tokenizer, store = ckpt.tokenizer(path), ckpt.read_config(path, "data.json").get("store")
    cfg = reference.cfg
    state = {k: v.to(DTYPES[dtype]) for k, v in reference.export_state_dict().items()}
    if fmt == "torch":
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"config": cfg.to_dict(), "state_dict": state}, out)
        exported = load_torch_export(out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        if tokenizer and Path(tokenizer).resolve() != (out / "tokenizer.model").resolve():
            shutil.copyfile(tokenizer, out / "tokenizer.model")
        if fmt == "hf":
            hf.write_hf(cfg, out)
        else:
            cfg.to_json(out / "config.json")
        save_weights(state, out)
        # an hf export is loaded back through transformers, as its users load it
        exported = hf.load(out)[0].model if fmt == "hf" else FoldedLM.from_pretrained(out).eval()
    ids, check = check_batch(store, cfg)
    loss_ds, loss_out = batch_loss(reference, ids), batch_loss(exported, ids)
    result = {"checkpoint": str(path), "step": step, "out": str(out), "format": fmt, "dtype": dtype,
              "tokenizer": fmt != "torch" and tokenizer is not None, "check_batch": check,
              "reference": "source export" if step is None else "DeepSpeed checkpoint", "loss_deepspeed": loss_ds,
              "loss_exported": loss_out}
    if not math.isclose(loss_ds, loss_out, rel_tol=TOLERANCE[dtype], abs_tol=1e-6):
        raise ExportError(f"self-check failed: loss {loss_out:.6f} of the export != {loss_ds:.6f} of the "
                          f"{result['reference']} on {check}; do not use {out}")
    return result
