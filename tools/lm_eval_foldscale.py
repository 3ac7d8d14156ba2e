"""`lm_eval` with one more model type, `foldscale`: HFLM (transformers, an `export --format hf`
directory), except that a loglikelihood request's context and target are tokenized apart.

    python -m tools.lm_eval_foldscale --model foldscale \\
        --model_args pretrained=models/x-hf,trust_remote_code=True,dtype=float32 \\
        --include_path tasks --tasks foldscale_suite --batch_size 1

Why not HFLM itself: HFLM moves a context's trailing whitespace into the target and tokenizes
context + target as one text. The suite's questions end in a space ("The pass key is ") and its
documents are pieces tokenized apart, so under HFLM the target gains the space's token and `acc`
would also ask for the space. Tokenized apart, lm-eval reads the suite's own tokens and `acc` is
its exact match. Everything else (generate_until, loglikelihood_rolling, no cut of long inputs
through the config's max_position_embeddings) is HFLM's; `--model hf` works for those too.
"""
from lm_eval.__main__ import cli_evaluate
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM


@register_model("foldscale")
class FoldscaleLM(HFLM):
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return self.tok_encode(context), self.tok_encode(continuation)


if __name__ == "__main__":
    cli_evaluate()
