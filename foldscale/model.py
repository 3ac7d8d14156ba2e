"""FoldedLM: a folded context condensation transformer (DESIGN.md §1).

A document is read segment by segment. Each segment of l tokens goes through a local stack
(causal attention inside the segment) and a global stack over [carried state ; segment]
(2l rows), and the global stack's output on the segment becomes the state carried to the next
segment. No DeepSpeed import here: parallelism is applied from outside.
"""
import json
import math
from typing import NamedTuple
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from foldscale.config import ConfigError, FoldscaleError, ModelConfig


class ModelFileError(FoldscaleError):
    """A saved model that cannot be loaded; the message names the file and the problem."""


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


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def rotated_qkv(self, x, cos, sin):
        """x (B, T, d) -> q, k, v (B, nh, T, hs), q and k rotated. The rotation runs in the layout
        the projection writes (B, T, nh, hs), before the transpose, so that its backward writes the
        projection's gradient in order (transposed, it took about 4 times a copy's time on the H100)."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)  # (B, T, nh, hs)
        cos, sin = cos[:, None].to(q.dtype), sin[:, None].to(q.dtype)  # (T, 1, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, cos, sin, n_mem: int):
        """x: (B, n_mem + t, d). Rows before n_mem are memory rows: they see only memory keys.

        The t current rows see every memory key and the current keys causally: row n_mem + i sees
        keys 0..n_mem + i, which is the plain causal mask over all n_mem + t rows. So one causal
        call (a fused kernel, and no graph break under torch.compile, which a lower-right
        CausalBias causes) gives the current rows; its memory rows are replaced by a second,
        unmasked call over the memory keys.
        """
        B, T, d = x.shape
        q, k, v = self.rotated_qkv(x, cos, sin)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        if n_mem:
            y_mem = F.scaled_dot_product_attention(q[:, :, :n_mem], k[:, :, :n_mem], v[:, :, :n_mem], dropout_p=p)
            y = torch.cat([y_mem, y[:, :, n_mem:]], dim=2)
        return self.proj(y.transpose(1, 2).reshape(B, T, d))

    def extend(self, x, cos, sin, cache, start, causal=True):
        """Decoding: x (B, n, d) are n new rows at positions start.. (cos/sin already sliced to
        them). Their keys and values are written into `cache`, (k, v) buffers (B, nh, L, hs), and
        they attend to the keys before them and to each other causally (all of each other if not
        causal). `start` is an int, or a 0-d tensor for one row (static shapes for CUDA graphs:
        the whole buffer is read, keys past the row masked out)."""
        B, n, d = x.shape
        q, k, v = self.rotated_qkv(x, cos, sin)
        if isinstance(start, int):
            cache[0][:, :, start:start + n], cache[1][:, :, start:start + n] = k, v
            k, v = cache[0][:, :, :start + n], cache[1][:, :, :start + n]
            mask = causal_lower_right(n, start + n) if causal and n > 1 else None
        else:
            cache[0].index_copy_(2, start.view(1), k)
            cache[1].index_copy_(2, start.view(1), v)
            k, v = cache
            mask = (torch.arange(k.shape[2], device=k.device) <= start).view(1, -1)  # (1 row, L keys)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(B, n, d))


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

    def forward(self, x, cos, sin, n_mem: int = 0):
        x = x + self.drop(self.attn(self.norm1(x), cos, sin, n_mem))
        return x + self.drop(self.mlp(self.norm2(x)))

    def extend(self, x, cos, sin, cache, start, causal=True):
        """forward() for new rows only, the keys and values of earlier rows cached (eval)."""
        x = x + self.attn.extend(self.norm1(x), cos, sin, cache, start, causal)
        return x + self.mlp(self.norm2(x))


class LMOutput(NamedTuple):  # a NamedTuple, so that ZeRO-3's hooks find the tensors inside
    logits: torch.Tensor | None  # (B, T, V)
    loss: torch.Tensor | None  # mean cross-entropy over counted targets
    state: torch.Tensor | None  # (B, l, d), the state to carry into the next segment
    n_tokens: torch.Tensor | None = None  # counted targets, a 0-d tensor
    token_loss: torch.Tensor | None = None  # (B, T) per-token cross-entropy, 0 where ignored


class FoldedLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.local_blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_local))
        self.global_blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_global))
        # S0: the state every document starts from, learned.
        self.s0 = nn.Parameter(torch.zeros(cfg.segment_len, cfg.d_model)) if cfg.recurrent else None
        self.state_norm = (nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps, elementwise_affine=False)
                           if cfg.recurrent and cfg.state_norm else None)
        self.state_gate = nn.Linear(2 * cfg.d_model, cfg.d_model) if cfg.recurrent and cfg.state_gate else None
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.drop = nn.Dropout(cfg.dropout)
        # Rotary tables for positions 0..2l-1, every length used is a prefix or a slice. Buffers, not
        # computed in forward: torch.compile would fuse the cos/pow into every block's kernels and
        # recompute them for every element (about 13 ms of a 152 ms micro-step in the 350m's H100 profile).
        cos, sin = rope_tables(2 * cfg.segment_len, cfg.head_dim, cfg.rope_theta, "cpu")
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.checkpoint_fn = None
        self.apply(self._init_weights)
        depth_scale = cfg.init_std / math.sqrt(2 * (cfg.n_local + cfg.n_global))
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, std=depth_scale)
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

    def _run(self, block, x, cos, sin, n_mem):
        if self.checkpoint_fn is not None and self.training and torch.is_grad_enabled():
            return self.checkpoint_fn(block, x, cos, sin, n_mem)
        return block(x, cos, sin, n_mem)

    def initial_state(self, batch_size: int) -> torch.Tensor:
        return self.s0.unsqueeze(0).expand(batch_size, -1, -1)  # (B, l, d)

    def memory(self, state, reset, batch_size: int, dtype) -> torch.Tensor:
        """The memory rows a segment reads: the carried state, or S0 where a document starts."""
        s0 = self.initial_state(batch_size).to(dtype)
        if state is None or not self.cfg.use_state:
            return s0
        if reset is not None:
            return torch.where(reset.view(batch_size, 1, 1), s0, state.to(dtype))
        return state.to(dtype)

    def next_state(self, memory, x) -> torch.Tensor:
        """The state to carry, from the memory rows the segment read and the global stack's output
        x (B, t, d) on the segment's rows."""
        new_state = x
        if self.state_gate is not None:
            old = memory[:, :x.shape[1]]  # the rows aligned with the segment's (all l when t = l)
            g = torch.sigmoid(self.state_gate(torch.cat([old, x], dim=-1)))
            new_state = g * old + (1 - g) * x
        return new_state if self.state_norm is None else self.state_norm(new_state)

    def forward(self, ids, state=None, reset=None, targets=None) -> LMOutput:
        """One segment. ids (B, t) with t <= l; state (B, l, d) or None (all streams start a
        document); reset (B,) bool swaps S0 in for those streams; targets (B, t), -100 ignored.
        """
        B, t = ids.shape
        l = self.cfg.segment_len
        if t > l:
            raise ValueError(f"segment of {t} tokens is longer than segment_len={l}; use forward_stream")
        x = self.drop(self.tok_emb(ids))  # (B, t, d)
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        for block in self.local_blocks:
            x = self._run(block, x, cos, sin, 0)
        new_state = None
        if self.cfg.recurrent:
            state = self.memory(state, reset, B, x.dtype)
            z = torch.cat([state, x], dim=1)  # (B, l + t, d): [memory ; current]
            cos, sin = self.rope_cos[:l + t], self.rope_sin[:l + t]
            for block in self.global_blocks:
                z = self._run(block, z, cos, sin, l)
            x = z[:, l:]  # (B, t, d)
            new_state = self.next_state(state, x)
        logits = self.lm_head(self.norm(x))  # (B, t, V)
        loss = n = token_loss = None
        if targets is not None:
            n = (targets != -100).sum()  # a tensor: no host sync in the training step
            token_loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                         reduction="none").view(B, t)  # 0 where ignored
            loss = token_loss.sum() / n.clamp(min=1)
        return LMOutput(logits, loss, new_state, n, token_loss)

    def forward_stream(self, ids, targets=None, state=None, keep_logits=True) -> LMOutput:
        """Any length T, segment by segment with the carried state; the last segment may be short.

        Gradients flow through the state for `bptt_segments` segments, then it is detached. The
        returned state is that after the last *complete* segment (a state has l rows); under
        torch.no_grad() with keep_logits=False memory does not grow with T.
        """
        l = self.cfg.segment_len
        all_logits, token_losses, total, count = [], [], 0.0, 0
        for i, start in enumerate(range(0, ids.shape[1], l)):
            seg_targets = None if targets is None else targets[:, start:start + l]
            out = self(ids[:, start:start + l], state=state, targets=seg_targets)
            if keep_logits:
                all_logits.append(out.logits)
            if targets is not None:
                token_losses.append(out.token_loss)
                total, count = total + out.loss * out.n_tokens, count + out.n_tokens
            if out.state is not None and out.state.shape[1] == l:
                state = out.state.detach() if (i + 1) % self.cfg.bptt_segments == 0 else out.state
        if targets is None:
            return LMOutput(torch.cat(all_logits, dim=1) if keep_logits else None, None, state)
        return LMOutput(torch.cat(all_logits, dim=1) if keep_logits else None, total / count.clamp(min=1),
                        state, count, torch.cat(token_losses, dim=1))

    @torch.no_grad()
    def stream_generate(self, ids, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Yield (B,) token ids one at a time. Memory is constant however long the prompt:
        whole segments of the prompt only update the state, and the current segment is held as
        cached keys and values (StreamDecoder), so a new token costs one row through each block.
        The tokens are those of forward_stream's logits (a plain GPT's window restarts every l
        tokens, as in forward_stream)."""
        l = self.cfg.segment_len
        n_whole = (ids.shape[1] - 1) // l * l  # keep >= 1 prompt token for the next-token logits
        state = None
        if n_whole and self.cfg.recurrent:
            state = self.forward_stream(ids[:, :n_whole], keep_logits=False).state
        decoder = StreamDecoder(self, state)
        logits = decoder.feed(ids[:, n_whole:])[:, -1].float()
        for i in range(max_new_tokens):
            if temperature <= 0:
                token = logits.argmax(-1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)
            yield token
            if i + 1 < max_new_tokens:
                logits = decoder.feed(token[:, None])[:, -1].float()

    def generate(self, ids, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """ids (B, T) -> (B, T + max_new_tokens)."""
        new = list(self.stream_generate(ids, max_new_tokens, temperature, top_k, generator))
        return torch.cat([ids, torch.stack(new, dim=1)], dim=1) if new else ids

    def save_pretrained(self, directory) -> None:
        from safetensors.torch import save_file
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.cfg.to_json(directory / "config.json")
        save_file(self.export_state_dict(), str(directory / "model.safetensors"))

    def export_state_dict(self) -> dict:
        """The weights to save: contiguous, the tied LM head stored once (as tok_emb.weight)."""
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.cfg.tie_embeddings:
            state.pop("lm_head.weight")
        return state

    @classmethod
    def from_pretrained(cls, directory, map_location="cpu") -> "FoldedLM":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        directory = Path(directory)
        if not directory.is_dir():
            raise ModelFileError(f"{directory}: no such model directory")
        try:
            cfg = ModelConfig.from_json(directory / "config.json")
        except (ConfigError, TypeError) as e:
            raise ModelFileError(f"{directory / 'config.json'}: {e}") from None
        weights = directory / "model.safetensors"
        if not weights.is_file():
            raise ModelFileError(f"{weights}: missing; export a checkpoint with `foldscale export`")
        try:
            tensors = load_file(str(weights), device=str(map_location))
        except (SafetensorError, OSError, json.JSONDecodeError) as e:
            raise ModelFileError(f"{weights}: unreadable or truncated ({e})") from None
        return cls.from_state_dict(cfg, tensors, f"{weights}: does not match {directory / 'config.json'}")

    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, state: dict, mismatch: str) -> "FoldedLM":
        """A model holding `state` (a tied LM head may be in it or not). Missing, unexpected or
        mis-shaped weights raise ModelFileError, its message starting with `mismatch`."""
        model = cls(cfg)
        expected = model.export_state_dict()
        if cfg.tie_embeddings:
            state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
                 if k in state and state[k].shape != v.shape]
        if missing or unexpected or wrong:
            raise ModelFileError(f"{mismatch}: missing {missing}, unexpected {unexpected}, wrong shapes {wrong}")
        model.load_state_dict(state, strict=not cfg.tie_embeddings)
        return model


class StreamDecoder:
    """Reads a stream a few tokens at a time with key/value caches (eval, no grad): the memory
    rows' keys and values are computed once per segment, each new row is attended from the cache,
    and the state is carried when a segment fills. `feed` returns forward_stream's logits for
    those tokens, up to rounding.

    The caches are buffers of fixed shape, so on a GPU a one-token feed replays a CUDA graph of
    the whole step, captured on first use: a token costs one launch instead of hundreds.
    Attention avoids the cuDNN backend, which plans anew for each key length (ms a call)."""

    BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

    def __init__(self, model: FoldedLM, state=None, use_graph=None):
        """use_graph: replay one-token feeds as a CUDA graph (default: when the ids are on a GPU)."""
        self.model, self.state, self.use_graph = model, state, use_graph
        self.t, self.caches, self.graph = 0, None, None

    def _allocate(self, ids, dtype):
        m, cfg = self.model, self.model.cfg
        B, l = ids.shape[0], cfg.segment_len

        def kv(length):
            return tuple(torch.zeros(B, cfg.n_head, length, cfg.head_dim, device=ids.device, dtype=dtype)
                         for _ in range(2))
        self.caches = ([kv(l) for _ in m.local_blocks], [kv(2 * l) for _ in m.global_blocks])
        self.outputs = torch.zeros(B, l, cfg.d_model, device=ids.device, dtype=dtype)
        self.pos = torch.zeros((), dtype=torch.long, device=ids.device)
        if self.use_graph is None:
            self.use_graph = ids.is_cuda

    @torch.no_grad()
    def feed(self, ids) -> torch.Tensor:
        """ids (B, n), n <= l - (tokens already in this segment) -> logits (B, n, V)."""
        n, left = ids.shape[1], self.model.cfg.segment_len - self.t
        if not 1 <= n <= left:
            raise ValueError(f"{n} tokens do not fit the {left} left in this segment")
        with sdpa_kernel(self.BACKENDS):
            if self.caches is None:
                self._allocate(ids, self.model.tok_emb.weight.dtype)
            if self.t == 0:
                self._read_memory(ids.shape[0])
            if n == 1 and self.use_graph:
                logits = self._replay(ids)
            elif n == 1:
                self.pos.fill_(self.t)
                logits = self._step(ids, self.pos)
            else:
                logits = self._step(ids, self.t)
        self.t += n
        if self.t == self.model.cfg.segment_len:
            if self.model.cfg.recurrent:
                # a copy: the outputs buffer is overwritten by the next segment
                self.state = self.model.next_state(self.memory_rows, self.outputs.clone())
            self.t = 0
        return logits

    def _read_memory(self, batch_size):
        """A new segment: the memory rows' keys and values (they see only memory keys)."""
        m, l = self.model, self.model.cfg.segment_len
        if m.cfg.recurrent:
            self.memory_rows = z = m.memory(self.state, None, batch_size, self.outputs.dtype)
            for block, cache in zip(m.global_blocks, self.caches[1]):
                z = block.extend(z, m.rope_cos[:l], m.rope_sin[:l], cache, 0, causal=False)

    def _step(self, ids, start):
        """Rows at positions start.. of the segment (start an int, or a 0-d tensor for one row)."""
        m, l = self.model, self.model.cfg.segment_len
        x = m.tok_emb(ids)
        n = ids.shape[1]

        def tables(first):  # the rotary rows of positions first..first + n - 1
            if isinstance(first, int):
                return m.rope_cos[first:first + n], m.rope_sin[first:first + n]
            return m.rope_cos.index_select(0, first.view(1)), m.rope_sin.index_select(0, first.view(1))
        cos, sin = tables(start)
        for block, cache in zip(m.local_blocks, self.caches[0]):
            x = block.extend(x, cos, sin, cache, start)
        if m.cfg.recurrent:
            cos, sin = tables(l + start)
            for block, cache in zip(m.global_blocks, self.caches[1]):
                x = block.extend(x, cos, sin, cache, l + start)
            if isinstance(start, int):
                self.outputs[:, start:start + n] = x
            else:
                self.outputs.index_copy_(1, start.view(1), x)
        return m.lm_head(m.norm(x))

    def _replay(self, ids):
        """One token through the captured graph (captured on first use). Its inputs are copied
        into fixed buffers; the step writes the same cache rows and outputs as _step would."""
        if self.graph is None:
            self.ids = ids.clone()
            self.pos.fill_(self.t)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # a warm-up run, as capture requires: it does this token's work
                self._step(self.ids, self.pos)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._step(self.ids, self.pos)
        self.ids.copy_(ids)
        self.pos.fill_(self.t)
        self.graph.replay()
        return self.logits.clone()
