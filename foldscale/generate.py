"""Streaming decoding in constant memory: key/value caches for the current segment, a one-token
step compiled by torch.compile and replayed as one CUDA graph, sampling.

Whole segments of a prompt only update the carried state (`FoldedLM.forward_stream`); the
current segment is held as cached keys and values, so a new token costs one row through each
block. The blocks are the model's own (`Block` with a `KVCache`): the decoder holds the cache
buffers, the CUDA graph and the segment boundaries, and uses the model's public surface only:
embed, local_blocks / global_blocks, rotary, memory, next_state, head.
"""
import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .model import FoldedLM


class KVCache(NamedTuple):
    """What a Block's attention reads and writes while decoding (`Attention.attend_cached`): one
    attention's keys and values k, v (B, L, nh, hs), buffers of fixed size written in place, and
    positions (n,), the new rows' places in them."""
    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor


def step(model: FoldedLM, caches, outputs, ids, positions):
    """Rows ids (B, n) at `positions` (n,) of the current segment -> logits (B, n, V), through every
    block with its key/value cache; caches as StreamDecoder holds them, outputs (B, l, d) the global
    stack's output on the segment's rows (for the carry). A function of its arguments only, so that
    one compiled version serves every decoder of the same shapes."""
    x = model.embed(ids)
    cos, sin = model.rotary(positions)
    for block, (k, v) in zip(model.local_blocks, caches[0]):
        x = block(x, cos, sin, 0, KVCache(k, v, positions))
    if model.cfg.recurrent:
        m = model.cfg.memory_rows
        global_positions = positions + m  # after the m memory rows
        cos, sin = model.rotary(global_positions)
        for block, (k, v) in zip(model.global_blocks, caches[1]):
            x = block(x, cos, sin, m, KVCache(k, v, global_positions))
        outputs.index_copy_(1, positions, x)
    return model.head(x)


# Inductor's max-autotune also writes each matrix-vector product as a Triton reduction fused with
# the norm or SwiGLU before it: 315 kernels a token instead of 387, and 1.19x the new tokens/s of
# mode "default" (350m, H100, BENCHMARKS.md session 17), for 52 s of compiling instead of 37.
DECODE_COMPILE_MODE = "max-autotune-no-cudagraphs"


@functools.cache
def compiled_step(mode: str = DECODE_COMPILE_MODE):
    """`step` through torch.compile with static shapes, made once per process and mode: Inductor
    fuses each block's norms, rotation, mask and SwiGLU into a few kernels, and caches the code by
    shape. The decoder captures its own graph, so no mode with "cudagraphs" or "reduce-overhead"."""
    return torch.compile(step, fullgraph=True, dynamic=False, mode=mode)


class StreamDecoder:
    """Reads a stream a few tokens at a time with key/value caches (eval, no grad): the memory
    rows' keys and values are computed once per segment, each new row is attended from the cache,
    and the state is carried when a segment fills. `feed` returns forward_stream's logits for
    those tokens, up to rounding.

    The caches are buffers of fixed shape, so a one-token feed is a step of static shapes: on a
    GPU it is compiled (its small kernels fused) and captured as one CUDA graph on first use, so
    a token costs one launch. The graph is captured here, around the compiled step, not by
    mode="reduce-overhead": the step writes the caches in place, and torch.compile's own graphs
    are skipped for a step that mutates inputs other than parameters and buffers."""

    def __init__(self, model: FoldedLM, state=None, use_graph=None, compile=None):
        """use_graph: replay one-token feeds as a CUDA graph; compile: run them through
        `compiled_step` (each defaults to whether the ids are on a GPU; a string is torch.compile's
        mode). Many-token feeds run eagerly."""
        self.model, self.state, self.use_graph, self.compile = model, state, use_graph, compile
        self.t, self.caches, self.graph = 0, None, None

    def _allocate(self, ids, dtype):
        m, cfg = self.model, self.model.cfg
        B, l = ids.shape[0], cfg.segment_len

        def kv(length):
            return tuple(torch.zeros(B, length, cfg.n_head, cfg.head_dim, device=ids.device, dtype=dtype)
                         for _ in range(2))
        self.caches = ([kv(l) for _ in m.local_blocks], [kv(cfg.global_rows) for _ in m.global_blocks])
        self.outputs = torch.zeros(B, l, cfg.d_model, device=ids.device, dtype=dtype)
        self.position = torch.zeros(1, dtype=torch.long, device=ids.device)  # the graph's input
        if self.use_graph is None:
            self.use_graph = ids.is_cuda
        if self.compile is None:
            self.compile = ids.is_cuda

    @torch.no_grad()
    def feed(self, ids) -> torch.Tensor:
        """ids (B, n), n <= l - (tokens already in this segment) -> logits (B, n, V)."""
        n, left = ids.shape[1], self.model.cfg.segment_len - self.t
        if not 1 <= n <= left:
            raise ValueError(f"{n} tokens do not fit the {left} left in this segment")
        if self.caches is None:
            self._allocate(ids, self.model.tok_emb.weight.dtype)
        if self.t == 0:
            self._read_memory(ids.shape[0])
        if n == 1 and self.use_graph:
            logits = self._replay(ids)
        else:
            fn = self._compiled() if n == 1 and self.compile else step
            logits = fn(self.model, self.caches, self.outputs, ids,
                        torch.arange(self.t, self.t + n, device=ids.device))
        self.t += n
        if self.t == self.model.cfg.segment_len:
            if self.model.cfg.recurrent:
                # a copy: the outputs buffer is overwritten by the next segment
                self.state = self.model.next_state(self.memory, self.outputs.clone())
            self.t = 0
        return logits

    def _compiled(self):
        return compiled_step(self.compile if isinstance(self.compile, str) else DECODE_COMPILE_MODE)

    def _read_memory(self, batch_size):
        """A new segment: the memory rows' keys and values (they see only memory keys)."""
        m = self.model
        if m.cfg.recurrent:
            self.memory = z = m.memory(self.state, None, batch_size, self.outputs.dtype)
            positions = torch.arange(m.cfg.memory_rows, device=z.device)
            cos, sin = m.rotary(positions)
            for block, (k, v) in zip(m.global_blocks, self.caches[1]):
                z = block(z, cos, sin, m.cfg.memory_rows, KVCache(k, v, positions))

    def _replay(self, ids):
        """One token through the captured graph (captured on first use). Its inputs are copied
        into fixed buffers; the step writes the same cache rows and outputs as `step` would."""
        self.position.fill_(self.t)
        if self.graph is None:
            fn = self._compiled() if self.compile else step
            args = self.model, self.caches, self.outputs, ids.clone(), self.position
            self.ids = args[3]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # a warm-up run (it compiles), as capture requires: this token's work
                fn(*args)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = fn(*args)
        self.ids.copy_(ids)
        self.graph.replay()
        return self.logits.clone()


def sample(logits, temperature=1.0, top_k=None, generator=None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids: argmax at temperature 0 (in the logits' own dtype, which
    picks the same token as fp32), else a draw among the top_k in fp32."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)


@torch.no_grad()
def stream_generate(model: FoldedLM, ids, max_new_tokens, temperature=1.0, top_k=None, generator=None,
                    compile=None):
    """Yield (B,) token ids one at a time, in memory that does not grow with the prompt. The
    tokens are those of forward_stream's logits (a plain GPT's window restarts every l tokens,
    as in forward_stream). compile: as StreamDecoder's. Nothing waits for the GPU between
    tokens: the caller decides when to read one."""
    l = model.cfg.segment_len
    n_whole = (ids.shape[1] - 1) // l * l  # keep >= 1 prompt token for the next-token logits
    state = None
    if n_whole and model.cfg.recurrent:
        state = model.forward_stream(ids[:, :n_whole], keep_logits=False).state
    decoder = StreamDecoder(model, state, compile=compile)
    logits = decoder.feed(ids[:, n_whole:])[:, -1]
    for i in range(max_new_tokens):
        token = sample(logits, temperature, top_k, generator)
        yield token
        if i + 1 < max_new_tokens:
            logits = decoder.feed(token[:, None])[:, -1]


def generate(model: FoldedLM, ids, max_new_tokens, temperature=1.0, top_k=None, generator=None, compile=None):
    """ids (B, T) -> (B, T + max_new_tokens)."""
    new = list(stream_generate(model, ids, max_new_tokens, temperature, top_k, generator, compile))
    return torch.cat([ids, torch.stack(new, dim=1)], dim=1) if new else ids
