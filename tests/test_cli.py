"""`foldscale generate` and `foldscale eval` on small random models, and the CLI conventions."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from foldscale.cli import main
from foldscale.config import ModelConfig
from foldscale.data import TokenStore, train_tokenizer, write_store
from foldscale.metrics import bucket_label, bucket_of
from foldscale.generate import generate
from foldscale.model import FoldedLM

L = 8  # the folded model's segment length; the baseline's is 2 L
V = 400
TEXTS = [f"def func_{i}(alpha, beta={i}):\n    \"\"\"Return a value for case {i}.\"\"\"\n    if alpha > beta:\n"
         f"        return alpha * {i} - beta\n    return [x ** 2 for x in range(beta)]\n" for i in range(200)]
TEXTS += ["The quick brown fox jumps over the lazy dog; PACK my BOX with five dozen liquor JUGS! @#$%^&*()_+{}|:<>?~"] * 5


def tokenizer(out, vocab_size=V):
    return train_tokenizer(iter(TEXTS), vocab_size, out)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tokenizer, a folded model and a full-attention baseline saved with it, and a token
    store made with the tokenizer (documents of up to 10 segments)."""
    tmp = tmp_path_factory.mktemp("cli")
    tok = tokenizer(tmp / "tok.model")
    torch.manual_seed(0)
    shapes = {"folded": dict(n_local=1, n_global=1, segment_len=L),
              "baseline": dict(n_local=2, n_global=0, segment_len=2 * L)}
    for name, shape in shapes.items():
        FoldedLM(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_head=4, **shape)).save_pretrained(tmp / name)
        shutil.copyfile(tok.path, tmp / name / "tokenizer.model")
    rng = np.random.default_rng(0)
    docs = [rng.integers(4, tok.vocab_size, int(rng.integers(1, 10 * L))) for _ in range(30)]
    write_store(docs, tmp / "store", vocab_size=tok.vocab_size, val_fraction=0.5, tokenizer_hash=tok.hash)
    return tmp


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def refused(result, message):
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)


def test_every_command_is_there_with_an_example():
    listing = ok("--help").output
    for name in ("info", "tokenizer", "prepare", "export", "generate", "eval"):
        assert name in listing
        if name != "tokenizer":
            assert "Example" in ok(name, "--help").output, name


def test_generation_is_deterministic_under_a_seed(env):
    args = ("generate", env / "folded", "--prompt", "def f(x):\n    return", "--max-new-tokens", 20,
            "--temperature", 1.0, "--top-k", 50)
    first, again = ok(*args, "--seed", 1).output, ok(*args, "--seed", 1).output
    other = ok(*args, "--seed", 2).output
    assert first == again and first != other
    as_json = json.loads(ok(*args, "--seed", 1, "--json").stdout)
    assert as_json["text"] + "\n" == first and as_json["tokens_per_s"] > 0
    assert as_json["prompt_tokens"] > 1 and 0 < as_json["new_tokens"] <= 20


@pytest.mark.parametrize("n_prompt", [1, L - 1, L, L + 1, 3 * L, 3 * L + 5])
def test_streamed_generation_matches_reading_everything_at_once(env, n_prompt):
    """Each greedy token of stream_generate (whole prompt segments folded into the state, a
    partial one kept as tokens) is the argmax of forward_stream over the prompt plus the tokens
    so far; and forward_stream over the prompt in two pieces, the state carried, gives the
    logits of one call."""
    model = FoldedLM.from_pretrained(env / "folded").eval()
    prompt = torch.randint(4, model.cfg.vocab_size, (2, n_prompt), generator=torch.Generator().manual_seed(n_prompt))
    out = generate(model, prompt, 2 * L + 3, temperature=0)
    with torch.no_grad():
        logits = model.forward_stream(out[:, :-1]).logits
        chosen = logits[:, n_prompt - 1:].gather(-1, out[:, n_prompt:, None]).squeeze(-1)
        torch.testing.assert_close(chosen, logits[:, n_prompt - 1:].max(-1).values, atol=1e-5, rtol=0)
        cut = n_prompt // L * L
        if cut and cut < n_prompt:
            first = model.forward_stream(prompt[:, :cut])
            rest = model.forward_stream(prompt[:, cut:], state=first.state)
            whole = model.forward_stream(prompt).logits
            torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), whole, atol=1e-5, rtol=1e-5)


def test_long_prompt_from_a_file(env, tmp_path):
    text = "for i in range(10):\n    print(i * i)\n" * 300
    (tmp_path / "p.txt").write_text(text)
    result = json.loads(ok("generate", env / "folded", "--prompt-file", tmp_path / "p.txt", "--max-new-tokens", 5,
                           "--temperature", 0, "--json").stdout)
    assert result["prompt_tokens"] > 100 * L and result["new_tokens"] <= 5


def direct_by_position(model_dirs, store, l_ref, context=None):
    """Per-token losses by hand: one document at a time, all of it in one forward_stream call
    (with `context`, one call per window of that many predictions, each from a fresh state)."""
    tables = []
    for d in model_dirs:
        model = FoldedLM.from_pretrained(d).eval()
        sums, counts = {}, {}
        for i in store.docs("val"):
            doc = torch.from_numpy(store.doc(int(i)).astype(np.int64))[None]
            if doc.shape[1] < 2:
                continue
            ids, targets, step = doc[:, :-1], doc[:, 1:], context or doc.shape[1]
            with torch.no_grad():
                token_loss = torch.cat([model.forward_stream(ids[:, s:s + step], targets=targets[:, s:s + step])
                                        .token_loss[0] for s in range(0, ids.shape[1], step)])
            for p, loss in enumerate(token_loss.tolist()):
                label = bucket_label(int(bucket_of(torch.tensor([p // l_ref]))[0]))
                sums[label] = sums.get(label, 0.0) + loss
                counts[label] = counts.get(label, 0) + 1
        tables.append(({k: sums[k] / counts[k] for k in sums}, sum(sums.values()) / sum(counts.values())))
    return tables


def test_eval_by_position_agrees_with_a_direct_computation(env, tmp_path):
    result = json.loads(ok("eval", env / "folded", "--data", env / "store", "--streams", 3,
                           "--compare", env / "baseline", "--compare", env / "folded",
                           "--plot", tmp_path / "p.png", "--json").stdout)
    store = TokenStore.open(env / "store")
    assert result["position_unit"] == L and len(result["models"]) == 3
    assert result["models"][2]["model"].endswith("(3)")
    assert result["tokens"] == sum(len(store.doc(int(i))) - 1 for i in store.docs("val"))
    models = [env / "folded", env / "baseline", env / "folded"]
    for got, (table, loss) in zip(result["models"], direct_by_position(models, store, L)):
        assert got["by_position"].keys() == table.keys() == got["tokens_by_position"].keys() and "4-7" in table
        assert sum(got["tokens_by_position"].values()) == result["tokens"]
        for k in table:
            assert got["by_position"][k] == pytest.approx(table[k], rel=1e-5), k
        assert got["loss"] == pytest.approx(loss, rel=1e-5)
        assert got["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_with_limited_context(env):
    """--context 2L: each window of 2L tokens read from a fresh state, as done by hand; a folded
    model then loses (its state carried something useful or not, the loss differs)."""
    store = TokenStore.open(env / "store")
    limited = json.loads(ok("eval", env / "folded", "--data", env / "store", "--context", 2 * L, "--json").stdout)
    full = json.loads(ok("eval", env / "folded", "--data", env / "store", "--json").stdout)
    (table, loss), = direct_by_position([env / "folded"], store, L, context=2 * L)
    got = limited["models"][0]
    assert limited["context"] == 2 * L and got["tokens_by_position"] == full["models"][0]["tokens_by_position"]
    assert got["loss"] == pytest.approx(loss, rel=1e-5)
    for k in table:
        assert got["by_position"][k] == pytest.approx(table[k], rel=1e-5), k
    assert got["by_position"]["0"] == pytest.approx(full["models"][0]["by_position"]["0"], rel=1e-5)
    assert got["by_position"]["4-7"] != pytest.approx(full["models"][0]["by_position"]["4-7"], rel=1e-4)


def test_eval_stops_at_max_tokens_and_prints_a_table(env):
    result = json.loads(ok("eval", env / "folded", "--data", env / "store", "--max-tokens", 100, "--json").stdout)
    assert result["tokens"] == 100
    text = ok("eval", env / "folded", "--data", env / "store", "--compare", env / "baseline").stdout
    assert "segments of 8 tokens" in text and "4-7" in text and "ppl" in text


@pytest.fixture
def damaged(env, tmp_path):
    """A copy of the folded model to damage."""
    shutil.copytree(env / "folded", tmp_path / "m")
    return tmp_path / "m"


def test_generate_refusals(env, damaged, tmp_path):
    gen = ("generate", damaged, "--prompt", "x")
    refused(invoke("generate", tmp_path / "nope", "--prompt", "x"), "no such model directory")
    refused(invoke("generate", damaged), "exactly one of --prompt and --prompt-file")
    refused(invoke(*gen, "--prompt-file", tmp_path / "p.txt"), "exactly one of --prompt and --prompt-file")
    refused(invoke("generate", damaged, "--prompt", ""), "the prompt is empty")
    if not torch.cuda.is_available():
        refused(invoke(*gen, "--device", "cuda"), "no GPU")
    tokenizer(damaged / "tokenizer.model", vocab_size=V + 50)
    refused(invoke(*gen), "this tokenizer does not belong to this model")
    (damaged / "tokenizer.model").unlink()
    refused(invoke(*gen), "tokenizer.model: missing")
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    refused(invoke(*gen), "unreadable or truncated")
    (damaged / "config.json").write_text(json.dumps({"d_model": 32, "n_heads": 4}))
    refused(invoke(*gen), "unknown keys")


def test_eval_refusals(env, damaged, tmp_path):
    refused(invoke("eval", damaged, "--data", tmp_path / "nope"), "token store not found")
    other = write_store([[4, 5, 6]] * 4, tmp_path / "other_vocab", vocab_size=100)
    refused(invoke("eval", damaged, "--data", other.path),
            f"made with another tokenizer (100 tokens, sha256 none) than {damaged} ({V} tokens")
    write_store([[4, 5, 6]] * 4, tmp_path / "other_tok", vocab_size=V, tokenizer_hash="f" * 64)
    refused(invoke("eval", damaged, "--data", tmp_path / "other_tok"),
            f"make a store with the model's own: foldscale prepare --input YOUR_FILES --tokenizer {damaged}/tokenizer.model")
    refused(invoke("eval", env / "folded", "--data", env / "store", "--compare", tmp_path / "nope"),
            "no such model directory")
    (damaged / "config.json").write_text(json.dumps({"d_model": 64, "n_head": 4, "vocab_size": V}))
    refused(invoke("eval", damaged, "--data", env / "store"), "does not match")


def test_eval_names_the_prepare_command_with_the_models_tokenizer(env, tmp_path):
    """A store of the same size of vocabulary made by another tokenizer: its own prepare command,
    with the model's tokenizer, makes one that works."""
    from foldscale.data import prepare
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:40]))
    other = tokenizer(tmp_path / "other.model", vocab_size=V - 10)
    store = prepare(str(tmp_path / "docs.jsonl"), other, tmp_path / "store", num_proc=1)
    result = invoke("eval", env / "folded", "--data", store.path)
    refused(result, "make a store with the model's own: foldscale prepare --input")
    command = result.output.split("make a store with the model's own: ")[1].strip()
    assert f"--tokenizer {env / 'folded' / 'tokenizer.model'}" in command
    from click.testing import CliRunner
    import shlex
    made = CliRunner().invoke(main, shlex.split(command)[1:] + ["--num-proc", "1"])
    assert made.exit_code == 0, made.output
    ok("eval", env / "folded", "--data", f"{store.path}-folded", "--max-tokens", 50)


def test_eval_plot_is_checked_before_evaluating(env, tmp_path):
    refused(invoke("eval", env / "folded", "--data", env / "store", "--plot", tmp_path / "nodir" / "x.png"),
            "no directory")
    refused(invoke("eval", env / "folded", "--data", env / "store", "--plot", tmp_path / "x.xyz"),
            "give a file ending in one of")


def test_swapped_or_unexported_paths_are_recognised(env, tmp_path):
    refused(invoke("eval", env / "store", "--data", env / "folded"), "is an exported model, not a token store")
    refused(invoke("eval", env / "folded", "--data", env / "folded"), "is an exported model, not a token store")
    refused(invoke("generate", env / "store", "--prompt", "x"), "is a token store, not a model")
    (tmp_path / "empty").mkdir()
    result = invoke("generate", tmp_path / "empty", "--prompt", "x")
    refused(result, "holds no model (no config.json)")
    assert result.output.count(str(tmp_path / "empty")) == 1


def test_offset_table_averages_each_part_of_a_segment():
    from foldscale.evaluate import offset_table
    sums = torch.tensor([[1.0, 3.0, 5.0, 7.0, 0.0, 0.0, 2.0, 2.0], [1, 1, 1, 1, 0, 0, 2, 0]], dtype=torch.float64)
    assert offset_table(sums, parts=4) == [2.0, 6.0, None, 2.0]


def test_eval_reads_many_documents_side_by_side(env, monkeypatch):
    """16 documents of 3 segments: three forward calls of 16 rows each (one segment of every
    stream at a time, as training reads), with the losses of one document at a time."""
    from foldscale.evaluate import position_losses
    model = FoldedLM.from_pretrained(env / "folded").eval()
    rng = np.random.default_rng(1)
    docs = [rng.integers(4, V, 3 * L + 1) for _ in range(16)]
    rows = []
    forward = FoldedLM.forward

    def counted(self, ids, *args, **kwargs):
        rows.append(ids.shape[0])
        return forward(self, ids, *args, **kwargs)

    monkeypatch.setattr(FoldedLM, "forward", counted)
    together, by_offset = position_losses(model, docs, L, streams=16, device="cpu")
    assert rows == [16, 16, 16]
    alone = [position_losses(model, [d], L, streams=1, device="cpu")[0] for d in docs]
    assert torch.allclose(together.sums, sum(a.sums for a in alone), rtol=1e-5)
    assert torch.equal(together.counts, sum(a.counts for a in alone))
    # by offset in the segment: the same tokens, each offset counted once per segment read (3 x 16)
    assert torch.equal(by_offset[1], torch.full((L,), 48.0, dtype=torch.float64))
    assert by_offset[0].sum().item() == pytest.approx(together.sums.sum().item(), rel=1e-9)
