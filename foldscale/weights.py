"""Saving and loading a model's weights: `save_pretrained` / `from_pretrained` (a directory with
config.json and model.safetensors, as `foldscale export` writes it) and `from_state_dict`, the one
place that checks weights against a config. FoldedLM inherits them from `Pretrained`."""
import json
from pathlib import Path

from .config import ConfigError, FoldscaleError, ModelConfig


class ModelFileError(FoldscaleError):
    """A saved model that cannot be loaded; the message names the file and the problem."""


def save_weights(state: dict, directory: Path) -> None:
    """DIRECTORY/model.safetensors, readable as DIRECTORY/config.json is: safetensors writes
    through a private temporary file (mode 0600), which a model shared with others must not keep."""
    from safetensors.torch import save_file
    save_file(state, str(directory / "model.safetensors"))
    (directory / "model.safetensors").chmod((directory / "config.json").stat().st_mode & 0o777)


class Pretrained:
    """For a model class built as cls(cfg: ModelConfig) with a `cfg` attribute."""

    def save_pretrained(self, directory) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.cfg.to_json(directory / "config.json")
        save_weights(self.export_state_dict(), directory)

    def export_state_dict(self) -> dict:
        """The weights to save: contiguous, the tied LM head stored once (as tok_emb.weight)."""
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.cfg.tie_embeddings:
            state.pop("lm_head.weight")
        return state

    @classmethod
    def from_pretrained(cls, directory, map_location="cpu"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        directory = Path(directory)
        if not directory.is_dir():
            raise ModelFileError(f"{directory}: no such model directory")
        try:
            cfg = ModelConfig.from_json(directory / "config.json")
        except (ConfigError, TypeError) as e:
            raise ModelFileError(f"{directory / 'config.json'}: {e}") from None
        weights = directory / "model.safetensors"
        if not weights.is_file():
            raise ModelFileError(f"{weights}: missing; export a checkpoint with `foldscale export`")
        try:
            tensors = load_file(str(weights), device=str(map_location))
        except (SafetensorError, OSError, json.JSONDecodeError) as e:
            raise ModelFileError(f"{weights}: unreadable or truncated ({e})") from None
        return cls.from_state_dict(cfg, tensors, f"{weights}: does not match {directory / 'config.json'}")

    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, state: dict, mismatch: str):
        """A model holding `state` (a tied LM head may be in it or not). Missing, unexpected or
        mis-shaped weights raise ModelFileError, its message starting with `mismatch`."""
        model = cls(cfg)
        expected = model.export_state_dict()
        if cfg.tie_embeddings:
            state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                 if k in state and state[k].shape != v.shape]
        if missing or unexpected or wrong:
            raise ModelFileError(f"{mismatch}: missing {missing}, unexpected {unexpected}, wrong shapes {wrong}")
        model.load_state_dict(state, strict=not cfg.tie_embeddings)
        return model
