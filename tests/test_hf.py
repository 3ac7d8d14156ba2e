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
from tests.run_helpers import README_PYTHON

pytest.importorskip("transformers")

BASE = ModelConfig(vocab_size=512, d_model=32, n_head=4, n_local=1, n_global=1, segment_len=8)
VARIANTS = {"default": BASE,
            "state_gate_hard": dataclasses.replace(BASE, state_gate=True, state_gate_hard=True, state_norm=True),
            "state_rows": dataclasses.replace(BASE, state_rows=3),
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
    from foldscale.modeling_foldscale import CACHE
    tmp = exported[0]
    model, _ = hf.load(tmp / "default-hf")
    sizes = []
    for n in (BASE.segment_len + 1, 40 * BASE.segment_len + 1):
        with torch.no_grad():
            cache = getattr(model(torch.ones(1, n, dtype=torch.long), use_cache=True, logits_to_keep=1), CACHE)
        decoder = cache.decoder
        tensors = [t for pair in decoder.caches[0] + decoder.caches[1] for t in pair] + [decoder.state]
        sizes.append(sum(t.numel() for t in tensors))
        assert cache.get_seq_length() == n
    assert sizes[0] == sizes[1]


def test_the_readme_blocks_run_on_an_hf_export(exported, tmp_path, monkeypatch):
    HF_BLOCKS = [b for b in README_PYTHON if "model-hf" in b]
    assert HF_BLOCKS
    (tmp_path / "model-hf").symlink_to(exported[0] / "default-hf")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for block in HF_BLOCKS:
        scope = {}
        exec(compile(block, "README.md", "exec"), scope)
        assert scope["out"].shape[1] > scope["tok"]("def main(", return_tensors="pt")["input_ids"].shape[1]


def test_padding_and_tag_refused(exported):
    from foldscale import hf
    tmp = exported[0]
    model, _ = hf.load(tmp / "default-hf")
    with pytest.raises(ValueError, match="padded inputs are not supported"):
        model(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1]]))
    result = export(tmp / "default", "--format", "hf", "--tag", "step1", "--out", tmp / "x")
    assert result.exit_code == 2 and "exported model, not a run directory" in result.output


@pytest.mark.e2e
def test_lm_eval_scores_the_suite_documents_as_the_suite_does(tmp_path):
    """tools.lm_eval_tasks writes the suite's documents; lm-eval (model type foldscale) scores each
    answer with the suite's log-likelihood and exact match; the perplexity task runs too."""
    pytest.importorskip("lm_eval")
    from experiments import suite
    from experiments.longctx import TASKS, text
    from experiments.longctx.train import score
    from foldscale.data import TokenStore, default_store
    from tools.lm_eval_tasks import main as write_tasks
    store = TokenStore.open(default_store(cache_dir=tmp_path / "cache", vocab_size=512, max_files=25, num_proc=1))
    torch.manual_seed(0)
    model = FoldedLM(VARIANTS["state_gate_hard"]).eval()
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "tokenizer.model").write_bytes(Path(store.tokenizer_path).read_bytes())
    assert export(tmp_path / "m", "--format", "hf", "--out", tmp_path / "hf").exit_code == 0
    (tmp_path / "ppl.txt").write_text("def f(x):\n    return x\n\nclass A:\n    pass\n")
    write_tasks(["--out", str(tmp_path / "tasks"), "--data", str(store.path), "--segment-len", "8", "--multiples", "4",
                 "--samples", "4", "--tasks", "passkey,qa2", "--seed", "5", "--text", str(tmp_path / "ppl.txt")])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "mod"),
           "HF_DATASETS_CACHE": str(tmp_path / "ds")}
    run = subprocess.run([sys.executable, "-m", "tools.lm_eval_foldscale", "--model", "foldscale", "--model_args",
                          f"pretrained={tmp_path / 'hf'},trust_remote_code=True,dtype=float32", "--include_path",
                          str(tmp_path / "tasks"), "--tasks", "foldscale_passkey_4,foldscale_qa2_4,foldscale_ppl",
                          "--batch_size", "1", "--device", "cpu", "--log_samples", "--output_path", str(tmp_path / "out")],
                         env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-3000:]
    samples = {p.name.split("_2")[0]: [json.loads(line) for line in p.read_text().splitlines()]
               for p in (tmp_path / "out").rglob("samples_*.jsonl")}
    assert len(samples["samples_foldscale_ppl"]) == 2
    corpus = text.Corpus(store, "val")
    for name in ("passkey", "qa2"):
        rows = sorted(samples[f"samples_foldscale_{name}_4"], key=lambda r: r["doc"]["index"])
        assert [r["doc"]["index"] for r in rows] == [0, 1, 2, 3]
        for row in rows:
            # the suite's document: its default cap on the prefix (min(m + 1, cap) segments) included
            doc = text.eval_doc(TASKS[name](corpus.tokenizer), corpus, 5 + 1000, 4, 8, row["doc"]["index"],
                                suite.parse_args([]).max_prefix_segments)
            ids, targets = (torch.from_numpy(x) for x in text.batch([doc], 0, doc.end))
            with torch.no_grad():
                s = score(model, ids, targets)
            loglik, greedy = row["resps"][0][0]
            assert float(loglik) == pytest.approx(-s.loss.item(), abs=1e-3)
            assert (greedy == "True") == bool(s.exact[0]) and row["acc"] == int(s.exact[0])
