"""The LM head and its loss as one chunked kernel: FoldedLM.set_kernels("liger").

`linear_cross_entropy(x, weight, targets)` is `F.cross_entropy(x @ weight.T, targets, reduction="sum")`
plus the per-token losses, without the (N, V) logits ever existing at once: N rows are cut into
chunks, and each chunk's logits are turned into its loss and its gradient (softmax - one-hot) in
place, then into its share of grad x and grad weight, all in the forward pass. The backward only
scales those gradients by the incoming one. On a CUDA tensor the chunk loop is liger-kernel's
(`fused_linear_cross_entropy_forward`, Triton); elsewhere it is `chunked_linear_cross_entropy`
below, the same computation in PyTorch, which is also what the tests check the plumbing with.

Why the parts are shaped this way:
- The per-token losses are what the trainer logs by position (LMOutput.token_loss). liger's
  autograd Function returns them only with reduction="none", and then recomputes the chunked
  logits in its backward (a fourth head-sized matrix product) so that any per-token gradient can
  be applied. The loss that is trained is their sum, so here the per-token losses are a detached
  by-product and only the sum is differentiable: the gradients computed in the forward are exact.
- The chunk loop sits inside a custom operator (torch.library), so torch.compile treats it as one
  opaque call: no graph break, and dynamo never traces liger's Python, which calls `.item()` (a
  break) and has been reported to give wrong losses when traced with ignored targets
  (linkedin/Liger-Kernel#1338). The gradient bookkeeping around it is plain PyTorch that compiles.
- The weight gradient is accumulated over chunks in fp32, as one matrix product would: a bf16
  accumulator would round the sum after every chunk.
"""
import torch

from .config import KERNELS, ConfigError, FoldscaleError

IGNORE = -100
# liger cuts the rows into chunks of about LIGER_CHUNK_MEM * N * d / V rows, rounded up to a power of
# two (e.g. 8192 rows at d 1024, V 32000): a few large matrix products per call rather than 32
# small ones, and 0.5 GB of transient logits instead of 2 GB for 32k tokens.
LIGER_CHUNK_MEM = 8


class KernelError(FoldscaleError):
    """A kernel choice this machine or run cannot serve; the message says what to use instead."""


def require_liger():
    """Raise KernelError unless liger-kernel, Triton and a CUDA GPU are all here."""
    try:
        import liger_kernel.ops.fused_linear_cross_entropy  # noqa: F401  (imports triton)
    except ImportError as e:
        raise KernelError(f"kernels='liger' needs liger-kernel and Triton ({e}): install them (pip install "
                          "liger-kernel, or .whl/liger_kernel-*.whl) on a machine with a CUDA GPU, or use "
                          "kernels='torch'") from None
    if not torch.cuda.is_available():
        raise KernelError("kernels='liger' runs Triton kernels on a CUDA GPU and none is visible: use "
                          "kernels='torch' on this machine")


def check(kernels: str) -> str:
    """`kernels` if this machine can run it, else ConfigError / KernelError saying what to pass."""
    if kernels not in KERNELS:
        raise ConfigError(f"kernels must be one of {', '.join(KERNELS)}, not {kernels!r}")
    if kernels == "liger":
        require_liger()
    return kernels


def chunked_linear_cross_entropy(x, weight, targets, with_grad: bool, chunk_rows: int = 4096):
    """x (N, d), weight (V, d), targets (N,) with IGNORE skipped -> token_loss (N,) fp32 (0 where
    ignored) and, with_grad, the gradients of token_loss.sum() with respect to x and weight
    (else empty tensors). Never holds more than chunk_rows x V logits."""
    n = x.shape[0]
    token_loss = torch.zeros(n, dtype=torch.float32, device=x.device)
    grad_x = torch.empty_like(x) if with_grad else x.new_empty(0)
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if with_grad else None
    for a in range(0, n, chunk_rows):
        xc, tc = x[a:a + chunk_rows], targets[a:a + chunk_rows]
        logits = xc @ weight.t()  # (c, V)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        counted = tc != IGNORE
        safe = torch.where(counted, tc, 0)[:, None]
        lse = logits.logsumexp(-1)
        token_loss[a:a + chunk_rows] = torch.where(counted, lse - logits.gather(1, safe).squeeze(1), 0.0)
        if with_grad:
            g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            g.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=g.dtype))
            g = (g * counted[:, None]).to(x.dtype)
            grad_x[a:a + chunk_rows] = g @ weight
            grad_w += (g.t() @ xc).float()
    return token_loss, grad_x, (grad_w.to(weight.dtype) if with_grad else weight.new_empty(0))


def _liger_linear_cross_entropy(x, weight, targets, with_grad):
    try:  # in a try: transformers skips it when it checks the imports of an exported model's files (export --format hf)
        from liger_kernel.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_forward
    except ImportError:
        require_liger()  # raises, saying what to install
        raise
    # reduction="none": the per-token losses come back, and the gradients are those of their sum
    # (not divided by the count). Written against liger-kernel 0.8.5.
    out = fused_linear_cross_entropy_forward(
        _input=x, weight=weight, target=targets, ignore_index=IGNORE, reduction="none",
        accum_dtype=torch.float32, compute_gradients=with_grad, weight_requires_grad=with_grad,
        chunk_mem_const=LIGER_CHUNK_MEM)
    token_loss, grad_x, grad_w = out[0], out[-3], out[-2]
    if not with_grad:
        return token_loss, x.new_empty(0), weight.new_empty(0)
    return token_loss, grad_x, grad_w


def _fake_linear_cross_entropy(x, weight, targets, with_grad):
    return (x.new_empty(x.shape[0], dtype=torch.float32), x.new_empty(x.shape if with_grad else (0,)),
            weight.new_empty(weight.shape if with_grad else (0,)))


def _define_operator():
    """foldscale::linear_cross_entropy: the chunked loop on a CPU, liger's on a GPU."""
    @torch.library.custom_op("foldscale::linear_cross_entropy", mutates_args=())
    def op(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
           with_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return chunked_linear_cross_entropy(x, weight, targets, with_grad)
    op.register_kernel("cuda")(_liger_linear_cross_entropy)
    op.register_fake(_fake_linear_cross_entropy)


# Defined once per process. An HF export's copy of this file (loaded by transformers beside an
# installed foldscale) uses the operator already there: defining it again replaces the dispatcher's
# entry under the first copy's callers, whose next call then read freed memory (a segfault or
# "ValueError: vector::reserve" in tests/test_kernels.py, after tests/test_hf.py: 2 of 8 clean-clone CI
# runs, sessions 17-18).
if not hasattr(torch.ops.foldscale, "linear_cross_entropy"):
    _define_operator()
_linear_cross_entropy_op = torch.ops.foldscale.linear_cross_entropy


class _LinearCrossEntropy(torch.autograd.Function):
    """(total, token_loss): only the total is differentiable, with the gradients the operator
    computed in the forward pass."""

    @staticmethod
    def forward(ctx, x, weight, targets, with_grad: bool):
        token_loss, grad_x, grad_w = _linear_cross_entropy_op(x, weight, targets, with_grad)
        ctx.save_for_backward(grad_x, grad_w)
        ctx.mark_non_differentiable(token_loss)
        return token_loss.sum(), token_loss

    @staticmethod
    def backward(ctx, grad_total, grad_token_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_total.to(grad_x.dtype), grad_w * grad_total.to(grad_w.dtype), None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    """x (..., d), weight (V, d), targets (...) -> (total, token_loss): the summed cross-entropy of
    x @ weight.T over counted targets (differentiable) and the per-token losses (...), fp32, 0 where
    ignored, detached."""
    if weight.numel() == 0:
        raise KernelError("the LM head's weight is empty here: ZeRO-3 gathers it only inside lm_head's own "
                          "call, which the fused loss skips; use kernels='torch' with ZeRO-3")
    with_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    total, token_loss = _LinearCrossEntropy.apply(x.reshape(-1, x.shape[-1]), weight, targets.reshape(-1), with_grad)
    return total, token_loss.view(targets.shape)
