"""The anchor (issue 28): a nanoGPT-style GPT (LayerNorm, GELU, learned positions, tied head, no
biases) trained by a plain PyTorch loop (fused AdamW, bf16 autocast, gradients clipped at 1.0,
torch.compile), so that every foldscale MFU figure has a plain GPT's from the same run and
machine beside it, and the ratio holds on any machine.

    python -m benchmarks.bench_anchor --sizes 350m,1.3b --compile --json benchmarks/results/anchor.json
    python -m benchmarks.bench_anchor --sizes 350m --compile --profile runs/profile   # + trace, top kernels
    python -m benchmarks.bench_anchor --quick     # CPU smoke test at toy size

Sizes: 350m is GPT-2 medium's shape (24 x 1024, 16 heads) at 16 x 1024 tokens per micro-step,
1.3b GPT-3 XL's (24 x 2048, 16 heads) at 8 x 2048. The vocabulary is foldscale's presets' (32000;
--vocab 50304 for nanoGPT's), so the 350m differs from foldscale's 350m baseline (24 blocks of
1024, window 1024) in its blocks alone.

MFU uses foldscale's convention (ModelConfig.flops_per_token, DESIGN.md §1): 6 x (the blocks'
parameters + V x d for the head, tied or not) plus causal attention 12 x d x n_layer x T/2,
over tokens/s against --peak-tflops (800: bf16 measured on the H100); embeddings and positions
are lookups and not counted. Tokens are random (speed does not depend on the text); the first
--warmup steps (compilation) are not timed. Step = one optimizer step of --grad-accum micro-steps.
"""
import argparse
import gc
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from foldscale.config import ModelConfig, TrainConfig
from tools.benchlib import device_name, print_table, time_steps, write_json


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int
    n_head: int
    d_model: int
    seq_len: int
    vocab_size: int = 32000


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (t.view(B, T, self.n_head, d // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, d))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=False)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, bias=False)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, bias=False)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=False)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:  # nanoGPT's: residual projections scaled down by depth
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, ids, targets):
        x = self.wte(ids) + self.wpe.weight[: ids.shape[1]]  # (B, T, d)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def flops_per_token(self) -> float:
        """foldscale's count (ModelConfig.flops_per_token) for a plain GPT of this shape (all blocks
        local, window T), with its SwiGLU block's parameters swapped for this block's."""
        cfg = self.cfg
        same_shape = ModelConfig(vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_head=cfg.n_head,
                                 n_local=cfg.n_layer, n_global=0, segment_len=cfg.seq_len)
        block = sum(p.numel() for p in self.blocks[0].parameters())
        return same_shape.flops_per_token() + 6 * cfg.n_layer * (block - same_shape.block_params())


SIZES = {  # (n_layer, n_head, d_model), (streams, tokens per stream) per micro-step
    "350m": ((24, 16, 1024), (16, 1024)),
    "1.3b": ((24, 16, 2048), (8, 2048)),
    "tiny": ((2, 4, 64), (4, 64)),
}


def measure(size: str, vocab: int, grad_accum: int, steps: int, warmup: int, compile_: bool, peak_tflops: float,
            profile=None, profile_steps: int = 2) -> dict:
    (n_layer, n_head, d), (streams, T) = SIZES[size]
    cfg = GPTConfig(n_layer, n_head, d, T, vocab)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch._dynamo.reset()
    torch.manual_seed(TrainConfig.seed)
    model = GPT(cfg).to(device)
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=cuda)
    forward = torch.compile(model) if compile_ else model
    data = torch.randint(vocab, (grad_accum, streams, T + 1), device=device)  # one step's micro-batches, reused
    loss = torch.zeros((), device=device)

    def step():
        for batch in data:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                micro_loss = forward(batch[:, :-1], batch[:, 1:])
            (micro_loss / grad_accum).backward()
            loss.copy_(micro_loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    name = f"anchor {size} (nanoGPT-style)"
    dt, prof = time_steps(step, steps, warmup, name, profile, profile_steps)
    tok_s = grad_accum * streams * T / dt
    tflops = tok_s * model.flops_per_token() / 1e12
    row = {"model": name, "loop": "plain", "kernels": "torch",
           "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "l": T, "streams": streams, "tokens_per_micro_step": streams * T, "grad_accum": grad_accum,
           "tokens_per_s": tok_s, "tflops_per_gpu": tflops, "step_ms": 1000 * dt, "loss": float(loss),
           "flops_per_token": model.flops_per_token()}
    if cuda:
        row["mfu"] = tflops / peak_tflops
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    row.update(prof)
    del model, opt, forward, data
    gc.collect()
    return row


COLUMNS = ["model", "params_M", "l", "streams", "grad_accum", "tokens_per_s", "tflops_per_gpu", "mfu", "step_ms",
           "peak_mem_gib", "gpu_busy", "host_syncs_per_step", "loss"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="350m,1.3b", help=f"any of {', '.join(SIZES)}")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary (nanoGPT's GPT-2 is 50304)")
    p.add_argument("--grad-accum", "--grad_accum", type=int, default=1, help="micro-steps per optimizer step")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="torch.compile the model (as the issue's anchor)")
    p.add_argument("--peak-tflops", "--peak_tflops", type=float, default=TrainConfig.peak_tflops,
                   help="per-GPU matrix-product ceiling for MFU (800: bf16 measured on the H100)")
    p.add_argument("--profile", metavar="DIR", help="profile --profile-steps more steps: a Chrome trace in DIR, "
                                                    "the top 20 kernels and CPU ops printed")
    p.add_argument("--profile-steps", "--profile_steps", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="toy size on the CPU (smoke test)")
    p.add_argument("--json", help="also write the table here")
    args = p.parse_args()
    if args.quick:
        args.sizes, args.vocab, args.steps, args.warmup = "tiny", 512, 2, 1
    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        p.error(f"unknown size {', '.join(unknown)}: use {', '.join(SIZES)}")
    rows = []
    for size in sizes:
        row = measure(size, args.vocab, args.grad_accum, args.steps, args.warmup, args.compile, args.peak_tflops,
                      args.profile, args.profile_steps)
        rows.append(row)
        # after every row: a run stopped early keeps its rows
        write_json(args.json, rows, compile=args.compile, peak_tflops=args.peak_tflops, vocab=args.vocab)
        print(f"{row['model']}: {row['tokens_per_s']:,.0f} tok/s, {row['tflops_per_gpu']:.1f} TFLOP/s"
              + (f", MFU {row['mfu']:.1%}" if "mfu" in row else ""), flush=True)
    print(f"\n{device_name()}, compile={args.compile}, vocabulary {args.vocab}, MFU against {args.peak_tflops:.0f} "
          "TFLOP/s (foldscale's FLOPs convention); step = one optimizer step")
    print_table(rows, COLUMNS)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
