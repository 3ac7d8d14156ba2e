import json
from pathlib import Path

import pytest
import torch

from foldscale.config import ConfigError, ModelConfig
from foldscale.engine import activation_checkpointing_fn, build_engine, load_ds_config
from foldscale.model import FoldedLM

SHIPPED = sorted((Path(__file__).resolve().parents[1] / "ds_configs").glob("*.json"))
# Configs that offload to the host run DeepSpeed's CPU Adam (compiled on a first run) through a
# whole shipped step (up to 128 micro-batches): 10-50 s each, so in the e2e tier.
SHIPPED_TIERED = [pytest.param(p, marks=pytest.mark.e2e) if "offload" in p.read_text() else p for p in SHIPPED]
TINY = dict(vocab_size=64, d_model=32, n_head=4, n_local=1, n_global=1, segment_len=8)


@pytest.mark.parametrize("path", SHIPPED_TIERED, ids=lambda p: p.name)
def test_every_shipped_config_trains_a_step(path, dist):
    cfg = load_ds_config(path, world_size=1, steps=1000)
    assert cfg["scheduler"]["params"]["total_num_steps"] == 1000  # "auto" filled from --steps
    cfg["scheduler"]["params"]["warmup_min_ratio"] = 1.0  # full lr from step 1: two steps move bf16 weights
    torch.manual_seed(0)
    engine = build_engine(FoldedLM(ModelConfig(**TINY)), cfg)
    assert engine.zero_optimization_stage() == cfg["zero_optimization"]["stage"]
    before = {n: p.detach().float().clone() for n, p in engine.module.named_parameters() if p.numel() > 0}
    B = cfg["train_micro_batch_size_per_gpu"]
    ids = torch.randint(0, 64, (B, 8), device=engine.device)
    for _ in range(cfg["gradient_accumulation_steps"] * 2):  # bptt of 2 segments: two forwards, one backward
        first = engine(ids, targets=ids)
        out = engine(ids, state=first.state, reset=torch.zeros(B, dtype=torch.bool, device=engine.device), targets=ids)
        engine.backward(first.loss + out.loss)
        engine.step()
    assert torch.isfinite(out.loss)
    if cfg["zero_optimization"]["stage"] < 3:  # under ZeRO-3 the module holds only partitions
        after = dict(engine.module.named_parameters())
        assert any(not torch.equal(before[n], after[n].detach().float()) for n in before)


def write(tmp_path, **changes):
    cfg = json.loads((SHIPPED[0].parent / "cpu.json").read_text())
    for key, value in changes.items():
        cfg[key] = value
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("changes,kw,message", [
    (dict(train_batch_size=10), {}, "train_batch_size=10 but train_micro_batch_size_per_gpu=8"),
    (dict(zero_optimization={"stage": 2, "offload_param": {"device": "cpu"}}), {}, "offload_param needs zero_optimization.stage 3"),
    (dict(zero_optimization={"stage": 0, "offload_optimizer": {"device": "cpu"}}), {}, "offload_optimizer needs"),
    (dict(fp16={"enabled": True}), {}, "fp16.enabled is true but there is no GPU"),
    (dict(scheduler={"type": "WarmupCosineLR", "params": {"warmup_num_steps": 50}}), {},
     "warmup_num_steps=50 is not shorter than the schedule (total_num_steps=10"),
    (dict(scheduler={"type": "WarmupCosineLR", "params": {"total_num_steps": 40, "warmup_num_steps": 40}}), {},
     "lower it, e.g. to 4"),
    (dict(optimizer=None), {}, "add an \"optimizer\" section"),
    (dict(activation_checkpointing={"cpu_checkpointing": True}), {}, "cpu_checkpointing is not supported"),
    (dict(gradient_clippin=1.0), {}, "unknown key 'gradient_clippin' (did you mean gradient_clipping?)"),
    (dict(optimizer={"type": "AdamW", "params": {"learning_rate": 1e-3}}), {},
     "optimizer.params.learning_rate is not a parameter of AdamW (did you mean lr?)"),
    (dict(zero_optimization={"stage": 2, "offload_optimzer": {"device": "cpu"}}), {},
     "zero_optimization.offload_optimzer: extra inputs are not permitted (did you mean offload_optimizer?)"),
    (dict(zero_optimization={"stage": 2, "offload_optimizer": {"devce": "cpu"}}), {},
     "zero_optimization.offload_optimizer.devce: extra inputs are not permitted (did you mean device?)"),
    (dict(scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 0.1}}), {}, "give it in steps"),
])
def test_contradictions_are_refused_naming_file_and_key(tmp_path, changes, kw, message):
    path = write(tmp_path, **changes)
    if changes.get("optimizer", 1) is None:
        cfg = json.loads(path.read_text())
        del cfg["optimizer"]
        path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=str(path)) as e:
        load_ds_config(path, world_size=1, steps=10, **kw)
    assert message in str(e.value)


def test_shipped_cpu_config_warms_up_for_a_tenth_of_any_run():
    """A smoke run of a few steps works with the shipped config: the warm-up it resolves is at least
    one step, which DeepSpeed's schedulers need, and is recorded."""
    for steps, warmup in ((10, 1), (500, 50), (5, 1), (1, 1)):
        params = load_ds_config(SHIPPED[0].parent / "cpu.json", 1, steps)["scheduler"]["params"]
        assert (params["total_num_steps"], params["warmup_num_steps"]) == (steps, warmup)


def test_extending_a_schedule_keeps_its_warm_up(tmp_path):
    saved = {"type": "WarmupCosineLR", "params": {"total_num_steps": 10, "warmup_num_steps": 1, "cos_min_ratio": 0.1,
                                                 "warmup_min_ratio": 0.0}}
    params = load_ds_config(SHIPPED[0].parent / "cpu.json", 1, 20, extend_from=saved)["scheduler"]["params"]
    assert params == {**saved["params"], "total_num_steps": 20}
    # an extended run resumed to the same end keeps its schedule (a fraction would be worked out anew)
    same = load_ds_config(SHIPPED[0].parent / "cpu.json", 1, 10, extend_from=saved)["scheduler"]["params"]
    assert same == saved["params"]
    with pytest.raises(ConfigError, match="pass --steps 10 or more"):
        load_ds_config(SHIPPED[0].parent / "cpu.json", 1, 9, extend_from=saved)


def test_unreadable_configs_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="no such DeepSpeed config"):
        load_ds_config(tmp_path / "nope.json", 1, 10)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_ds_config(tmp_path / "bad.json", 1, 10)


def test_batch_size_multiplies_out_over_ranks(tmp_path):
    path = write(tmp_path, train_batch_size=32, gradient_accumulation_steps=2)
    assert load_ds_config(path, world_size=2, steps=100)["train_batch_size"] == 32
    with pytest.raises(ConfigError, match="x 1 ranks = 16"):
        load_ds_config(path, world_size=1, steps=100)


def test_deepspeed_activation_checkpointing_gives_same_gradients(dist):
    ds_cfg = json.loads((SHIPPED[0].parent / "24gb.json").read_text())
    ckpt = activation_checkpointing_fn(ds_cfg)
    assert ckpt is not None and activation_checkpointing_fn({}) is None
    grads = []
    for fn in (None, ckpt):
        torch.manual_seed(0)
        model = FoldedLM(ModelConfig(**TINY, bptt_segments=2)).train()
        model.set_activation_checkpointing(fn)
        ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(1))
        model.forward_stream(ids, targets=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for other in grads[1:]:
        for name, g in grads[0].items():
            torch.testing.assert_close(other[name], g, rtol=0, atol=0, msg=name)
