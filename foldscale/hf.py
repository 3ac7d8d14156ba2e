"""`foldscale export --format hf`: a model directory that transformers loads with no foldscale.

The directory is also a foldscale export (FoldedLM.from_pretrained reads it): model.safetensors
holds FoldedLM's own weights, config.json ModelConfig's fields beside transformers' keys. Besides
them: the modelling code (modeling_foldscale.py, configuration_foldscale.py and the foldscale files
they import, named in config.json's auto_map) and the sentencepiece tokenizer as an HF tokenizer
that encodes to the same ids. Needs the `hf` extra (transformers).
"""
import shutil
from pathlib import Path

import torch

from .config import FoldscaleError, ModelConfig
from .data import Tokenizer

MODEL_FILES = ["configuration_foldscale.py", "modeling_foldscale.py", "model.py", "weights.py", "config.py",
               "kernels.py", "generate.py"]
"""Copied into the directory: the HF classes and every foldscale file they import (relatively)."""
FILES = (*MODEL_FILES, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
"""Everything an HF export writes beside the plain export's files."""
AUTO_MAP = {"AutoConfig": "configuration_foldscale.FoldscaleConfig",
            "AutoModelForCausalLM": "modeling_foldscale.FoldscaleForCausalLM"}
TOKENIZER_CHECK = ("def f(x, y=2):\n\tif x:\n        return  x ** y   # trailing   \n\n\n    elif y:\r\n"
                   "s = 'héllo wörld 日本語 🙂'\n  <s></s><unk><pad> 1234567890\n")
"""Text whose ids the HF tokenizer must give as sentencepiece does: code whitespace, rare
characters (byte fallback), digits, and the special tokens' spellings read as plain text."""


class HFExportError(FoldscaleError):
    """An HF export that does not reproduce the model or its tokenizer."""


def require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise HFExportError("--format hf needs transformers: pip install -e '.[hf]'") from None


def write_hf(cfg: ModelConfig, out: Path) -> None:
    """config.json (with auto_map), generation_config.json, the modelling files and, where OUT
    has tokenizer.model, tokenizer.json + tokenizer_config.json, into OUT beside model.safetensors."""
    from transformers import GenerationConfig

    from .configuration_foldscale import FoldscaleConfig
    here = Path(__file__).parent
    for name in MODEL_FILES:
        shutil.copyfile(here / name, out / name)
    special = {}
    if (out / "tokenizer.model").is_file():
        tok = Tokenizer(out / "tokenizer.model")
        special = dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        write_tokenizer(tok, out)
    config = FoldscaleConfig(**cfg.to_dict(), **special, architectures=["FoldscaleForCausalLM"])
    config.auto_map = AUTO_MAP
    config.save_pretrained(out)
    GenerationConfig(**special).save_pretrained(out)


def write_tokenizer(tok: Tokenizer, out: Path) -> None:
    """The sentencepiece model as transformers' LlamaTokenizer (a tokenizers BPE converted from it):
    no prefix space, no bos/eos added, special tokens' spellings in text read as text, decoding
    with no clean-up. Refused unless it gives sentencepiece's ids and decodes back exactly."""
    import json

    from transformers import AutoTokenizer
    (out / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="LlamaTokenizer", legacy=True, add_prefix_space=False, split_special_tokens=True,
        add_bos_token=False, add_eos_token=False, clean_up_tokenization_spaces=False,
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")))
    hf = AutoTokenizer.from_pretrained(out)
    ids = hf(TOKENIZER_CHECK)["input_ids"]
    if ids != tok.encode(TOKENIZER_CHECK) or hf.decode(ids) != TOKENIZER_CHECK:
        raise HFExportError(f"{tok.path}: transformers' conversion of this tokenizer does not give sentencepiece's "
                            "ids; export with --format safetensors")
    hf.save_pretrained(out)  # + tokenizer.json: loading needs no conversion


def load(directory, dtype=torch.float32):
    """(model, tokenizer or None) of an HF export, through transformers as any user loads it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True, dtype=dtype).eval()
    has_tokenizer = (Path(directory) / "tokenizer.json").is_file()
    return model, AutoTokenizer.from_pretrained(directory, trust_remote_code=True) if has_tokenizer else None
