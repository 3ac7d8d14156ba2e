"""foldscale: pretrain folded context condensation transformers with DeepSpeed.

    from foldscale import FoldedLM, ModelConfig, generate
    model = FoldedLM(ModelConfig.load("small", vocab_size=8192))
    out = model.forward_stream(ids, targets=targets)      # any length, with the carried state
    new = generate(model, ids, max_new_tokens=50)         # constant memory however long ids is

Training (DeepSpeed) is `launch/pretrain.py` and `foldscale.trainer.Trainer`; importing this
package does not import DeepSpeed.
"""
from foldscale.config import DataConfig, FoldscaleError, ModelConfig, TrainConfig
from foldscale.data import Tokenizer, TokenStore
from foldscale.generate import StreamDecoder, generate, stream_generate
from foldscale.model import FoldedLM, LMOutput, segments

__all__ = ["DataConfig", "FoldedLM", "FoldscaleError", "LMOutput", "ModelConfig", "StreamDecoder", "Tokenizer",
           "TokenStore", "TrainConfig", "generate", "segments", "stream_generate"]
