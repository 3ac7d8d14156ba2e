import importlib
import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F

from foldscale import kernels
from foldscale.config import ConfigError, ModelConfig, TrainConfig
from foldscale.kernels import KernelError, chunked_linear_cross_entropy, linear_cross_entropy
from foldscale.model import FoldedLM

HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None and importlib.util.find_spec("triton") is not None


def head_inputs(n=37, d=16, vocab=29, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, d, generator=g, dtype=torch.float64) / d ** 0.5
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[::5] = -100
    targets[8:16] = -100  # a whole chunk of 8 ignored
    return x.to(device, dtype).requires_grad_(), w.to(device, dtype).requires_grad_(), targets.to(device)


def test_chunked_loss_and_gradients_equal_cross_entropy(one_thread):
    x, w, targets = head_inputs()
    token_loss, grad_x, grad_w = chunked_linear_cross_entropy(x.detach(), w.detach(), targets, True, chunk_rows=8)
    expected = F.cross_entropy(x @ w.t(), targets, reduction="none")
    expected.sum().backward()
    torch.testing.assert_close(token_loss, expected.detach().float())
    assert token_loss[targets == -100].eq(0).all() and grad_x[8:16].eq(0).all()
    torch.testing.assert_close(grad_x, x.grad)
    torch.testing.assert_close(grad_w, w.grad)
    no_grad = chunked_linear_cross_entropy(x.detach(), w.detach(), targets, False, chunk_rows=8)
    assert torch.equal(no_grad[0], token_loss) and no_grad[1].numel() == no_grad[2].numel() == 0


def test_a_second_copy_of_the_module_uses_the_operator_already_defined(tmp_path, monkeypatch, one_thread):
    """An HF export's copy of kernels.py, loaded as another module (as transformers loads it beside
    an installed foldscale), calls the operator foldscale defined instead of defining it again,
    which left foldscale's callers on a freed dispatcher entry; both copies still compute the loss."""
    import shutil
    package = tmp_path / "exported"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("kernels.py", "config.py"):
        shutil.copy(kernels.__file__.replace("kernels.py", name), package / name)
    monkeypatch.syspath_prepend(str(tmp_path))
    copy = importlib.import_module("exported.kernels")
    assert copy is not kernels and copy._linear_cross_entropy_op is kernels._linear_cross_entropy_op
    x, w, targets = head_inputs()
    expected = F.cross_entropy(x @ w.t(), targets, reduction="sum")
    for module in (copy, kernels):
        torch.testing.assert_close(module.linear_cross_entropy(x, w, targets)[0], expected.float())


def test_only_the_total_is_trained_and_token_loss_is_detached(one_thread):
    x, w, targets = head_inputs()
    total, token_loss = linear_cross_entropy(x.view(1, 37, 16), w, targets.view(1, 37))
    n = (targets != -100).sum()
    (total / n).backward()
    got = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    expected = F.cross_entropy(x @ w.t(), targets)  # the mean over counted targets
    expected.backward()
    assert token_loss.shape == (1, 37) and not token_loss.requires_grad
    torch.testing.assert_close(total / n, expected.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(got, (x.grad, w.grad))
    with torch.no_grad():
        total_eval, token_eval = linear_cross_entropy(x, w, targets)
    assert not total_eval.requires_grad and torch.equal(token_eval, token_loss.view(37))


def test_kernel_choice_is_checked():
    with pytest.raises(ConfigError, match="torch, liger"):
        kernels.check("triton")
    with pytest.raises(ConfigError, match="kernels must be one of"):
        TrainConfig(kernels="cuda")
    assert FoldedLM(ModelConfig.load("tiny")).set_kernels("torch").kernels == "torch"


def test_liger_refuses_clearly_without_liger(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel.ops.fused_linear_cross_entropy", None)  # import fails
    model = FoldedLM(ModelConfig.load("tiny"))
    with pytest.raises(KernelError, match="needs liger-kernel and Triton.*use kernels='torch'"):
        model.set_kernels("liger")
    assert model.kernels == "torch"


@pytest.mark.skipif(HAS_LIGER and torch.cuda.is_available(), reason="liger can run here")
def test_liger_refuses_clearly_on_this_machine():
    with pytest.raises(KernelError, match="use kernels='torch'"):
        FoldedLM(ModelConfig.load("tiny")).set_kernels("liger")


def fused_and_plain(monkeypatch, **kw):
    """Two copies of one model: the plain head, and the fused path, which on the CPU runs
    chunked_linear_cross_entropy in liger's place (the plumbing is what is tested here)."""
    monkeypatch.setattr(kernels, "require_liger", lambda: None)
    torch.manual_seed(0)
    cfg = ModelConfig.load("tiny", n_local=1, n_global=2, dropout=0.0, **kw)
    plain = FoldedLM(cfg)
    fused = FoldedLM(cfg).set_kernels("liger")
    fused.load_state_dict(plain.state_dict())
    return cfg, plain, fused


def test_fused_head_matches_the_plain_head(monkeypatch, one_thread):
    cfg, plain, fused = fused_and_plain(monkeypatch)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 3 * cfg.segment_len), generator=g)
    targets = torch.randint(0, cfg.vocab_size, ids.shape, generator=g)
    targets[1, 20:] = -100
    a = plain.forward_stream(ids, targets, bptt=3, keep_logits=False)
    b = fused.forward_stream(ids, targets, bptt=3, keep_logits=False)
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(b.loss, a.loss)
    torch.testing.assert_close(b.token_loss, a.token_loss.detach())
    torch.testing.assert_close(b.state, a.state)
    assert b.n_tokens == a.n_tokens
    assert fused(ids[:, :cfg.segment_len], targets=targets[:, :cfg.segment_len]).logits is None
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    with torch.no_grad():  # evaluation (as Trainer.evaluate); without targets the logits come back as before
        evaluated = (m.forward_stream(ids, targets, keep_logits=False).loss for m in (fused, plain))
        torch.testing.assert_close(*evaluated)
        assert torch.equal(fused(ids[:, :cfg.segment_len]).logits, plain(ids[:, :cfg.segment_len]).logits)


def test_fused_head_compiles_without_graph_breaks(monkeypatch):
    """The chunk loop is one custom operator: dynamo neither breaks at it nor traces into it."""
    cfg, _, fused = fused_and_plain(monkeypatch, state_gate=True, state_norm=True)
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.segment_len))
    state = torch.randn(2, cfg.segment_len, cfg.d_model)
    explained = torch._dynamo.explain(fused)(ids, state=state, reset=torch.tensor([True, False]), targets=ids)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


@pytest.mark.skipif(not (HAS_LIGER and torch.cuda.is_available()), reason="needs liger-kernel and a CUDA GPU")
def test_liger_kernel_matches_cross_entropy_on_the_gpu():
    """liger's chunk loop (several chunks: 8192 rows each at d 256, V 32000) against F.cross_entropy, in bf16."""
    x, w, targets = head_inputs(n=20000, d=256, vocab=32000, dtype=torch.bfloat16, device="cuda")
    total, token_loss = linear_cross_entropy(x, w, targets)
    n = (targets != -100).sum()
    (total / n).backward()
    got = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    expected = F.cross_entropy((x @ w.t()).float(), targets, reduction="none")
    (expected.sum() / n).backward()
    torch.testing.assert_close(token_loss, expected.detach(), rtol=0, atol=2e-2)
    for a, b in zip(got, (x.grad, w.grad)):
        assert (a.float() - b.float()).norm() <= 2e-2 * b.float().norm()
