"""Configuration dataclasses, one per concern, each checked on construction.

The DeepSpeed JSON owns batch size, ZeRO, precision, clipping and offload; these classes own the
model, the data and the recurrence, and the run's bookkeeping (logging, checkpoints).
"""
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path


class FoldscaleError(Exception):
    """The one base of every error a user sees: `foldscale` and `launch/pretrain.py` print its
    message as one line and exit with status 2. The message names the file or setting at fault
    and a command or value that works."""


class ConfigError(FoldscaleError):
    """A configuration that cannot work; the message says what to change."""


def read_json(path, missing: str) -> dict:
    """A JSON config file; a missing or malformed one is a ConfigError naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: {missing}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 8192
    """Tokenizer vocabulary size; must match the token store's tokenizer."""
    d_model: int = 256
    """Width of every residual stream (d_E in the paper)."""
    n_head: int = 4
    """Attention heads per block; d_model must divide by it."""
    n_local: int = 2
    """Local blocks: causal attention inside the segment (window l)."""
    n_global: int = 2
    """Global blocks over [carried state ; segment] (window 2l). 0 gives a plain causal GPT."""
    segment_len: int = 128
    """Tokens per segment (l), also the number of carried state vectors unless `state_rows`."""
    ffn_mult: float = 8 / 3
    """SwiGLU hidden width as a multiple of d_model (8/3 keeps a block at 12 d^2 parameters)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention and residual branches (training only)."""
    bptt_segments: int = 1
    """Segments a gradient may flow back through the carried state (1 = detach every segment)."""
    rope_theta: float = 10000.0
    """Rotary embeddings' base."""
    norm_eps: float = 1e-5
    """RMSNorm's epsilon."""
    tie_embeddings: bool = True
    """Share the token embedding with the LM head."""
    use_state: bool = True
    """False runs the local-only ablation (`local_only()`): every segment starts from S0."""
    state_norm: bool = False
    """RMS-normalise the state before carrying it, with no learned scale, so its norm cannot
    grow segment after segment and normalising twice changes nothing (a learned per-channel scale
    would multiply a carried channel by w^n after n segments)."""
    state_gate: bool = False
    """Carry g * S + (1 - g) * C instead of C, where S is the state the segment came in with, C
    the global stack's output on the segment (the paper's state), and g = sigmoid(W [S ; C] + b)
    per row and channel: where g saturates at 1 a state row is carried unchanged, for any number
    of segments (model.StateCarry)."""
    state_gate_hard: bool = False
    """With `state_gate`: g = clamp(1.2 sigmoid(z) - 0.1, 0, 1), which reaches exactly 0 and 1,
    and `state_norm` normalises the candidate before the mix instead of the mix (a convex mix of
    bounded rows stays bounded). A channel whose gate is at 1 is then carried bit for bit, for
    any number of segments; with a sigmoid gate and the norm after the mix every carried channel
    leaks a little each segment (g < 1, and the row's norm rescales it)."""
    state_rows: int | None = None
    """Rows of the carried state (m, 1..l); None carries l, the paper's. With m < l the state is
    the global stack's output on the segment's last m rows and the global stack runs m + l rows
    instead of 2l: fewer FLOPs, less to carry."""
    init_std: float = 0.02
    """Standard deviation of the initial weights (residual outputs scaled down by depth)."""

    def __post_init__(self):
        checks = [
            (self.vocab_size > 0, "vocab_size must be positive"),
            (self.d_model > 0 and self.n_head > 0, "d_model and n_head must be positive"),
            (self.d_model % self.n_head == 0,
             f"d_model={self.d_model} must be divisible by n_head={self.n_head}: "
             f"change n_head to a divisor such as {_divisor_near(self.d_model, self.n_head)}"),
            ((self.d_model // max(self.n_head, 1)) % 2 == 0,
             f"head size d_model/n_head={self.d_model // max(self.n_head, 1)} must be even for "
             "rotary embeddings: change d_model or n_head"),
            (self.n_local >= 0 and self.n_global >= 0 and self.n_local + self.n_global > 0,
             "n_local and n_global must be >= 0 and not both 0"),
            (self.segment_len >= 1, "segment_len must be >= 1"),
            (self.ffn_mult > 0, "ffn_mult must be positive"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
            (self.bptt_segments >= 1, "bptt_segments must be >= 1 (1 detaches the state)"),
            (not self.state_gate_hard or self.state_gate, "state_gate_hard needs state_gate = true"),
            (self.state_rows is None or 1 <= self.state_rows <= self.segment_len,
             f"state_rows={self.state_rows} must be in 1..segment_len={self.segment_len} (or null: l)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"ModelConfig: {message}")

    def local_only(self) -> "ModelConfig":
        """The ablation: the same model and weights, every segment reading S0 instead of the
        carried state, so nothing reaches it from an earlier segment."""
        return dataclasses.replace(self, use_state=False)

    def full_attention(self, window: int) -> "ModelConfig":
        """The baseline: the same blocks, all local (a plain causal GPT), attending over `window`
        tokens with no carried state. Its parameters are the folded model's minus S0 and the carry."""
        return dataclasses.replace(self, n_local=self.n_local + self.n_global, n_global=0, segment_len=window,
                                   bptt_segments=1, state_gate=False, state_gate_hard=False, state_norm=False,
                                   state_rows=None)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ffn_dim(self) -> int:
        return int(round(self.ffn_mult * self.d_model / 64)) * 64 or 64

    @property
    def recurrent(self) -> bool:
        return self.n_global > 0

    @property
    def memory_rows(self) -> int:
        """Rows of the carried state (m): `state_rows`, or l."""
        return self.state_rows or self.segment_len

    @property
    def global_rows(self) -> int:
        """Rows of the global stack on a whole segment, [memory ; segment]: m + l, the positions
        the rotary tables cover."""
        return self.memory_rows + self.segment_len

    def block_params(self) -> int:
        """Parameters of one transformer block (attention, MLP, two RMSNorms)."""
        d = self.d_model
        return 4 * d * d + 3 * d * self.ffn_dim + 2 * d

    def param_counts(self) -> dict:
        """Analytic parameter counts, split as the MFU formula needs them."""
        d, V = self.d_model, self.vocab_size
        embed = V * d
        head = 0 if self.tie_embeddings else V * d
        return {
            "embedding": embed,
            "local": self.n_local * self.block_params(),
            "global": self.n_global * self.block_params()
            + (self.memory_rows * d + (2 * d * d + d) * self.state_gate if self.recurrent else 0),
            "head": head + d,  # LM head (if untied) + final norm
        }

    def num_params(self) -> int:
        return sum(self.param_counts().values())

    def flops_per_token(self) -> float:
        """Model FLOPs per trained token, forward + backward (DESIGN.md §1).

        Matrix products: 6 * (P_loc + P_glob + m/l * ((N_glob - 1) * P_block + 3d^2 + d + 2d^2 [gate])
        + P_head): the global stack runs its l current rows and m memory rows (m = memory_rows, l by
        default) per l trained tokens, but the last global block runs only its first norm and qkv
        on the memory rows (their keys and values; their outputs would be read by nothing); the
        `state_gate` reads 2d per carried row. P_head is the V x d LM head whether tied or not.
        Attention: 12 * d * (N_loc * l/2 + N_glob * (m + l/2) + (N_glob - 1) * m^2/l): current
        rows over m keys and causally over l, memory rows over m keys in every global block but
        the last; causal halves counted as halves.
        """
        d, l, m, n = self.d_model, self.segment_len, self.memory_rows, self.n_global
        P = self.block_params()
        memory = m / l * ((n - 1) * P + 3 * d * d + d + 2 * d * d * self.state_gate) if n else 0.0
        matmul = 6 * (self.n_local * P + n * P + memory + self.vocab_size * d)
        attention = 12 * d * (self.n_local * l / 2 + n * (m + l / 2) + max(n - 1, 0) * m * m / l)
        return matmul + attention

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"ModelConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)

    @classmethod
    def from_json(cls, path) -> "ModelConfig":
        d = read_json(path, "no such model config file")
        if d.get("model_type") == "foldscale":  # `foldscale export --format hf`: transformers' keys beside ours
            d = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        return cls.from_dict(d)

    @classmethod
    def load(cls, name_or_path: str, **overrides) -> "ModelConfig":
        """A preset name (see PRESETS) or a path to a JSON file, with field overrides."""
        if name_or_path in PRESETS:
            base = dict(PRESETS[name_or_path])
        elif Path(name_or_path).suffix == ".json" or Path(name_or_path).exists():
            base = cls.from_json(name_or_path).to_dict()
        else:
            raise ConfigError(f"unknown model '{name_or_path}': give a preset "
                              f"({', '.join(PRESETS)}) or a path to a model .json")
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(base)


def _divisor_near(n: int, k: int) -> int:
    return min((h for h in range(1, n + 1) if n % h == 0), key=lambda h: abs(h - k))


PRESETS = {
    "default": {},
    "tiny": dict(vocab_size=512, d_model=64, n_head=4, n_local=1, n_global=1, segment_len=16),
    "paper": dict(d_model=256, n_head=4, n_local=3, n_global=3, segment_len=12),
    "small": dict(d_model=384, n_head=6, n_local=3, n_global=3, segment_len=128),
    "125m": dict(vocab_size=32000, d_model=768, n_head=12, n_local=6, n_global=6, segment_len=512),
    "350m": dict(vocab_size=32000, d_model=1024, n_head=16, n_local=12, n_global=12, segment_len=512),
    "1b": dict(vocab_size=32000, d_model=2048, n_head=16, n_local=10, n_global=10, segment_len=1024),
    "3b": dict(vocab_size=32000, d_model=2560, n_head=20, n_local=20, n_global=20, segment_len=1024),
}


@dataclass(frozen=True)
class DataConfig:
    store: str
    """Token store directory (foldscale prepare, or the built-in corpus's in the cache). The
    number of streams per rank is DeepSpeed's train_micro_batch_size_per_gpu."""


KERNELS = ("torch", "liger")


@dataclass(frozen=True)
class TrainConfig:
    out: str = "runs/default"
    """Run directory: checkpoints, TensorBoard events, resolved configs."""
    steps: int = 1000
    """Optimizer steps to train for; a schedule's total_num_steps "auto" follows it."""
    log_every: int = 10
    """Steps between console lines and logged metrics."""
    eval_every: int = 200
    """Steps between validation losses."""
    eval_segments: int = 32
    """Validation segments per stream at each evaluation."""
    save_every: int = 500
    """Steps between checkpoints (one is also written at the end and on SIGTERM/SIGINT)."""
    keep_last: int = 3
    """Checkpoints kept in RUN/checkpoints; older ones are deleted."""
    compile: bool = False
    """torch.compile the model through DeepSpeed's engine.compile() (GPU; first steps are slow)."""
    kernels: str = "torch"
    """`liger`: the LM head and its loss as liger-kernel's chunked kernel (CUDA and Triton), which never
    materialises the (tokens, vocabulary) logits; speed and memory only (FoldedLM.set_kernels)."""
    max_bad_steps: int = 5
    """Consecutive non-finite losses tolerated (each skips its update) before the run stops."""
    extend_schedule: bool = False
    """Resumed with the checkpoint's learning-rate schedule stretched to end at `steps`
    (engine.load_ds_config); recorded so that the longer schedule is the run's own from then on."""
    seed: int = 0
    """Seeds the model's initialisation, dropout, and how documents are dealt to streams."""
    peak_tflops: float = 800.0
    """Matrix-product ceiling per GPU for MFU: 800 TFLOP/s is bf16 measured on the H100 (8192^3)."""
    gpu_mem_gib: float | None = None
    """Cap each process's GPU memory, emulating a smaller card (e.g. 24): past it, allocations
    raise torch.OutOfMemoryError as they would there."""
    log_placement: bool = False
    """Write RUN/placement/rank{r}.jsonl: every micro-step, which segment of which document each
    global stream read (a host sync per micro-step: for checking multi-GPU runs, not for speed)."""

    def __post_init__(self):
        for name in ("steps", "log_every", "eval_every", "save_every", "keep_last", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig: {name} must be >= 1")
        if self.kernels not in KERNELS:
            raise ConfigError(f"TrainConfig: kernels must be one of {', '.join(KERNELS)}, not {self.kernels!r}")
