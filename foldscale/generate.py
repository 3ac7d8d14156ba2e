"""Streaming decoding in constant memory: key/value caches for the current segment, one CUDA
graph per one-token step, sampling.

Whole segments of a prompt only update the carried state (`FoldedLM.forward_stream`); the
current segment is held as cached keys and values, so a new token costs one row through each
block. The decoder uses the model's public surface only: embed, local_blocks / global_blocks,
rotary, memory, next_state, head.
"""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from foldscale.model import Block, FoldedLM


def extend(block: Block, x, cos, sin, cache, positions, causal=True):
    """block(x) for new rows only: x (B, n, d) are rows at `positions` (n,), whose keys and values
    are written into `cache`, (k, v) buffers (B, nh, L, hs). Each row attends to the cached keys
    at or before its own position (causal), or to every key up to the last new row (not causal:
    the memory rows, which see each other whole). The whole buffer is read and later keys masked,
    so shapes do not depend on the position (what a CUDA graph needs)."""
    B, n, d = x.shape
    q, k, v = block.attn.rotated_qkv(block.norm1(x), cos, sin)
    cache[0].index_copy_(2, positions, k)
    cache[1].index_copy_(2, positions, v)
    keys = torch.arange(cache[0].shape[2], device=x.device)
    visible = keys <= (positions[:, None] if causal else positions[-1:, None])  # (n or 1, L)
    y = F.scaled_dot_product_attention(q, cache[0], cache[1], attn_mask=visible)
    x = x + block.attn.proj(y.transpose(1, 2).reshape(B, n, d))
    return x + block.mlp(block.norm2(x))


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
        self.position = torch.zeros(1, dtype=torch.long, device=ids.device)  # the graph's input
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
            else:
                logits = self._step(ids, torch.arange(self.t, self.t + n, device=ids.device))
        self.t += n
        if self.t == self.model.cfg.segment_len:
            if self.model.cfg.recurrent:
                # a copy: the outputs buffer is overwritten by the next segment
                self.state = self.model.next_state(self.memory_rows, self.outputs.clone())
            self.t = 0
        return logits

    def _read_memory(self, batch_size):
        """A new segment: the memory rows' keys and values (they see only memory keys)."""
        m = self.model
        if m.cfg.recurrent:
            self.memory_rows = z = m.memory(self.state, None, batch_size, self.outputs.dtype)
            positions = torch.arange(m.cfg.segment_len, device=z.device)
            cos, sin = m.rotary(positions)
            for block, cache in zip(m.global_blocks, self.caches[1]):
                z = extend(block, z, cos, sin, cache, positions, causal=False)

    def _step(self, ids, positions):
        """Rows at `positions` (n,) of the current segment."""
        m = self.model
        x = m.embed(ids)
        cos, sin = m.rotary(positions)
        for block, cache in zip(m.local_blocks, self.caches[0]):
            x = extend(block, x, cos, sin, cache, positions)
        if m.cfg.recurrent:
            global_positions = positions + m.cfg.segment_len  # after the l memory rows
            cos, sin = m.rotary(global_positions)
            for block, cache in zip(m.global_blocks, self.caches[1]):
                x = extend(block, x, cos, sin, cache, global_positions)
            self.outputs.index_copy_(1, positions, x)
        return m.head(x)

    def _replay(self, ids):
        """One token through the captured graph (captured on first use). Its inputs are copied
        into fixed buffers; the step writes the same cache rows and outputs as _step would."""
        self.position.fill_(self.t)
        if self.graph is None:
            self.ids = ids.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # a warm-up run, as capture requires: it does this token's work
                self._step(self.ids, self.position)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._step(self.ids, self.position)
        self.ids.copy_(ids)
        self.graph.replay()
        return self.logits.clone()


def sample(logits, temperature=1.0, top_k=None, generator=None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids: argmax at temperature 0, else a draw among the top_k."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)


@torch.no_grad()
def stream_generate(model: FoldedLM, ids, max_new_tokens, temperature=1.0, top_k=None, generator=None):
    """Yield (B,) token ids one at a time, in memory that does not grow with the prompt. The
    tokens are those of forward_stream's logits (a plain GPT's window restarts every l tokens,
    as in forward_stream)."""
    l = model.cfg.segment_len
    n_whole = (ids.shape[1] - 1) // l * l  # keep >= 1 prompt token for the next-token logits
    state = None
    if n_whole and model.cfg.recurrent:
        state = model.forward_stream(ids[:, :n_whole], keep_logits=False).state
    decoder = StreamDecoder(model, state)
    logits = decoder.feed(ids[:, n_whole:])[:, -1].float()
    for i in range(max_new_tokens):
        token = sample(logits, temperature, top_k, generator)
        yield token
        if i + 1 < max_new_tokens:
            logits = decoder.feed(token[:, None])[:, -1].float()


def generate(model: FoldedLM, ids, max_new_tokens, temperature=1.0, top_k=None, generator=None):
    """ids (B, T) -> (B, T + max_new_tokens)."""
    new = list(stream_generate(model, ids, max_new_tokens, temperature, top_k, generator))
    return torch.cat([ids, torch.stack(new, dim=1)], dim=1) if new else ids
