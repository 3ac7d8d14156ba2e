import json

import pytest
import torch
import torch.nn.functional as F

from experiments import passkey
from experiments.longctx.train import TrainArgs, lr_at, score
from foldscale.config import ModelConfig
from foldscale.model import FoldedLM

VOCAB = passkey.Vocab(32)
L = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def batch(distance, seed=0, n=4):
    return passkey.make_batch(n, distance, VOCAB, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("distance", [1, 8, 37])
def test_generator_layout(distance):
    ids, targets = batch(distance)
    T = passkey.sequence_len(distance)
    assert ids.shape == targets.shape == (4, T) == (4, distance + 12)
    key = ids[:, 1:6]
    assert ((key >= 1) & (key <= 10)).all()
    assert (ids[:, 0] == VOCAB.key).all() and (ids[:, T - 6] == VOCAB.query).all()
    assert (ids[:, 6:T - 6] >= passkey.FIRST_FILLER).all() and (ids[:, 6:T - 6] < VOCAB.key).all()
    assert (ids == VOCAB.key).sum(1).eq(1).all() and (ids == VOCAB.query).sum(1).eq(1).all()
    assert torch.equal(ids[:, T - 5:], key)  # the answer repeats the key
    assert torch.equal(targets[:, T - 6:T - 1], key)  # QUERY predicts d1, ..., d4 predicts d5
    mask = torch.ones_like(targets, dtype=torch.bool)
    mask[:, T - 6:T - 1] = False
    assert (targets[mask] == -100).all()


def test_generator_filler_is_varied_and_seeds_differ():
    ids, _ = batch(64)
    assert ids[:, 6:-6].unique().numel() > 5
    assert not torch.equal(batch(8, seed=0)[0][:, 1:6], batch(8, seed=1)[0][:, 1:6])


def model(local_only=False, dtype=torch.float64, **kw):
    """A folded model, or the local-only ablation holding the same weights."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB.size, d_model=32, n_head=2, n_local=1, n_global=2, segment_len=L, **kw)
    m = FoldedLM(cfg)
    if local_only:
        weights, m = m.state_dict(), FoldedLM(cfg.local_only())
        m.load_state_dict(weights)
    return m.to(dtype).eval()


def logits_with_other_key(m, distance):
    ids, _ = batch(distance, n=2)
    changed = ids.clone()
    changed[:, 1:6] = changed[:, 1:6] % 10 + 1  # every key digit replaced by another digit
    changed[:, -5:] = ids[:, -5:]  # the answer tokens stay, so only the key upstream differs
    with torch.no_grad():
        return m.forward_stream(ids).logits[:, -6:-1], m.forward_stream(changed).logits[:, -6:-1]


@pytest.mark.parametrize("multiple", [2, 3, 8])
def test_local_only_never_sees_the_key(multiple):
    before, after = logits_with_other_key(model(local_only=True), multiple * L)
    assert before.shape == (2, 5, VOCAB.size)
    assert torch.equal(before, after)


def test_carried_state_reaches_the_key():
    before, after = logits_with_other_key(model(), 8 * L)
    assert (before - after).abs().max() > 1e-9


def test_score_matches_forward_stream():
    m = model()
    ids, targets = batch(3 * L + 1)  # the answer straddles a segment boundary
    targets[0, -2] = (targets[0, -2] % 10) + 1  # one row with a wrong last digit
    with torch.no_grad():
        s = score(m, ids, targets)
        logits = m.forward_stream(ids).logits[:, -6:-1]
    answer = targets[:, -6:-1]
    assert s.n_tokens == answer.numel()
    assert torch.allclose(s.loss, F.cross_entropy(logits.flatten(0, 1), answer.flatten(), reduction="sum"))
    assert torch.equal(s.exact, (logits.argmax(-1) == answer).all(1))


def test_quick_end_to_end(tmp_path):
    out = tmp_path / "passkey.json"
    passkey.main(["--quick", "--baseline", "--json", str(out)])
    record = json.loads(out.read_text())
    multiples = [1, 2, 4, 8]
    assert [r["multiple"] for r in record["rows"]] == multiples
    window = record["baseline_model"]["segment_len"]
    for r in record["rows"]:
        assert r["distance"] == r["multiple"] * record["model"]["segment_len"]
        for name in ("folded", "local_only"):
            assert 0.0 <= r[name] <= 1.0
        if passkey.sequence_len(r["distance"]) <= window:
            assert 0.0 <= r["full_attention"] <= 1.0
        else:
            assert r["full_attention"] is None
    assert record["train"]["folded"]["steps"] == 30 and record["seed"] == 0


@pytest.mark.parametrize("bptt, key_gets_gradient", [(5, True), (8, True), (3, False)])
def test_bptt_cuts_the_gradient_back_to_the_key(bptt, key_gets_gradient):
    """The key sits in segment 0 of 5 (answer in segment 4): backpropagating through the last 3
    segments' states cannot reach the key's embedding, through 5 or more it does (untied, so the
    LM head's softmax does not touch that embedding row). The suite's score follows the model's
    bptt_segments, the one meaning of bptt."""
    m = model(tie_embeddings=False, bptt_segments=bptt)
    ids, targets = batch(4 * L - 4)  # sequence_len = 4L + 8: five segments
    key = VOCAB.key
    score(m, ids, targets).loss.backward()
    grad = m.tok_emb.weight.grad[key].abs().max()
    assert (grad > 0) == key_gets_gradient


def test_lr_warms_up_then_decays_by_cosine():
    args = TrainArgs(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(args, 0, 0.0) == pytest.approx(1e-4)
    assert lr_at(args, 9, 0.0) == pytest.approx(1e-3)
    assert lr_at(args, 100, 0.5) == pytest.approx(0.55e-3)
    assert lr_at(args, 100, 1.0) == pytest.approx(1e-4)
    assert lr_at(TrainArgs(lr=1e-3, warmup_steps=1), 100, 0.7) == pytest.approx(1e-3)
