"""The transformers config of a folded model (`foldscale export --format hf`): ModelConfig's fields
as attributes, model_type "foldscale". Copied into the exported directory with model.py and the
files it imports, so that transformers loads it with no foldscale installed."""
import dataclasses

from transformers import PretrainedConfig

from .config import ModelConfig

NO_LIMIT = 2**31 - 1
"""max_position_embeddings: a folded model reads any length segment by segment. lm-eval (HFLM)
and generate read this field as the longest input, and would otherwise cut long documents."""


class FoldscaleConfig(PretrainedConfig):
    model_type = "foldscale"

    def __init__(self, **kwargs):
        names = [f.name for f in dataclasses.fields(ModelConfig)]
        model = ModelConfig(**{k: kwargs.pop(k) for k in names if k in kwargs})  # checked on construction
        for name, value in model.to_dict().items():
            setattr(self, name, value)
        kwargs["tie_word_embeddings"] = model.tie_embeddings
        kwargs.setdefault("max_position_embeddings", NO_LIMIT)
        super().__init__(**kwargs)

    def model_config(self) -> ModelConfig:
        return ModelConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)})
