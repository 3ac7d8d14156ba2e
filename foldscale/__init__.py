"""foldscale: pretrain folded context condensation transformers with DeepSpeed."""
