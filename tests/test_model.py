import dataclasses
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from foldscale.config import ConfigError, ModelConfig
from foldscale.generate import StreamDecoder, generate
from foldscale.model import Attention, Block, FoldedLM, causal_to_last_key, memory_rows_mask, rope_tables, segments
from foldscale.weights import ModelFileError


def make(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=97, d_model=32, n_head=4, n_local=1, n_global=2,
                                segment_len=8, dropout=0.0), **kw})
    return FoldedLM(cfg).eval()


def randint(*shape, seed=1, high=97):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n_global", [0, 1, 2])
def test_causal_across_segments(n_global):
    model = make(n_global=n_global)
    ids = randint(2, 37)  # 4 whole segments and a short one
    base = model.forward_stream(ids).logits
    for t in (3, 8, 19, 36):
        changed = ids.clone()
        changed[:, t] = (changed[:, t] + 1) % 97
        logits = model.forward_stream(changed).logits
        torch.testing.assert_close(logits[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(logits[:, t], base[:, t])


def test_memory_rows_never_see_current_rows():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=10, d_model=32, n_head=4, segment_len=8)
    attn = Attention(cfg)
    x = torch.randn(2, 16, 32)
    cos, sin = rope_tables(16, cfg.head_dim, cfg.rope_theta, "cpu")
    y = attn(x, cos, sin, n_mem=8)
    x2 = x.clone()
    x2[:, 12:] += torch.randn(2, 4, 32)  # perturb the later current rows
    y2 = attn(x2, cos, sin, n_mem=8)
    torch.testing.assert_close(y2[:, :12], y[:, :12], rtol=0, atol=1e-6)  # memory + earlier current rows
    assert not torch.allclose(y2[:, 12:], y[:, 12:])
    x3 = x.clone()
    x3[:, :8] += 1.0  # current rows do see every memory row
    assert not torch.allclose(attn(x3, cos, sin, n_mem=8)[:, 15], y[:, 15])


def test_state_is_a_recurrence_not_a_cache():
    # The influence of segment 0 fades at initialisation, so look in float64, where a cache
    # (no path from segment 0 to segment 8) would leave the logits bit-identical.
    model = make(n_global=1).double()
    ids = randint(1, 8 * 12)
    changed = ids.clone()
    changed[0, 2] = (changed[0, 2] + 5) % 97  # a token of segment 0
    a, b = model.forward_stream(ids).logits, model.forward_stream(changed).logits
    for seg in range(8, 12):
        assert (a[:, seg * 8:(seg + 1) * 8] - b[:, seg * 8:(seg + 1) * 8]).abs().max() > 1e-12, seg


def test_fewer_state_rows_carry_the_segments_last_rows_and_still_recur():
    """With state_rows m < l the state is the global stack's output on the segment's last m rows,
    read by the next segment as its m memory rows, and it still reaches segments far ahead."""
    model = make(state_rows=3).double()
    outputs = []
    model.global_blocks[-1].register_forward_hook(lambda module, args, out: outputs.append(out))
    ids = randint(1, 8 * 10)
    out = model(ids[:, :8])
    assert out.state.shape == (1, 3, 32) and model.s0.shape == (3, 32)
    torch.testing.assert_close(out.state, outputs[-1][:, -3:], rtol=0, atol=0)  # rows 8..10 of 3 + 8
    changed = ids.clone()
    changed[0, 7] = (changed[0, 7] + 5) % 97  # a token of segment 0 that the state carries
    a, b = model.forward_stream(ids).logits, model.forward_stream(changed).logits
    assert (a[:, 72:] - b[:, 72:]).abs().max() > 1e-12  # segment 9


def test_state_rows_outside_one_to_l_are_refused():
    for rows in (0, 9):
        with pytest.raises(ConfigError, match=f"state_rows={rows} must be in 1..segment_len=8"):
            make(state_rows=rows)


@pytest.mark.parametrize("kw", [{}, dict(state_rows=3), dict(n_global=1), dict(n_global=3, state_gate=True)])
def test_flops_per_token_are_the_matrix_products_a_segment_runs(kw):
    """flops_per_token's matrix products are 3x those torch's FLOP counter sees a segment's forward
    run (the norms counted as their 2d parameters a block, the final norm not): the last global
    block runs only qkv on the memory rows. Its attention: current rows over m keys and causally
    over l, memory rows over m keys in every global block but the last, per trained token."""
    from torch.utils.flop_counter import FlopCounterMode
    model = make(**kw)
    cfg = model.cfg
    d, l, m, n = cfg.d_model, cfg.segment_len, cfg.memory_rows, cfg.n_global
    normed = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.RMSNorm) and name != "norm":
            module.register_forward_hook(lambda mod, args, out: normed.append(args[0].numel()))
    with FlopCounterMode(display=False) as counter:
        model(randint(1, l), state=torch.randn(1, m, d))
    forward = sum(counter.get_flop_counts()["Global"].values())  # matrix products only on a CPU
    attention = 12 * d * (cfg.n_local * l / 2 + n * (m + l / 2) + (n - 1) * m * m / l)
    assert cfg.flops_per_token() == pytest.approx((3 * forward + 6 * sum(normed)) / l + attention, rel=1e-12)


def test_fewer_state_rows_and_the_last_blocks_memory_rows_cost_fewer_flops():
    """The default preset against a folded model whose global stack ran all 2l rows through every
    block (the paper's count): 1.25x full attention over 4l became 1.14x; m = 32 rows cost less."""
    cfg = ModelConfig()
    full = cfg.full_attention(4 * cfg.segment_len).flops_per_token()
    assert cfg.flops_per_token() / full == pytest.approx(1.138, abs=1e-3)
    assert dataclasses.replace(cfg, state_rows=32).flops_per_token() / full == pytest.approx(0.982, abs=1e-3)
    assert dataclasses.replace(cfg, state_rows=cfg.segment_len).flops_per_token() == cfg.flops_per_token()
    assert cfg.full_attention(4 * cfg.segment_len).state_rows is None


def test_local_only_ablation_forgets_previous_segments():
    folded = make()
    model = FoldedLM(folded.cfg.local_only()).eval()
    model.load_state_dict(folded.state_dict())  # the same weights, the state cut
    ids = randint(1, 24)
    changed = ids.clone()
    changed[0, 2] += 1
    a, b = model.forward_stream(ids).logits, model.forward_stream(changed).logits
    torch.testing.assert_close(a[:, 8:], b[:, 8:], rtol=0, atol=0)
    assert not torch.allclose(a[:, 2:8], b[:, 2:8])
    torch.testing.assert_close(a[:, :8], folded.forward_stream(ids).logits[:, :8], rtol=0, atol=0)


def test_full_attention_variant_is_a_plain_gpt_over_its_window():
    cfg = ModelConfig(vocab_size=97, d_model=32, n_head=4, n_local=1, n_global=2, segment_len=8,
                      bptt_segments=2, state_gate=True, state_norm=True)
    base = cfg.full_attention(24)
    assert (base.n_local, base.n_global, base.segment_len, base.bptt_segments) == (3, 0, 24, 1)
    assert base.num_params() == cfg.num_params() - cfg.param_counts()["global"] + 2 * cfg.block_params()
    model = FoldedLM(base).eval()
    ids = randint(1, 24)
    changed = ids.clone()
    changed[0, 0] += 1  # the first token still reaches the last one, 23 tokens later
    assert not torch.allclose(model(ids).logits[:, -1], model(changed).logits[:, -1])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 64


def test_full_attention_from_a_folded_model_keeps_its_blocks_in_order():
    folded = make()  # 1 local block, 2 global
    full = folded.as_full_attention(24)
    assert full.cfg == folded.cfg.full_attention(24)
    params = dict(folded.named_parameters())
    moved = {"local_blocks.1.": "global_blocks.0.", "local_blocks.2.": "global_blocks.1."}
    for name, value in full.named_parameters():
        prefix, rest = name[:len("local_blocks.1.")], name[len("local_blocks.1."):]
        torch.testing.assert_close(value, params[moved[prefix] + rest if prefix in moved else name], rtol=0, atol=0)
    ids = randint(2, 24)
    changed = ids.clone()
    changed[0, 0] += 1
    assert not torch.allclose(full(ids).logits[0, -1], full(changed).logits[0, -1])  # one window of 24
    with torch.no_grad():
        full.tok_emb.weight.add_(1)  # its own weights, not the folded model's
    assert not torch.equal(full.tok_emb.weight, folded.tok_emb.weight)


def test_reset_gives_a_fresh_document():
    model = make()
    ids = randint(2, 8, seed=3)
    state = torch.randn(2, 8, 32)
    out = model(ids, state=state, reset=torch.tensor([True, False]))
    fresh = model(ids[:1])
    kept = model(ids[1:], state=state[1:])
    torch.testing.assert_close(out.logits[:1], fresh.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.logits[1:], kept.logits, rtol=0, atol=1e-6)
    assert not torch.allclose(kept.logits, model(ids[1:]).logits)


def test_forward_stream_equals_segment_loop():
    model = make()
    ids, targets = randint(3, 29, seed=4), randint(3, 29, seed=5)
    targets[0, 10:] = -100
    stream = model.forward_stream(ids, targets=targets)
    assert not stream.state.requires_grad  # a state handed back is always detached
    state, logits, total, n = None, [], 0.0, 0
    for s in range(0, 29, 8):
        out = model(ids[:, s:s + 8], state=state, targets=targets[:, s:s + 8])
        logits.append(out.logits)
        total, n = total + out.loss * out.n_tokens, n + out.n_tokens
        state = out.state if out.state is not None else state  # a short segment carries nothing
    torch.testing.assert_close(stream.logits, torch.cat(logits, 1))
    torch.testing.assert_close(stream.loss, total / n)
    torch.testing.assert_close(stream.state, state)
    assert stream.n_tokens == n == 3 * 29 - 19


def test_loss_ignores_padding_and_matches_cross_entropy():
    model = make()
    ids, targets = randint(2, 8), randint(2, 8, seed=9)
    targets[1, 3:] = -100
    out = model(ids, targets=targets)
    expected = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    assert model(ids, targets=torch.full_like(targets, -100)).loss.item() == 0.0


@pytest.mark.parametrize("bptt", [1, 2, 3, 5, 6])
def test_bptt_means_the_last_k_segments_of_the_backward(bptt):
    """The one meaning of bptt: the loss of the last segment reaches back through the state over
    the last `bptt` segments. Each segment's input embedding gets a gradient from the last
    segment's loss only if it is one of those."""
    model = make().train()
    n = 5
    ids = randint(2, 8 * n)
    targets = randint(2, 8 * n, seed=2)
    targets[:, :8 * (n - 1)] = -100  # only the last segment is scored
    x = model.tok_emb(ids).detach().requires_grad_()
    model.embed = lambda chunk, pieces=iter(x.split(8, dim=1)): next(pieces)
    model.forward_stream(ids, targets=targets, bptt=bptt).loss.backward()
    reached = [bool(g.abs().sum() > 0) for g in x.grad.split(8, dim=1)]
    assert reached == [i >= n - bptt for i in range(n)]


def test_bptt_defaults_to_the_config_and_segments_detaches_by_position():
    model = make(bptt_segments=2).train()
    ids, targets = randint(2, 16), randint(2, 16, seed=2)
    targets[:, :8] = -100  # only segment 1 is scored
    model.forward_stream(ids, targets=targets).loss.backward()
    assert model.s0.grad.abs().sum() > 0  # segment 1 reaches S0 through the carried state
    state = torch.randn(2, 8, 32, requires_grad=True)
    outs = list(segments(model, ids, 8, targets=targets, state=state, bptt=3))
    outs[-1].loss.backward()
    assert state.grad is not None and state.grad.abs().sum() > 0  # bptt > segments: the chain is whole


def test_a_compiled_step_is_one_graph_for_every_sequence_length():
    """segments() hands a compiled step contiguous segments, so sequences of any number of segments
    (a curriculum's, a document's last chunk) reuse the graphs of the first: one for the segment that
    starts from S0, one for the segments that carry a state. A slice's strides would be the whole
    batch's, a new graph per length."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    counter = CompileCounter()
    model = make().train()
    step = torch.compile(model, backend=counter, dynamic=False)
    for n in (2, 3, 5, 4):
        ids, targets = randint(2, 8 * n), randint(2, 8 * n, seed=2)
        reset = torch.zeros(2, n, dtype=torch.bool)
        reset[0, n // 2] = True
        sum(out.loss for out in segments(step, ids, 8, targets=targets, reset=reset, bptt=n)).backward()
    assert counter.frame_count == 2
    torch._dynamo.reset()


def reference_gpt(model, ids):
    """A plain causal transformer written out by hand with the model's weights."""
    cfg = model.cfg
    B, T = ids.shape
    nh, hs = cfg.n_head, cfg.head_dim

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    pos = torch.arange(T, dtype=torch.float64)[:, None]
    freq = cfg.rope_theta ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)
    ang = (pos * freq).float()

    def rope(x):
        a, b = x[..., : hs // 2], x[..., hs // 2:]
        return torch.cat([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], -1)

    mask = torch.ones(T, T).tril().bool()
    x = model.tok_emb.weight[ids]
    for blk in model.local_blocks:
        h = rms(x, blk.norm1.weight)
        q, k, v = (h @ blk.attn.qkv.weight.T).split(cfg.d_model, -1)
        q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in (q, k, v))
        q, k = rope(q), rope(k)
        att = (q @ k.transpose(-1, -2) / math.sqrt(hs)).masked_fill(~mask, float("-inf")).softmax(-1)
        x = x + (att @ v).transpose(1, 2).reshape(B, T, -1) @ blk.attn.proj.weight.T
        h = rms(x, blk.norm2.weight)
        g, u = (h @ blk.mlp.gate_up.weight.T).chunk(2, -1)
        x = x + (F.silu(g) * u) @ blk.mlp.down.weight.T
    return rms(x, model.norm.weight) @ model.tok_emb.weight.T


def test_attention_never_runs_on_cudnn(monkeypatch):
    """Every attention call, training and decoding, runs with cuDNN's kernels switched off (their
    backward returned NaN in training) and flash attention allowed."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = FoldedLM(ModelConfig(vocab_size=64, d_model=32, n_head=2, n_local=1, n_global=1, segment_len=8))
    model.forward_stream(torch.randint(64, (2, 20)), torch.randint(64, (2, 20))).loss.backward()
    training = len(seen)
    generate(model, torch.randint(64, (1, 3)), max_new_tokens=10)
    assert training == 3 * 2 and len(seen) > training  # per segment: local, global (its memory rows give keys only)
    assert set(seen) == {(False, True)}
    assert torch.backends.cuda.cudnn_sdp_enabled()  # only inside attention: the process's setting is left alone


def flex_and_sdpa(monkeypatch, device, dtype, backward: bool):
    """(loss, state, gradients or None) of one forward_stream with model.FLEX_GLOBAL off, then on."""
    import foldscale.model as model_module
    ids, targets = randint(2, 24).to(device), randint(2, 24, seed=2).to(device)
    results = []
    for flex in (False, True):
        monkeypatch.setattr(model_module, "FLEX_GLOBAL", flex)
        model = make(bptt_segments=3).to(device, dtype)
        with torch.set_grad_enabled(backward):
            out = model.forward_stream(ids, targets=targets)
        if backward:
            out.loss.backward()
        results.append((out.loss.detach().float(), out.state.detach().float(),
                        {n: p.grad.float() for n, p in model.named_parameters()} if backward else None))
    return results


def test_flex_global_attention_is_the_two_calls(monkeypatch):
    """With model.FLEX_GLOBAL a global block's rows attend in one FlexAttention call under the
    memory-rows mask: the same loss and carried state as the two SDPA calls, across segments.
    (FlexAttention has no backward on a CPU: the GPU test below checks the gradients.)"""
    (loss, state, _), (flex_loss, flex_state, _) = flex_and_sdpa(monkeypatch, "cpu", torch.float32, backward=False)
    torch.testing.assert_close(flex_loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flex_state, state, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward needs a GPU")
def test_flex_global_attention_has_the_two_calls_gradients(monkeypatch):
    """The same on a GPU with BPTT through the carried state (fp32, eager): loss, state and every
    parameter's gradient. Then the compiled kernel in bf16 at two blocks of 128 rows (memory, then
    current), forward and backward, against the spelled-out mask."""
    (loss, state, grads), (flex_loss, flex_state, flex_grads) = flex_and_sdpa(monkeypatch, "cuda", torch.float32,
                                                                              backward=True)
    torch.testing.assert_close(flex_loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(flex_state, state, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(flex_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    rows = torch.arange(256, device="cuda")
    visible = torch.where(rows[:, None] < 128, rows[None] < 128, rows[None] <= rows[:, None])
    ref = F.scaled_dot_product_attention(*(t.float() for t in (q, k, v)), attn_mask=visible)
    expected = torch.autograd.grad(ref.square().sum(), (q, k, v))
    out = torch.compile(flex_attention, fullgraph=True)(q, k, v, block_mask=memory_rows_mask(128, 256, "cuda"))
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=2e-2)
    for g, e in zip(torch.autograd.grad(out.float().square().sum(), (q, k, v)), expected):
        torch.testing.assert_close(g.float(), e.float(), rtol=0, atol=5e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention's own causal mask needs a CUDA GPU")
def test_flash_causal_to_last_key_is_the_spelled_out_mask():
    """On a GPU in bf16 the global blocks' current rows go through flash attention's causal mask
    called directly (aligned to the last key), forward and backward, compiled without a break."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for n in (8, 24, 24))
    ref = F.scaled_dot_product_attention(*(t.float() for t in (q, k, v)),
                                         attn_mask=torch.ones(8, 24, dtype=torch.bool, device="cuda").tril(16))
    expected = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for fn in (causal_to_last_key, torch.compile(causal_to_last_key, fullgraph=True)):
        out = fn(q, k, v)
        torch.testing.assert_close(out.float(), ref, rtol=0, atol=2e-2)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        for g, e in zip(grads, expected):
            torch.testing.assert_close(g.float(), e.float(), rtol=0, atol=5e-2)


def test_no_global_layers_is_a_plain_gpt():
    model = make(n_global=0, n_local=2, segment_len=24)
    for p in model.parameters():  # make the norms non-trivial too
        p.data.add_(0.01 * torch.randn_like(p))
    ids = randint(2, 24)
    out = model(ids)
    assert out.state is None and model.s0 is None
    torch.testing.assert_close(out.logits, reference_gpt(model, ids), rtol=1e-4, atol=1e-4)


def test_activation_checkpointing_gives_same_gradients():
    grads = []
    for ckpt in (None, functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)):
        model = make().train()
        model.set_activation_checkpointing(ckpt)
        ids, targets = randint(2, 16), randint(2, 16, seed=2)
        model.forward_stream(ids, targets=targets).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("kw", [dict(), dict(n_global=0), dict(state_gate=True, state_norm=True),
                                dict(state_gate=True, state_norm=True, state_gate_hard=True),
                                dict(state_rows=3), dict(state_rows=3, state_gate=True, state_norm=True)])
def test_stream_decoder_gives_forward_stream_logits(kw):
    """Fed in uneven chunks across segment boundaries, the cached decoder gives every logit that
    forward_stream gives for the whole sequence, and carries the same state."""
    model = make(**kw).double()
    ids = randint(2, 37)  # 4 whole segments of 8 and 5 tokens
    full = model.forward_stream(ids)
    decoder = StreamDecoder(model)
    pieces, start = [], 0
    for n in [1, 3, 4, 8, 2, 6, 1, 1, 1, 5, 5]:
        pieces.append(decoder.feed(ids[:, start:start + n]))
        start += n
    assert start == 37
    torch.testing.assert_close(torch.cat(pieces, dim=1), full.logits, rtol=1e-9, atol=1e-9)
    if model.cfg.recurrent:
        torch.testing.assert_close(decoder.state, full.state, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="do not fit"):
        decoder.feed(randint(2, 4))  # 5 tokens are in the segment, 3 are left


def test_decoder_runs_the_blocks_training_runs():
    """The decoder goes through the model's own Block and Attention modules: changed outputs of
    both (forward hooks here, as an edited forward would) change its logits and carried state exactly
    as they change forward_stream's. A decoder with its own copy of the block math misses them."""
    model = make().double()
    ids = randint(2, 21)  # 2 whole segments of 8 and 5 tokens
    plain = model.forward_stream(ids).logits
    for m in model.modules():
        if isinstance(m, Attention):
            m.register_forward_hook(lambda mod, args, out: 1.5 * out)
        if isinstance(m, Block):
            m.register_forward_hook(lambda mod, args, out: out + 0.1)
    full = model.forward_stream(ids)
    assert not torch.allclose(full.logits, plain)
    decoder = StreamDecoder(model)
    pieces = [decoder.feed(ids[:, a:b]) for a, b in [(0, 3), (3, 8), (8, 11)] + [(i, i + 1) for i in range(11, 21)]]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full.logits, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(decoder.state, full.state, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kw", [dict(), dict(n_global=0)])
def test_compiled_one_token_step_gives_forward_stream_logits(kw, monkeypatch):
    """One token at a time through the torch.compile'd step (fullgraph, static shapes), across two
    segment boundaries, the decoder gives forward_stream's logits and state, from one compiled
    graph for every position. The backend is aot_eager (Dynamo's trace and the functionalised
    cache writes, in 2 s); Inductor, which the GPU uses, takes about 30 s to build on this CPU."""
    import importlib
    decoding = importlib.import_module("foldscale.generate")  # `foldscale.generate` is also a function
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    compiled = torch.compile(decoding.step, backend=backend, fullgraph=True, dynamic=False)
    modes = []
    monkeypatch.setattr(decoding, "compiled_step", lambda m: modes.append(m) or compiled)
    model = make(**kw).double()
    ids = randint(2, 21)  # 2 whole segments of 8 and 5 tokens
    full = model.forward_stream(ids)
    decoder = StreamDecoder(model, compile=True)
    pieces = [decoder.feed(ids[:, :3])] + [decoder.feed(ids[:, i:i + 1]) for i in range(3, 21)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full.logits, rtol=1e-9, atol=1e-9)
    if model.cfg.recurrent:
        torch.testing.assert_close(decoder.state, full.state, rtol=1e-9, atol=1e-9)
    assert len(graphs) == 1 and set(modes) == {decoding.DECODE_COMPILE_MODE}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention's kernels need a CUDA GPU")
@pytest.mark.parametrize("kw", [dict(), dict(n_global=0)])
def test_flash_decoding_gives_the_masked_matrix_products_logits(kw, monkeypatch):
    """On a GPU in bf16, with model.FLASH_DECODING a decoded row attends through flash's
    variable-length kernel (the eager run is seen calling it), and the decoder gives the logits of
    the two matrix products and softmax, eager and compiled (Inductor's default mode, quicker to
    build than the decoder's) with its CUDA graph, across segments."""
    import foldscale.model as model_module
    model = make(**kw).cuda().to(torch.bfloat16)
    ids = randint(2, 21).cuda()  # 2 whole segments of 8 and 5 tokens
    calls, flash_forward = [], torch.ops.aten._flash_attention_forward
    logits = {}
    for flash in (False, True):
        monkeypatch.setattr(model_module, "FLASH_DECODING", flash)
        for compiled in (False, True):
            if not compiled:
                monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward",
                                    lambda *a, **k: calls.append(a[0].shape) or flash_forward(*a, **k))
            decoder = StreamDecoder(model, compile="default" if compiled else False, use_graph=compiled)
            pieces = [decoder.feed(ids[:, :3])] + [decoder.feed(ids[:, i:i + 1]) for i in range(3, 21)]
            logits[flash, compiled] = torch.cat(pieces, dim=1).float()
            monkeypatch.setattr(torch.ops.aten, "_flash_attention_forward", flash_forward)
    blocks = model.cfg.n_local + model.cfg.n_global
    assert calls == [(2, model.cfg.n_head, model.cfg.head_dim)] * (18 * blocks)  # each one-token feed, each block
    for compiled in (False, True):
        torch.testing.assert_close(logits[True, compiled], logits[False, compiled], rtol=2e-2, atol=2e-2)


def test_a_compile_mode_reaches_torch_compile(monkeypatch):
    import importlib
    decoding = importlib.import_module("foldscale.generate")
    modes = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: modes.append(kw["mode"]) or fn)
    decoding.compiled_step.cache_clear()
    try:
        model, ids = make(), randint(1, 3)
        logits = StreamDecoder(model, compile="max-autotune-no-cudagraphs").feed(ids[:, :1])
        torch.testing.assert_close(logits, model(ids[:, :1]).logits)
    finally:
        decoding.compiled_step.cache_clear()
    assert modes == ["max-autotune-no-cudagraphs"]


@pytest.mark.parametrize("n_global", [0, 2])
def test_greedy_generate_matches_forward_stream(n_global):
    model = make(n_global=n_global)
    ids = randint(2, 13)
    out = generate(model, ids, max_new_tokens=12, temperature=0)
    seq = ids
    for _ in range(12):
        nxt = model.forward_stream(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_generate_is_deterministic_under_a_seed():
    model = make()
    ids = randint(1, 20)
    a = generate(model, ids, 10, top_k=5, generator=torch.Generator().manual_seed(7))
    b = generate(model, ids, 10, top_k=5, generator=torch.Generator().manual_seed(7))
    c = generate(model, ids, 10, top_k=5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and a.shape == (1, 30)
    assert not torch.equal(a, c)


def test_save_load_round_trip(tmp_path):
    for kw in (dict(), dict(tie_embeddings=False, n_global=0)):
        model = make(**kw)
        model.save_pretrained(tmp_path / "m")
        loaded = FoldedLM.from_pretrained(tmp_path / "m").eval()
        assert loaded.cfg == model.cfg
        for (n, p), (_, q) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(p, q), n
        ids = randint(1, 20)
        assert torch.equal(model.forward_stream(ids).logits, loaded.forward_stream(ids).logits)


def test_tampered_files_are_refused(tmp_path):
    make().save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    with pytest.raises(ModelFileError, match="no such model directory"):
        FoldedLM.from_pretrained(tmp_path / "nothing")
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="model.safetensors: unreadable or truncated"):
        FoldedLM.from_pretrained(tmp_path / "m")
    weights.unlink()
    with pytest.raises(ModelFileError, match="model.safetensors: missing"):
        FoldedLM.from_pretrained(tmp_path / "m")
    weights.write_bytes(data)
    dataclasses.replace(make().cfg, d_model=64).to_json(tmp_path / "m" / "config.json")
    with pytest.raises(ModelFileError, match="does not match.*wrong shapes"):
        FoldedLM.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="config.json.*not valid JSON"):
        FoldedLM.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=False), dict(n_global=0), dict(n_local=0),
                                dict(state_norm=True), dict(state_gate=True, state_norm=True),
                                dict(state_gate=True, state_gate_hard=True), dict(state_rows=3, state_gate=True)])
def test_parameter_count_matches_formula(kw):
    model = make(**kw)
    assert sum(p.numel() for p in model.parameters()) == model.cfg.num_params()
    counts = model.cfg.param_counts()
    assert counts["local"] == sum(p.numel() for p in model.local_blocks.parameters())
    glob = sum(p.numel() for m in (model.global_blocks, model.carry) if m is not None for p in m.parameters())
    glob += model.s0.numel() if model.s0 is not None else 0
    assert counts["global"] == glob


def test_segment_longer_than_l_is_refused():
    with pytest.raises(ValueError, match="longer than segment_len"):
        make()(randint(1, 9))


def test_state_norm_bounds_the_carried_state():
    """The carried rows are a residual stream; with state_norm each carried vector has unit RMS
    (at initialisation) however large the stream grows."""
    rms = {}
    for state_norm in (False, True):
        model = make(n_global=2, state_norm=state_norm)
        model.tok_emb.weight.data.mul_(100.0)  # a large residual stream
        state = None
        for s in range(0, 8 * 6, 8):
            state = model(randint(1, 8, seed=s), state=state).state
        rms[state_norm] = state.pow(2).mean(-1).sqrt()
    assert rms[False].min() > 1.5
    torch.testing.assert_close(rms[True], torch.ones_like(rms[True]), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("bias, keeps_state", [(50.0, True), (-50.0, False)])
def test_state_gate_is_a_highway_between_old_and_new_state(bias, keeps_state):
    """A gate held open (g = 1) carries the incoming state unchanged, bit for bit, segment after
    segment; held shut (g = 0) it carries the paper's state C."""
    model = make(n_global=2, state_gate=True, state_norm=True)
    plain = make(n_global=2, state_norm=True)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("carry.gate")})
    with torch.no_grad():
        model.carry.gate.weight.zero_()
        model.carry.gate.bias.fill_(bias)
    state = F.rms_norm(torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(3)), (32,), eps=0.0)
    ids = randint(2, 8, seed=4)
    gated, paper = model(ids, state=state).state, plain(ids, state=state).state
    if keeps_state:
        carried = state
        for s in range(5, 25):
            carried = model(randint(2, 8, seed=s), state=carried).state
        torch.testing.assert_close(carried, state, rtol=1e-4, atol=1e-4)
        assert (gated - paper).abs().max() > 1e-1
    else:
        torch.testing.assert_close(gated, paper)


def test_hard_gate_carries_a_shut_channel_bit_for_bit_and_stays_bounded():
    """With state_gate_hard a channel whose gate is at 1 leaves the segment exactly as it came in,
    segment after segment (the sigmoid gate with the norm after the mix rescales it every time),
    and the other channels stay bounded by the candidate's unit RMS."""
    for hard in (True, False):
        model = make(state_gate=True, state_norm=True, state_gate_hard=hard)
        with torch.no_grad():
            model.carry.gate.weight.zero_()
            model.carry.gate.bias.fill_(-50.0)
            model.carry.gate.bias[:4] = 50.0  # channels 0-3 held, the rest rewritten
        state = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(3))
        first = state
        for s in range(20):
            state = model(randint(2, 8, seed=s), state=state).state
        held = torch.equal(state[..., :4], first[..., :4])
        assert held == hard
        assert state[..., 4:].pow(2).mean(-1).sqrt().max() < 2.0


def test_hard_gate_needs_the_gate():
    with pytest.raises(ConfigError, match="state_gate_hard needs state_gate"):
        ModelConfig(state_gate_hard=True)


def test_state_norm_is_idempotent():
    """No learned scale: normalising a normalised state changes nothing, so a carried row is not
    rescaled channel by channel once per segment."""
    model = make(state_norm=True)
    assert not list(model.carry.parameters())
    x = torch.randn(2, 8, 32) * 5
    memory = torch.randn(2, 8, 32)
    once = model.next_state(memory, x)
    torch.testing.assert_close(model.next_state(memory, once), once, rtol=1e-4, atol=1e-4)  # eps = 1e-5 aside


def test_compiles_without_graph_breaks():
    """torch.compile sees one graph per segment: a break (e.g. building a CausalBias inside the
    model) splits it at every global block and loses the fusions across the split."""
    cfg = ModelConfig.load("tiny", n_local=2, n_global=2, state_gate=True, state_norm=True)
    model = FoldedLM(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.segment_len))
    state = torch.randn(2, cfg.segment_len, cfg.d_model)
    explained = torch._dynamo.explain(model)(ids, state=state, reset=torch.tensor([True, False]), targets=ids)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
