"""The one place that talks to DeepSpeed's set-up: process group, config checks, engine.

DeepSpeed's JSON owns batch size, ZeRO, precision, clipping, offload, optimizer and schedule;
foldscale's configs own the model, data and recurrence. Contradictions are refused here.
"""
import contextlib
import difflib
import functools
import json
import os
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch

if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
    os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is imported: it picks its accelerator once

import deepspeed  # noqa: E402

from foldscale.config import ConfigError, ModelConfig, read_json  # noqa: E402
from foldscale.model import FoldedLM  # noqa: E402

_MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")
_SCHEDULERS_WITH_TOTAL = ("WarmupDecayLR", "WarmupCosineLR")
TOP_LEVEL_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer", "scheduler",
    "fp16", "bf16", "bfloat16", "amp", "torch_autocast", "gradient_clipping", "prescale_gradients",
    "gradient_predivide_factor", "sparse_gradients", "zero_optimization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "activation_checkpointing", "aio", "steps_per_print", "wall_clock_breakdown",
    "dump_state", "memory_breakdown", "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comet",
    "comms_logger", "checkpoint", "data_types", "communication_data_type", "seq_parallel_communication_data_type",
    "elasticity", "autotuning", "compression_training", "data_efficiency", "curriculum_learning",
    "sparse_attention", "pipeline", "hybrid_engine", "compile", "nebula", "tensor_parallel", "timers",
    "weight_quantization", "eigenvalue", "progressive_layer_drop", "quantize_training", "disable_allgather",
    "dataloader_drop_last", "use_data_before_expert_parallelism", "expert_parallel", "log_level",
    "legacy_fusion", "vocabulary_size", "disable_python_gc", "managed_gradient_accumulation", "gradient_allreduce_op")
"""DeepSpeed's documented top-level keys; DeepSpeed itself ignores any other, typos included."""
ADAM_PARAMS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable", "differentiable",
               "fused", "torch_adam", "adam_w_mode", "adamw_mode", "bias_correction", "set_grad_none",
               "fp32_optimizer_states")
"""What DeepSpeed's Adam and AdamW (torch's, FusedAdam, DeepSpeedCPUAdam) take in optimizer.params."""
_SPELLINGS = {"learning_rate": "lr", "beta": "betas", "epsilon": "eps"}


def on_gpu() -> bool:
    return os.environ.get("DS_ACCELERATOR", "cuda") != "cpu" and torch.cuda.is_available()


@contextlib.contextmanager
def announced(what: str, rank: int):
    """Say what is happening before a wait that can be long, and how long it took: on a first
    launch DeepSpeed compiles its C++/CUDA ops just in time (about a minute each, then cached in
    ~/.cache/torch_extensions), which otherwise looks like a hang."""
    if rank != 0:
        yield
        return
    print(f"{what} (DeepSpeed compiles an op the first time this torch and Python need it: about a minute)",
          flush=True)
    t0 = time.perf_counter()
    stuck = threading.Timer(300, print, [f"{what}: still waiting after 5 minutes. A build killed midway leaves "
                                         "a stale lock (~/.cache/torch_extensions/*/*/lock) that every later "
                                         "build waits on: delete it if no other launch is building"])
    stuck.daemon = True
    stuck.start()
    try:
        yield
    finally:
        stuck.cancel()
    if time.perf_counter() - t0 > 5:
        print(f"{what}: done in {time.perf_counter() - t0:.0f} s", flush=True)


def init_distributed(timeout_s: float = 600.0, gpu_mem_gib: float | None = None) -> tuple[int, int]:
    """Join the process group: under the deepspeed launcher, torchrun, mpirun, or alone.

    A rank that dies makes the others fail a collective after `timeout_s` instead of hanging.
    `gpu_mem_gib` caps each process's GPU memory (cap_memory). Returns (rank, world_size).
    """
    launched = all(v in os.environ for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))
    if not launched and not any(v in os.environ for v in _MPI_ENV):
        with socket.socket() as s:  # a lone process: a process group of one on a free port
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    rank = int(next((os.environ[v] for v in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK") if v in os.environ), 0))
    with announced("joining the process group", rank):
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu() else "gloo", auto_mpi_discovery=True,
                                   distributed_port=int(os.environ.get("FOLDSCALE_MPI_PORT", 29500)),
                                   timeout=timedelta(seconds=timeout_s), verbose=False)
    if on_gpu():
        exact_pinned_memory()
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        cap_memory(gpu_mem_gib)
    return deepspeed.comm.get_rank(), deepspeed.comm.get_world_size()


def close_distributed():
    """Leave the process group, if this process joined one."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def cap_memory(gib):
    """Emulate a smaller card (e.g. 24 GiB): allocations past the cap raise
    torch.OutOfMemoryError as they would on that card."""
    if gib:
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, float(gib) * 2**30 / total))


def exact_pinned_memory(threshold_mb: int = 64):
    """Pin host blocks over THRESHOLD_MB at their size, and free them when released.

    DeepSpeed's offload pins its host buffers through PyTorch's caching host allocator, which
    rounds every block up to a power of two and keeps freed blocks for reuse: the 12 GB of bf16
    parameters of a 6B model take 16 GiB, its 12 GB gradient buffer another 16 GiB. PyTorch 2.10+
    reads these two settings (older versions ignore them); settings already made are kept.
    """
    get = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    put = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if get is None or put is None or "pinned_max" in get():
        return
    try:
        put(",".join(filter(None, [get(), f"pinned_max_round_threshold_mb:{threshold_mb}",
                                   f"pinned_max_cached_size_mb:{threshold_mb}"])))
    except (RuntimeError, ValueError):  # a PyTorch that refuses the keys keeps its rounding
        pass


def load_ds_config(path, world_size: int, steps: int, extend_from: dict | None = None) -> dict:
    """Read a DeepSpeed JSON and refuse what cannot work, naming the file and the key.

    The JSON owns the schedule and `--steps` when to stop: a schedule's `total_num_steps: "auto"`
    is filled from --steps, a `warmup_num_steps` below 1 is that fraction of it (at least one
    step: DeepSpeed's warm-up schedulers refuse 0), and a warm-up must be shorter than a schedule
    of more than one step (never silently shrunk). The resolved config is saved with
    every checkpoint, and resuming under a different schedule is refused (checkpoint.py), unless
    EXTEND_FROM (the resolved scheduler of the checkpoint being resumed, `--extend-schedule`) is
    given: its schedule then goes on, warm-up as it was, to --steps instead of its end."""
    path = Path(path)
    cfg = read_json(path, "no such DeepSpeed config; see ds_configs/ for examples")

    def refuse(message):
        raise ConfigError(f"{path}: {message}")

    _check_keys(cfg, refuse)
    micro = cfg.get("train_micro_batch_size_per_gpu")
    if micro is None:
        refuse("set train_micro_batch_size_per_gpu (the number of streams per rank)")
    gas = cfg.setdefault("gradient_accumulation_steps", 1)
    total = cfg.get("train_batch_size")
    if total is not None and total != micro * gas * world_size:
        refuse(f"train_batch_size={total} but train_micro_batch_size_per_gpu={micro} x "
               f"gradient_accumulation_steps={gas} x {world_size} ranks = {micro * gas * world_size}: "
               "fix one, or drop train_batch_size and let it be derived")
    zero = cfg.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if zero.get("offload_param", {}).get("device", "none") != "none" and stage != 3:
        refuse(f"zero_optimization.offload_param needs zero_optimization.stage 3 (it is {stage})")
    if zero.get("offload_optimizer", {}).get("device", "none") != "none" and stage == 0:
        refuse("zero_optimization.offload_optimizer needs zero_optimization.stage 1, 2 or 3")
    if stage == 3 and zero.get("override_module_apply") is False:
        refuse("zero_optimization.override_module_apply false would leave the model's initialisation undone under "
               "ZeRO-3 (build_model): remove it")
    if cfg.get("fp16", {}).get("enabled") and not on_gpu():
        refuse("fp16.enabled is true but there is no GPU: use ds_configs/cpu.json or set fp16.enabled false")
    if cfg.get("fp16", {}).get("enabled") and cfg.get("bf16", {}).get("enabled"):
        refuse("fp16.enabled and bf16.enabled are both true: pick one")
    for key in ("partition_activations", "cpu_checkpointing"):
        if cfg.get("activation_checkpointing", {}).get(key):
            refuse(f"activation_checkpointing.{key} is not supported (foldscale checkpoints each block with "
                   "PyTorch's non-reentrant checkpoint): set it to false")
    if "optimizer" not in cfg:
        refuse("add an \"optimizer\" section (e.g. AdamW with lr and weight_decay): DeepSpeed owns it")
    sched = cfg.get("scheduler", {})
    if sched.get("type") in _SCHEDULERS_WITH_TOTAL:
        params = sched.setdefault("params", {})
        if extend_from is not None:
            saved = extend_from.get("params", {}).get("total_num_steps")
            if extend_from.get("type") != sched["type"] or not isinstance(saved, int) or steps < saved:
                refuse(f"--extend-schedule goes on with the checkpoint's {extend_from.get('type')} schedule of "
                       f"{saved} steps: pass --steps {saved} or more (and the same scheduler type)")
            sched["params"] = params = {**extend_from["params"], "total_num_steps": steps}
        if params.setdefault("total_num_steps", "auto") == "auto":
            params["total_num_steps"] = steps
        total, warmup = params["total_num_steps"], params.get("warmup_num_steps", 0)
        if isinstance(warmup, float) and 0 < warmup < 1:
            params["warmup_num_steps"] = warmup = max(1, int(warmup * total))
        if warmup >= total > 1:
            refuse(f"scheduler.params.warmup_num_steps={warmup} is not shorter than the schedule "
                   f"(total_num_steps={total}, \"auto\" follows --steps): lower it, e.g. to {max(1, total // 10)} "
                   "or the fraction 0.1, or train for more steps")
    elif isinstance(sched.get("params", {}).get("warmup_num_steps"), float):
        refuse(f"scheduler.params.warmup_num_steps as a fraction needs a schedule with total_num_steps "
               f"({', '.join(_SCHEDULERS_WITH_TOTAL)}): give it in steps")
    return cfg


def _check_keys(cfg: dict, refuse):
    """Refuse a key DeepSpeed would ignore at the top level, an optimizer parameter Adam(W) does not
    take, and a zero_optimization key or value DeepSpeed's own model rejects, with the nearest name."""
    def hint(key, known):
        close = [_SPELLINGS[key]] if _SPELLINGS.get(key) in known else difflib.get_close_matches(key, known, n=1)
        return f" (did you mean {close[0]}?)" if close else ""

    for key in cfg:
        if key not in TOP_LEVEL_KEYS:
            refuse(f"unknown key {key!r}{hint(key, TOP_LEVEL_KEYS)}: DeepSpeed would ignore it")
    optimizer = cfg.get("optimizer") or {}
    if str(optimizer.get("type", "")).lower() in ("adam", "adamw"):
        for key in optimizer.get("params", {}):
            if key not in ADAM_PARAMS:
                refuse(f"optimizer.params.{key} is not a parameter of {optimizer['type']}{hint(key, ADAM_PARAMS)}")
    if "zero_optimization" in cfg and not isinstance(cfg["zero_optimization"], dict):
        refuse("zero_optimization must be a section such as {\"stage\": 2}, not "
               f"{json.dumps(cfg['zero_optimization'])}")
    if "zero_optimization" in cfg:
        import pydantic
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
        try:
            DeepSpeedZeroConfig(**cfg["zero_optimization"])
        except pydantic.ValidationError as e:
            error = e.errors()[0]
            where = ".".join(map(str, ("zero_optimization", *error["loc"])))
            model = DeepSpeedZeroConfig
            for step in error["loc"][:-1]:  # down to the section the key sits in, for the hint
                annotation = model.model_fields[step].annotation if step in model.model_fields else None
                model = next((a for a in (annotation, *getattr(annotation, "__args__", ()))
                              if hasattr(a, "model_fields")), None)
                if model is None:
                    break
            fields = list(model.model_fields) if model is not None else []
            suggestion = hint(str(error["loc"][-1]), fields) if error["type"] == "extra_forbidden" else ""
            refuse(f"{where}: {error['msg'].lower()}{suggestion}")


def activation_checkpointing_fn(ds_config: dict):
    """Per-block activation checkpointing when the JSON has an "activation_checkpointing" section.

    PyTorch's non-reentrant checkpoint, not DeepSpeed's reentrant one: with bptt_segments > 1 a
    block runs once per segment, and each reentrant recomputation would run its own backward,
    handing ZeRO-2 a second gradient for the same parameter, which it refuses.
    """
    if "activation_checkpointing" not in ds_config:
        return None
    return functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)


def build_model(cfg: ModelConfig, ds_config: dict) -> FoldedLM:
    """The FoldedLM to train under DS_CONFIG, initialised as FoldedLM(cfg) is.

    Under ZeRO-3 it is built inside deepspeed.zero.Init: each submodule's parameters are cut into
    this rank's shard, in the training dtype and on the offload device, as soon as that submodule
    exists, so the whole model is never held by one process (a 6B model is 24 GB in fp32). The
    model initialises its weights through Module.apply, which zero.Init gathers for.
    """
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage", 0) != 3:
        return FoldedLM(cfg)
    if "offload_param" in zero:
        # Built unpinned: zero.Init would pin each shard on its own, and the engine then copies them
        # into one pinned buffer; PyTorch keeps the freed pinned blocks (~3 bytes per parameter).
        zero = {**zero, "offload_param": {**zero["offload_param"], "pin_memory": False}}
    with deepspeed.zero.Init(config_dict_or_path={**ds_config, "zero_optimization": zero}):
        model = FoldedLM(cfg)
    # zero.Init also turns torch.arange into the training dtype, which rounds the rotary positions
    # (bf16 holds integers exactly only up to 256), and leaves buffers where they were made, since
    # the engine does not move a model built this way: rebuild the tables in fp32 on the device.
    device = deepspeed.get_accelerator().current_device_name()
    model.rope_cos, model.rope_sin = model.rotary_tables(device)
    return model


def param_groups(model, weight_decay: float) -> list[dict]:
    """Matrices decay; norms, the learned initial state and the embedding do not."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        ndim = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 parameter holds an empty tensor between uses
        (decay if ndim == 2 and name not in ("s0", "tok_emb.weight") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(model, ds_config: dict):
    """deepspeed.initialize with foldscale's parameter groups and checkpointing choice."""
    model.set_activation_checkpointing(activation_checkpointing_fn(ds_config))
    wd = ds_config["optimizer"].get("params", {}).get("weight_decay", 0.0)
    with announced("building the DeepSpeed engine", deepspeed.comm.get_rank()):
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, wd),
                                               config=ds_config)
    return engine
