"""engine.build_model under ZeRO-3: the model is built partitioned (deepspeed.zero.Init) and must
come out initialised as FoldedLM(cfg) is, in one CPU process (gloo)."""
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import deepspeed
import numpy as np
import pytest
import torch

from foldscale.config import ModelConfig
from foldscale.engine import build_engine, build_model, load_ds_config, param_groups
from foldscale.model import FoldedLM, rope_tables

ROOT = Path(__file__).resolve().parents[1]
DS_CONFIGS = ROOT / "ds_configs"
CFG = ModelConfig(vocab_size=256, d_model=64, n_head=4, n_local=2, n_global=2, segment_len=512, state_gate=True)


def zero3(bf16: bool) -> dict:
    """The shipped ZeRO-3 offload config, or the same in fp32 with torch's Adam."""
    cfg = load_ds_config(DS_CONFIGS / "24gb-zero3.json", world_size=1, steps=1000)
    cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"] = 2, 1
    if not bf16:
        cfg["bf16"] = {"enabled": False}
        cfg["optimizer"]["params"]["torch_adam"] = True
        cfg["zero_optimization"] = {"stage": 3}
    return cfg


def gathered(model) -> dict[str, torch.Tensor]:
    """Every parameter in full, as fp32 copies."""
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def test_partitioned_weights_have_the_intended_stds(dist):
    """Without the model initialising through Module.apply, zero.Init would leave the projections
    into the residual stream at init_std instead of init_std / sqrt(2 * blocks)."""
    torch.manual_seed(0)
    model = build_model(CFG, zero3(bf16=True))
    assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters())  # built partitioned
    depth = CFG.init_std / math.sqrt(2 * (CFG.n_local + CFG.n_global))
    for name, w in gathered(model).items():
        if name.endswith(("attn.proj.weight", "mlp.down.weight")):
            assert w.std().item() == pytest.approx(depth, rel=0.05), name
        elif "norm" in name:  # RMSNorm scales
            assert torch.equal(w, torch.ones_like(w)), name
        elif name.endswith(".bias"):
            assert torch.equal(w, torch.zeros_like(w)), name
        else:  # the embedding (tied to the LM head), S0 and every other matrix
            assert w.std().item() == pytest.approx(CFG.init_std, rel=0.05), name
    assert model.lm_head.weight is model.tok_emb.weight


def test_partitioned_weights_equal_the_unpartitioned_model(dist):
    """In fp32 on the CPU zero.Init draws the same numbers in the same order: a ZeRO-3 run starts
    from the weights FoldedLM(cfg) has, so its losses do not move."""
    torch.manual_seed(0)
    expected = {n: p.detach() for n, p in FoldedLM(CFG).named_parameters()}
    torch.manual_seed(0)
    weights = gathered(build_model(CFG, zero3(bf16=False)))
    assert weights.keys() == expected.keys()
    for name, w in weights.items():
        torch.testing.assert_close(w, expected[name], rtol=0, atol=0, msg=name)


def test_rotary_tables_are_fp32_and_exact(dist):
    """zero.Init creates torch.arange in bf16, which rounds positions above 256."""
    model = build_model(CFG, zero3(bf16=True))
    cos, sin = rope_tables(2 * CFG.segment_len, CFG.head_dim, CFG.rope_theta, "cpu")
    assert model.rope_cos.dtype == torch.float32
    torch.testing.assert_close(model.rope_cos, cos, rtol=0, atol=0)
    torch.testing.assert_close(model.rope_sin, sin, rtol=0, atol=0)


def test_weight_decay_groups_do_not_change_under_zero_init(dist):
    """A partitioned parameter holds an empty 1-d tensor; its matrix still decays."""
    def names(model):
        ids = {id(p): n for n, p in model.named_parameters()}
        return [sorted(ids[id(p)] for p in g["params"]) for g in param_groups(model, 0.1)]
    assert names(build_model(CFG, zero3(bf16=True))) == names(FoldedLM(CFG))


def test_partitioned_model_trains_with_the_shipped_config(dist):
    """The shipped 24gb-zero3.json (bf16, parameters and optimizer offloaded) over a model built
    by build_model: two steps of two segments each, finite losses, and the weights move."""
    cfg = zero3(bf16=True)
    cfg["scheduler"]["params"]["warmup_min_ratio"] = 1.0
    small = dataclasses.replace(CFG, segment_len=32)  # bf16 is slow on a CPU
    torch.manual_seed(0)
    engine = build_engine(build_model(small, cfg), cfg)
    before = gathered(engine.module)
    ids = torch.randint(0, small.vocab_size, (2, 2 * small.segment_len), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        out = engine.module.forward_stream(ids, ids, bptt=2, keep_logits=False, step=engine)
        engine.backward(out.loss)
        engine.step()
        assert torch.isfinite(out.loss)
    after = gathered(engine.module)
    moved = ("tok_emb.weight", "local_blocks.0.attn.proj.weight", "s0")
    assert all(not torch.equal(before[n], after[n]) for n in moved)


@pytest.mark.e2e
def test_a_partitioned_run_resumes_bit_for_bit(tmp_path):
    """launch/pretrain.py under the shipped 24gb-zero3.json: 8 steps straight, and 4 + 4 resumed
    from the checkpoint (an engine built over a freshly partitioned model, then loaded)."""
    from foldscale.data import write_store
    rng = np.random.default_rng(0)
    docs = [np.append((rng.integers(0, 60) + np.arange(int(rng.integers(10, 130)))) % 60 + 4, 3) for _ in range(60)]
    write_store(docs, tmp_path / "store", vocab_size=64, val_fraction=0.1)
    (tmp_path / "model.json").write_text(json.dumps(dict(vocab_size=64, d_model=32, n_head=4, n_local=1, n_global=1,
                                                          segment_len=16)))
    cfg = json.loads((DS_CONFIGS / "24gb-zero3.json").read_text())
    cfg.update(train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=2)
    cfg["scheduler"]["params"].update(warmup_num_steps=2, total_num_steps=8)
    (tmp_path / "z3.json").write_text(json.dumps(cfg))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a process group of its own, not this test process's

    def run(out, steps, *resume):
        p = subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain.py"),
                            "--ds-config", str(tmp_path / "z3.json"), "--model", str(tmp_path / "model.json"),
                            "--data", str(tmp_path / "store"),
                            "--out", str(out), "--steps", str(steps), "--log-every", "1", "--save-every", "100",
                            "--eval-every", "100", *resume], env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        return [json.loads(line)["train/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
                if "train/loss" in line]
    straight = run(tmp_path / "straight", 8)
    run(tmp_path / "split", 4)
    assert run(tmp_path / "split", 8, "--resume", "auto") == straight and len(straight) == 8


def test_a_config_that_would_skip_the_initialisation_is_refused(tmp_path):
    from foldscale.config import ConfigError
    cfg = json.loads((DS_CONFIGS / "24gb-zero3.json").read_text())
    cfg["zero_optimization"]["override_module_apply"] = False
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="override_module_apply false would leave the model's initialisation undone"):
        load_ds_config(tmp_path / "ds.json", world_size=1, steps=1000)
