"""A FoldedLM as a transformers causal LM (`foldscale export --format hf`).

Copied into the exported directory beside model.py, generate.py and the files they import, so that
`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` needs no foldscale. The block
math is FoldedLM's own: without a cache a call is `FoldedLM.forward_stream` (any length, segment by
segment with the carried state); with one (generate) it is `StreamDecoder.feed`, whose carried
state and current segment's keys and values are the cache, so memory does not grow with the text.
"""
import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_foldscale import FoldscaleConfig
from .generate import StreamDecoder
from .model import FoldedLM

CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
"""generate()'s name for the cache: `cache` from transformers 5.2x, `past_key_values` before."""


class SegmentCache:
    """What generate() carries from call to call: a StreamDecoder (the carried state and the
    current segment's keys and values, buffers of fixed size) and how many tokens it has read."""

    def __init__(self, model: FoldedLM):
        self.decoder, self.seen = StreamDecoder(model), 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def read(self, ids, keep: int = 0) -> torch.Tensor:
        """ids (B, T), any T -> the logits (B, T, V) of the last `keep` tokens (0: all), fed a
        segment's remainder at a time."""
        l, logits, start = self.decoder.model.cfg.segment_len, [], 0
        while start < ids.shape[1]:
            n = min(l - self.decoder.t, ids.shape[1] - start)
            logits.append(self.decoder.feed(ids[:, start:start + n]))
            if keep:  # only what is kept is held: memory does not grow with the prompt
                logits = [torch.cat(logits, dim=1)[:, -keep:]]
            start += n
        self.seen += ids.shape[1]
        return torch.cat(logits, dim=1)


class FoldscaleForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = FoldscaleConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: FoldscaleConfig):
        super().__init__(config)
        self.model = FoldedLM(config.model_config())
        self.post_init()

    @property
    def _tied_weights_keys(self):
        return {"model.lm_head.weight": "model.tok_emb.weight"} if self.config.tie_embeddings else {}

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() gets forward's SegmentCache, not a DynamicCache

    def _init_weights(self, module):
        if isinstance(module, FoldedLM):  # the rotary tables are not saved (non-persistent buffers)
            cos, sin = module.rotary_tables(module.rope_cos.device)
            module.rope_cos.copy_(cos)
            module.rope_sin.copy_(sin)
        else:
            super()._init_weights(module)

    def get_input_embeddings(self):
        return self.model.tok_emb

    def get_output_embeddings(self):
        return self.model.lm_head

    def forward(self, input_ids, attention_mask=None, cache=None, use_cache=None, labels=None, logits_to_keep=0,
                past_key_values=None, **kwargs) -> CausalLMOutputWithPast:
        """input_ids (B, T), any T, read from the start of a document, or after what `cache` (the
        older transformers' `past_key_values`) has read. attention_mask may not mark padding: every
        token is read into the carried state."""
        cache = cache if cache is not None else past_key_values
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("padded inputs are not supported: a folded model reads every token into its carried "
                             "state; give sequences of equal length (lm-eval: batch_size=1)")
        if cache is None and not use_cache:
            logits = self.model.forward_stream(input_ids).logits
            logits = logits[:, -logits_to_keep:] if logits_to_keep else logits
        else:
            cache = SegmentCache(self.model) if cache is None else cache
            logits = cache.read(input_ids, logits_to_keep)
        loss = None
        if labels is not None:  # HF's convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE: cache})
