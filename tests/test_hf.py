"""`foldscale export --format hf`: transformers loads the directory with no foldscale, its logits and
greedy tokens are FoldedLM's, its tokenizer sentencepiece's, and foldscale reads it back."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from foldscale import FoldedLM, ModelConfig, generate
from foldscale.cli import main
from tests.data_helpers import CODE_SAMPLE, train_small_tokenizer

pytest.importorskip("transformers")

BASE = ModelConfig(vocab_size=512, d_model=32, n_head=4, n_local=1, n_global=1, segment_len=8)
VARIANTS = {"default": BASE,
            "state_gate_hard": dataclasses.replace(BASE, state_gate=True, state_gate_hard=True, state_norm=True),
            "local_only": BASE.local_only()}
T = 3 * BASE.segment_len + 5  # 3 segments and a partial one
PROMPT, NEW = 2 * BASE.segment_len + 3, 2 * BASE.segment_len

# Runs where foldscale cannot be imported: everything it uses comes from the exported directories.
NO_FOLDSCALE = """
import json, sys, torch
sys.modules["foldscale"] = None
from transformers import AutoModelForCausalLM, AutoTokenizer
tmp, names, text = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
ids = torch.load(f"{tmp}/ids.pt")
out = {}
for name in names:
    model = AutoModelForCausalLM.from_pretrained(f"{tmp}/{name}-hf", trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(f"{tmp}/{name}-hf", trust_remote_code=True)
    with torch.no_grad():
        plain = model(ids).logits
        cached = model(ids, use_cache=True).logits
    new = model.generate(ids[:1, :%d], max_new_tokens=%d, do_sample=False, eos_token_id=None)
    enc = tok(text)["input_ids"]
    out[name] = dict(plain=plain, cached=cached, new=new[0, %d:], enc=enc, dec=tok.decode(enc),
                     cls=type(model).__name__, max_len=model.config.max_position_embeddings)
torch.save(out, f"{tmp}/out.pt")
""" % (PROMPT, NEW, PROMPT)


def export(*args):
    return CliRunner().invoke(main, ["export", *map(str, args)])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A safetensors export of each variant (random weights, a real tiny tokenizer), each exported
    again with --format hf, and what transformers makes of them in a process without foldscale."""
    tmp = tmp_path_factory.mktemp("hf")
    tok = train_small_tokenizer(tmp / "tokenizer.model", vocab_size=BASE.vocab_size)
    models = {}
    for i, (name, cfg) in enumerate(VARIANTS.items()):
        torch.manual_seed(i)
        models[name] = FoldedLM(cfg).eval()
        models[name].save_pretrained(tmp / name)
        (tmp / name / "tokenizer.model").write_bytes(tok.path.read_bytes())
        result = export(tmp / name, "--format", "hf", "--out", tmp / f"{name}-hf")
        assert result.exit_code == 0, result.output
    ids = torch.randint(0, BASE.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp / "ids.pt")
    env = {**os.environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp / "modules")}
    run = subprocess.run([sys.executable, "-c", NO_FOLDSCALE, str(tmp), json.dumps(list(VARIANTS)), CODE_SAMPLE],
                         cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return tmp, models, ids, tok, torch.load(tmp / "out.pt")


@pytest.mark.parametrize("name", VARIANTS)
def test_transformers_logits_equal_forward_stream(exported, name):
    tmp, models, ids, _, out = exported
    with torch.no_grad():
        expected = models[name].forward_stream(ids).logits
    assert out[name]["cls"] == "FoldscaleForCausalLM"
    assert out[name]["plain"].shape == expected.shape == (2, T, BASE.vocab_size)
    torch.testing.assert_close(out[name]["plain"], expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(out[name]["cached"], expected, atol=1e-4, rtol=0)  # the generate() path
    assert out[name]["max_len"] >= 2**31 - 1  # lm-eval reads this as the longest input: no cut


@pytest.mark.parametrize("name", VARIANTS)
def test_transformers_generate_equals_foldscale_generate(exported, name):
    _, models, ids, _, out = exported
    expected = generate(models[name], ids[:1, :PROMPT], NEW, temperature=0)[0, PROMPT:]
    assert out[name]["new"].tolist() == expected.tolist()


def test_hf_tokenizer_is_sentencepiece(exported):
    _, _, _, tok, out = exported
    assert out["default"]["enc"] == tok.encode(CODE_SAMPLE)
    assert out["default"]["dec"] == CODE_SAMPLE  # code whitespace, \r, tabs, emoji, CJK


@pytest.mark.parametrize("name", VARIANTS)
def test_foldscale_reads_the_hf_directory_back(exported, name):
    tmp, models, ids, _, _ = exported
    back = FoldedLM.from_pretrained(tmp / f"{name}-hf").eval()
    assert back.cfg == models[name].cfg
    with torch.no_grad():
        assert torch.equal(back.forward_stream(ids).logits, models[name].forward_stream(ids).logits)


def test_cache_does_not_grow_with_the_text(exported):
    from foldscale import hf
    tmp = exported[0]
    model, _ = hf.load(tmp / "default-hf")
    sizes = []
    for n in (BASE.segment_len + 1, 40 * BASE.segment_len + 1):
        with torch.no_grad():
            cache = model(torch.ones(1, n, dtype=torch.long), use_cache=True, logits_to_keep=1).cache
        decoder = cache.decoder
        tensors = [t for pair in decoder.caches[0] + decoder.caches[1] for t in pair] + [decoder.state]
        sizes.append(sum(t.numel() for t in tensors))
        assert cache.get_seq_length() == n
    assert sizes[0] == sizes[1]


def test_padding_and_tag_refused(exported):
    from foldscale import hf
    tmp = exported[0]
    model, _ = hf.load(tmp / "default-hf")
    with pytest.raises(ValueError, match="padded inputs are not supported"):
        model(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1]]))
    result = export(tmp / "default", "--format", "hf", "--tag", "step1", "--out", tmp / "x")
    assert result.exit_code == 2 and "exported model, not a run directory" in result.output
