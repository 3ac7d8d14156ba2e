"""FoldedLM: a folded context condensation transformer (DESIGN.md §1).

A document is read segment by segment. Each segment of l tokens goes through a local stack
(causal attention inside the segment) and a global stack over [carried state ; segment]
(2l rows, or m + l with `state_rows` m; the last global block computes only the memory rows'
keys and values, their outputs being read by nothing), and the global stack's output on the
segment (its last m rows) becomes the state carried to the next segment. `segments` is the one
loop that walks a document; decoding lives in generate.py and saving and loading in weights.py.
No DeepSpeed import here: parallelism is applied from outside.
"""
import math
from typing import Iterator, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from .config import ModelConfig
from .kernels import check as check_kernels, linear_cross_entropy
from .weights import Pretrained


def rope_tables(n: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    # The angles are computed in fp32: a bf16 inv_freq is off by radians at position 1000. Only
    # cos and sin are kept, where rounding them to the model's dtype is what using them does anyway.
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(n, device=device, dtype=torch.float32), inv_freq)  # (n, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (n, hs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x[i], x[i + hs/2]) in x's own dtype: four kernels, not ten."""
    x1, x2 = x.chunk(2, dim=-1)  # (..., hs/2) each
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


# Attention never runs on cuDNN's kernels. Their backward returned NaN for a finite forward, in
# eager mode too, stopping 2 of 3 seeds of the suite's passkey training (H100, torch 2.13; flash
# attention: none stopped, BENCHMARKS.md session 7), and they plan anew for each key length when
# decoding (ms a call).
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# One decoded row's attention through flash's variable-length kernel (`Attention.attend_cached`)
# instead of two matrix products and a softmax: checked on a GPU by the tests, off until
# `bench_generate --flash-decoding` shows it faster there
FLASH_DECODING = False
# A global block's attention as one FlexAttention call over all its rows (`memory_rows_mask`)
# instead of two flash calls and a cat (every global block but the last, which computes its current
# rows only); no dropout. `bench_throughput --attention flex` measures it
FLEX_GLOBAL = False


def flash_runs(q) -> bool:
    """Whether flash attention's kernels take queries like Q: a GPU of compute capability 8 or
    more, half precision, head size a multiple of 8 up to 256 (constant under torch.compile)."""
    hs = q.shape[-1]
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and hs % 8 == 0 and hs <= 256
            and torch.cuda.get_device_properties(q.device).major >= 8
            and ATTENTION_BACKENDS[0] == SDPBackend.FLASH_ATTENTION)


def memory_rows_mask(n_mem: int, n: int, device):
    """FlexAttention's block mask of a global block's N rows: the first N_MEM (memory) rows see
    the memory keys, the others those and the current keys causally."""
    def visible(b, h, q, kv):
        return torch.where(q < n_mem, kv < n_mem, kv <= q)
    return create_block_mask(visible, None, None, n, n, device=device)


def causal_to_last_key(q, k, v, dropout_p: float = 0.0) -> torch.Tensor:
    """Attention of t query rows (B, nh, t, hs) over S >= t keys, row i seeing keys 0..S - t + i:
    the causal mask aligned to the last key ("lower right"). Where flash attention runs
    (`flash_runs`) this is its own causal mask, called as torch.nn.attention.bias.CausalBias does
    for its lower-right variant (CausalBias itself breaks the graph under torch.compile);
    elsewhere the mask is spelled out."""
    t, S = q.shape[2], k.shape[2]
    if flash_runs(q):
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal=True)[0]
    visible = torch.ones(t, S, dtype=torch.bool, device=q.device).tril(S - t)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=dropout_p)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, cos, sin, n_mem: int, cache=None, memory_out: bool = True):
        """x: (B, n_mem + t, d). Rows before n_mem are memory rows: they see only memory keys.
        Without memory_out only the current rows' outputs are computed (B, t, d): the memory rows
        give their keys and values and nothing else.

        The t current rows see every memory key and the current keys causally: row n_mem + i sees
        keys 0..n_mem + i, the causal mask aligned to the last key (`causal_to_last_key`), and
        the memory rows attend to the memory keys unmasked: two fused calls, which compute 2.5 l^2
        scores where one causal call over all rows and a second for the memory rows computed 3 l^2
        (with FLEX_GLOBAL: one FlexAttention call under `memory_rows_mask`).
        With a cache (decoding, generate.KVCache) x holds only the new rows, at cache.positions,
        and they attend to the cached keys by the same rule.
        """
        B, T, d = x.shape
        # The rotation runs in the layout the projection writes (B, T, nh, hs), before the transpose, so
        # that its backward writes the projection's gradient in order (transposed: 4 times a copy's time).
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)  # (B, T, nh, hs)
        cos, sin = cos[:, None].to(q.dtype), sin[:, None].to(q.dtype)  # (T, 1, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        with sdpa_kernel(ATTENTION_BACKENDS):
            if cache is not None:
                return self.proj(self.attend_cached(q, k, v, n_mem, cache).reshape(B, T, d))
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs)
            p = self.dropout if self.training else 0.0
            if n_mem and not memory_out:
                y = causal_to_last_key(q[:, :, n_mem:], k, v, p)
            elif n_mem and FLEX_GLOBAL and not p:
                y = flex_attention(q, k, v, block_mask=memory_rows_mask(n_mem, T, q.device))
            elif n_mem:
                y_mem = F.scaled_dot_product_attention(q[:, :, :n_mem], k[:, :, :n_mem], v[:, :, :n_mem], dropout_p=p)
                y = torch.cat([y_mem, causal_to_last_key(q[:, :, n_mem:], k, v, p)], dim=2)
            else:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(B, y.shape[2], d))

    @staticmethod
    def attend_cached(q, k, v, n_mem: int, cache):
        """q, k, v (B, T, nh, hs): the new rows' k, v are written into the cache (B, L, nh, hs); a row
        at position i sees the cached keys 0..max(i, n_mem - 1). Shapes do not depend on the
        position (what a CUDA graph needs): one new row is read by flash attention's
        variable-length kernel told how many of the L keys are used (`seqused_k`), where flash runs.
        Elsewhere the whole buffer is read and the later keys masked: one row through two matrix
        products and a softmax (for a masked single query SDPA picks the memory-efficient kernel,
        which tiles 64 queries and took 44 us a block of a 2 ms step on the H100: 58% of it)."""
        cache.k.index_copy_(1, cache.positions, k)
        cache.v.index_copy_(1, cache.positions, v)
        (B, T, nh, hs), L = q.shape, cache.k.shape[1]
        seen = cache.positions.clamp(min=n_mem - 1)  # (T,): the last key each row sees
        if T == 1 and FLASH_DECODING and flash_runs(q):
            starts = torch.arange(B + 1, dtype=torch.int32, device=q.device)  # one query and L keys each
            used = (seen + 1).to(torch.int32).repeat(B)
            return torch.ops.aten._flash_attention_forward(
                q.reshape(B, nh, hs), cache.k.view(B * L, nh, hs), cache.v.view(B * L, nh, hs), starts, starts * L,
                1, L, 0.0, False, False, seqused_k=used)[0].view(B, 1, nh, hs)
        visible = torch.arange(L, device=q.device) <= seen[:, None]  # (T, L)
        q, keys, values = q.transpose(1, 2), cache.k.transpose(1, 2), cache.v.transpose(1, 2)  # (B, nh, ., hs)
        if T > 1:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=visible).transpose(1, 2)
        scores = torch.matmul(q, keys.transpose(-1, -2))  # (B, nh, 1, L), softmax in fp32 at least
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * hs ** -0.5
        y = torch.matmul(scores.masked_fill(~visible, float("-inf")).softmax(-1).to(q.dtype), values)
        return y.transpose(1, 2)


class MLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.ffn_dim, bias=False)
        self.down = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, n_mem: int = 0, cache=None, memory_out: bool = True):
        """x (B, n_mem + t, d) -> the same rows, or without memory_out the t current rows only."""
        y = self.attn(self.norm1(x), cos, sin, n_mem, cache, memory_out)
        x = (x if memory_out else x[:, n_mem:]) + self.drop(y)
        return x + self.drop(self.mlp(self.norm2(x)))


class StateCarry(nn.Module):
    """The state carried to the next segment, from the memory rows S the segment read and the
    global stack's output C on the segment's last m rows (B, m, d), m = memory_rows.

    The paper carries C. With `state_gate` it carries g * S + (1 - g) * C, g = sigmoid(W [S ; C] + b)
    per row and channel, so a row whose gate saturates at 1 is carried nearly unchanged. With
    `state_norm` the result is RMS-normalised with no learned scale, so its norm cannot grow
    segment after segment and normalising twice changes nothing. With `state_gate_hard` the gate
    is clamp(1.2 g - 0.1, 0, 1), which reaches exactly 0 and 1, and the norm applies to C before
    the mix, so a channel whose gate is at 1 is carried bit for bit, for any number of segments.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(2 * cfg.d_model, cfg.d_model) if cfg.state_gate else None
        self.hard = cfg.state_gate_hard
        self.norm_eps = cfg.norm_eps if cfg.state_norm else None

    def forward(self, memory, x):
        normalise = (lambda t: t) if self.norm_eps is None else (
            lambda t: F.rms_norm(t, (t.shape[-1],), eps=self.norm_eps))
        if self.hard:
            x = normalise(x)  # a convex mix of bounded rows stays bounded: no norm after it
        if self.gate is not None:
            g = self.opening(self.gate(torch.cat([memory, x], dim=-1)))
            x = g * memory + (1 - g) * x
        return x if self.hard else normalise(x)

    def opening(self, z):
        """The gate g from its pre-activation z: sigmoid(z), or with `state_gate_hard` the
        stretched clamp(1.2 sigmoid(z) - 0.1, 0, 1)."""
        g = torch.sigmoid(z)
        return (1.2 * g - 0.1).clamp(0.0, 1.0) if self.hard else g


class LMOutput(NamedTuple):  # a NamedTuple, so that ZeRO-3's hooks find the tensors inside
    logits: torch.Tensor | None  # (B, T, V)
    loss: torch.Tensor | None  # mean cross-entropy over counted targets
    state: torch.Tensor | None  # (B, m, d), the state to carry into the next segment (m = memory_rows)
    n_tokens: torch.Tensor | None = None  # counted targets, a 0-d tensor
    token_loss: torch.Tensor | None = None  # (B, T) per-token cross-entropy, 0 where ignored


class FoldedLM(Pretrained, nn.Module):
    """`model(ids, state, reset, targets)` reads one segment; `forward_stream` a whole document.

    The surface decoding uses (generate.py): `embed`, `local_blocks`, `global_blocks` (called with
    a generate.KVCache), `rotary`, `memory`, `next_state`, `head`.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.local_blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_local))
        self.global_blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_global))
        # S0: the state every document starts from, learned.
        self.s0 = nn.Parameter(torch.zeros(cfg.memory_rows, cfg.d_model)) if cfg.recurrent else None
        self.carry = StateCarry(cfg) if cfg.recurrent else None
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.drop = nn.Dropout(cfg.dropout)
        # Rotary tables for positions 0..m+l-1, every length used is a prefix or a slice. Buffers, not
        # computed in forward: torch.compile would fuse the cos/pow into every block's kernels and
        # recompute them for every element (about 13 ms of a 152 ms micro-step in the 350m's H100 profile).
        cos, sin = self.rotary_tables("cpu")
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.checkpoint_fn = None
        # Submodules are initialised through Module.apply: ZeRO-3's zero.Init partitions a submodule's
        # parameters as soon as it is built and gathers them again only for a function applied that way.
        self.apply(self._init_weights)
        depth_scale = cfg.init_std / math.sqrt(2 * (cfg.n_local + cfg.n_global))
        for block in (*self.local_blocks, *self.global_blocks):
            for into_residual in (block.attn.proj, block.mlp.down):
                into_residual.apply(lambda m: nn.init.normal_(m.weight, std=depth_scale))
        if self.s0 is not None:
            nn.init.normal_(self.s0, std=cfg.init_std)

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.cfg.init_std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def set_activation_checkpointing(self, checkpoint_fn=None):
        """Recompute each block in the backward pass through `checkpoint_fn(block, *args)`.

        Pass e.g. `functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)`
        or DeepSpeed's `deepspeed.checkpointing.checkpoint`; None turns it off.
        """
        self.checkpoint_fn = checkpoint_fn

    def _run(self, block, x, cos, sin, n_mem, memory_out=True):
        if self.checkpoint_fn is not None and self.training and torch.is_grad_enabled():
            return self.checkpoint_fn(block, x, cos, sin, n_mem, None, memory_out)
        return block(x, cos, sin, n_mem, None, memory_out)

    def embed(self, ids) -> torch.Tensor:
        return self.drop(self.tok_emb(ids))  # (B, t, d)

    def rotary_tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables (fp32) of every position the model uses, 0..m+l-1 (`cfg.global_rows`)."""
        return rope_tables(self.cfg.global_rows, self.cfg.head_dim, self.cfg.rope_theta, device)

    def rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (n, hs) of positions (n,) in [0, m + l): 0..m-1 are the memory rows' in the global stack."""
        return self.rope_cos.index_select(0, positions), self.rope_sin.index_select(0, positions)

    def memory(self, state, reset, batch_size: int, dtype) -> torch.Tensor:
        """The memory rows a segment reads (B, m, d): the carried state, or S0 where a document
        starts (reset, (B,) bool), and always S0 in the local-only ablation."""
        s0 = self.s0.unsqueeze(0).expand(batch_size, -1, -1).to(dtype)
        if state is None or not self.cfg.use_state:
            return s0
        if reset is not None:
            return torch.where(reset.view(batch_size, 1, 1), s0, state.to(dtype))
        return state.to(dtype)

    def next_state(self, memory, x) -> torch.Tensor:
        """The state to carry, from the memory rows (B, m, d) the segment read and the global stack's
        output x (B, l, d) on the segment's rows: its last m rows."""
        return self.carry(memory, x[:, x.shape[1] - memory.shape[1]:])

    def head(self, x) -> torch.Tensor:
        return self.lm_head(self.norm(x))  # (B, t, V)

    def as_full_attention(self, window: int) -> "FoldedLM":
        """A plain causal GPT over `window` tokens (cfg.full_attention) made of this model's
        embedding, blocks, norm and head, the global blocks after the local ones; S0 and the
        carry are left out. The full-attention reference fine-tuned from the same backbone."""
        first_global = self.cfg.n_local
        state = {}
        for key, value in self.export_state_dict().items():
            if key == "s0" or key.startswith("carry."):
                continue
            if key.startswith("global_blocks."):
                index, rest = key[len("global_blocks."):].split(".", 1)
                key = f"local_blocks.{first_global + int(index)}.{rest}"
            state[key] = value
        return type(self).from_state_dict(self.cfg.full_attention(window), state, "as_full_attention")

    kernels = "torch"

    def set_kernels(self, kernels: str) -> "FoldedLM":
        """KERNELS "torch" (the default) or "liger" (a CUDA GPU with liger-kernel): with "liger" a
        segment with targets runs the head and loss as one chunked kernel (foldscale/kernels.py) and
        returns logits=None and a detached token_loss. Refuses, saying what to use, where it cannot run."""
        self.kernels = check_kernels(kernels)
        return self

    def forward(self, ids, state=None, reset=None, targets=None) -> LMOutput:
        """One segment. ids (B, t) with t <= l; state (B, m, d) or None (all streams start a
        document); reset (B,) bool swaps S0 in for those streams; targets (B, t), -100 ignored.
        """
        B, t = ids.shape
        l, m = self.cfg.segment_len, self.cfg.memory_rows
        if t > l:
            raise ValueError(f"segment of {t} tokens is longer than segment_len={l}; use forward_stream")
        x = self.embed(ids)
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        for block in self.local_blocks:
            x = self._run(block, x, cos, sin, 0)
        new_state = None
        if self.cfg.recurrent:
            memory = self.memory(state, reset, B, x.dtype)
            z = torch.cat([memory, x], dim=1)  # (B, m + t, d): [memory ; current]
            cos, sin = self.rope_cos[:m + t], self.rope_sin[:m + t]
            # the memory rows' outputs of the last block are read by nothing: it gives their keys and
            # values, and computes the current rows only
            last = len(self.global_blocks) - 1
            for i, block in enumerate(self.global_blocks):
                z = self._run(block, z, cos, sin, m, i < last)
            x = z  # (B, t, d)
            new_state = self.next_state(memory, x) if t == l else None  # carried from whole segments only
        if targets is not None and self.kernels == "liger":  # the (B, t, V) logits never exist
            n = (targets != -100).sum()
            total, token_loss = linear_cross_entropy(self.norm(x), self.lm_head.weight, targets)
            return LMOutput(None, total / n.clamp(min=1), new_state, n, token_loss)
        logits = self.head(x)
        loss = n = token_loss = None
        if targets is not None:
            n = (targets != -100).sum()  # a tensor: no host sync in the training step
            wide = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least
            token_loss = F.cross_entropy(wide.flatten(0, 1), targets.flatten(), reduction="none").view(B, t)  # 0 where ignored
            loss = token_loss.sum() / n.clamp(min=1)
        return LMOutput(logits, loss, new_state, n, token_loss)

    def forward_stream(self, ids, targets=None, state=None, reset=None, bptt=None, keep_logits=True,
                       step=None) -> LMOutput:
        """Any length T, segment by segment with the carried state (`segments`): logits (B, T, V)
        (None unless keep_logits), the mean loss over all counted targets, token_loss (B, T), and
        the state after the last *complete* segment, detached. bptt defaults to the config's
        bptt_segments; `step` (default: this model) runs one segment, e.g. a DeepSpeed engine
        wrapping it. Under torch.no_grad() with keep_logits=False memory does not grow with T.
        """
        step = self if step is None else step
        bptt = self.cfg.bptt_segments if bptt is None else bptt
        logits, token_losses, total, count = [], [], 0.0, 0
        for out in segments(step, ids, self.cfg.segment_len, targets, state, reset, bptt):
            if keep_logits:
                logits.append(out.logits)
            if targets is not None:
                token_losses.append(out.token_loss)
                total, count = total + out.loss * out.n_tokens, count + out.n_tokens
            if out.state is not None:  # carried from whole segments only
                state = out.state
        state = None if state is None else state.detach()
        logits = torch.cat(logits, dim=1) if keep_logits else None
        if targets is None:
            return LMOutput(logits, None, state)
        return LMOutput(logits, total / count.clamp(min=1), state, count, torch.cat(token_losses, dim=1))


def segments(step, ids, segment_len: int, targets=None, state=None, reset=None, bptt: int = 1) -> Iterator[LMOutput]:
    """The one loop over a document's segments: every training, evaluation and experiment walk
    of a sequence goes through it.

    ids, targets (B, T) are cut into segments of segment_len (the last may be short); reset
    (B, n_segments) bool or None marks a document's first segment per stream; `step(ids, state=,
    reset=, targets=)` runs one segment (a FoldedLM, or a DeepSpeed engine around one). Yields
    each segment's LMOutput. The state is carried from every complete segment to the next.

    Truncated back-propagation has one meaning: gradients flow back through the state over the
    last `bptt` segments of the call, i.e. the state entering segment i is detached unless
    i > n_segments - bptt. bptt = 1 detaches it between all segments; bptt >= n_segments keeps
    the whole chain, and bptt > n_segments also lets the gradient into an incoming state that requires it.
    """
    T = ids.shape[1]
    n = -(-T // segment_len)
    for i, start in enumerate(range(0, T, segment_len)):
        if state is not None and i <= n - bptt:
            state = state.detach()
        end = start + segment_len
        # contiguous: a compiled step guards on its inputs' strides, and a slice's strides are the whole
        # batch's, so each sequence length would be a graph of its own (a curriculum's many lengths
        # outran torch._dynamo's recompile limit, and the rest ran eager)
        out = step(ids[:, start:end].contiguous(), state=state,
                   reset=None if reset is None else reset[:, i].contiguous(),
                   targets=None if targets is None else targets[:, start:end].contiguous())
        yield out
        if out.state is not None:  # a short last segment carries none
            state = out.state
