"""The tools run as a user runs them, from the repository root (`python -m tools.NAME`)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.run_helpers import ROOT


@pytest.mark.e2e
def test_parity_of_two_ranks_and_one(tmp_path):
    """2 gloo ranks x 2 streams against 1 rank x 4: the same losses up to float order, every
    stream reading the same segments, documents in order."""
    out = tmp_path / "parity.json"
    proc = subprocess.run([sys.executable, "-m", "tools.parity", "--quick", "--json", str(out)], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["zero"] for r in rows] == [2]
    assert all(r["ok"] and r["same_segments"] and r["documents_in_order"] and r["max_rel_diff"] < 1e-6 for r in rows)


def test_scaling_model(tmp_path):
    """Analytic, no --quick: efficiency in (0, 1], falling as the GPUs grow, for each ZeRO stage."""
    out = tmp_path / "scaling.json"
    proc = subprocess.run([sys.executable, "-m", "tools.scaling_model", "--presets", "350m", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    for zero in (1, 2, 3):
        eff = [r["efficiency"] for r in rows if r["zero"] == zero]
        assert len(eff) == 4 and all(0 < e <= 1 for e in eff) and eff == sorted(eff, reverse=True)


class SavingEngine:
    """Saves as DeepSpeed's engine does, a directory per tag (ckpt.save's part of it is real)."""
    module = torch.nn.Linear(4, 4)

    def save_checkpoint(self, root, tag, **kwargs):
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        torch.save(self.module.state_dict(), Path(root) / tag / "mp_rank_00_model_states.pt")


def test_inspect_checkpoint_reports_and_verifies(tmp_path, capsys):
    import torch.distributed as dist

    from foldscale import checkpoint as ckpt
    from foldscale.config import ModelConfig
    from tools import inspect_checkpoint
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "scheduler": {"type": "WarmupCosineLR"}}
        configs = {"model.json": ModelConfig(segment_len=32).to_dict(), "ds_config.json": ds}
        for step in (2, 4):
            ckpt.save(SavingEngine(), tmp_path / "run" / "checkpoints", step, 0, 1, trainer_state={"step": step},
                      rank_state={}, configs=configs, tokenizer=None, keep_last=3)
    finally:
        dist.destroy_process_group()
    info = inspect_checkpoint.inspect(tmp_path / "run")
    assert info["verifies"] and info["step"] == 4 and info["world_size"] == 1
    assert info["model"]["segment_len"] == 32 and info["batch"]["gradient_accumulation_steps"] == 2
    assert "mp_rank_00_model_states.pt" in info["files"] and info["bytes"] == sum(info["files"].values())
    newest = tmp_path / "run" / "checkpoints" / "step00000004"
    with open(newest / "mp_rank_00_model_states.pt", "ab") as f:
        f.write(b"x")
    with pytest.raises(SystemExit) as stop:
        inspect_checkpoint.main([str(tmp_path / "run")])
    assert stop.value.code == 1 and "does not verify" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        inspect_checkpoint.main([str(tmp_path / "run" / "checkpoints" / "step00000002")])
    assert stop.value.code == 0 and "step 2" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        inspect_checkpoint.main([str(tmp_path / "nothing")])
    assert stop.value.code == 2 and "no such run or checkpoint directory" in capsys.readouterr().err
