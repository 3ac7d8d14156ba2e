"""`foldscale export`: tiny CPU runs under ZeRO 0, 2 and 3 -> plain checkpoints."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from foldscale.cli import main
from foldscale.data import SegmentStreamSampler, TokenStore
from foldscale.export import load_torch_export
from foldscale.metrics import PositionLoss
from foldscale.model import FoldedLM
from run_helpers import TOKENIZED_MODEL as MODEL
from run_helpers import tokenized_store

pytestmark = pytest.mark.e2e  # every case reads the runs of the `runs` fixture

ROOT = Path(__file__).resolve().parents[1]
OFFLOAD = {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}
ZERO = {"0": {"stage": 0}, "2": {"stage": 2}, "3": {"stage": 3}, "3off": {"stage": 3, **OFFLOAD}}
STEPS, STREAMS, EVAL_SEGMENTS = 4, 2, 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One 4-step run per ZeRO stage, and ZeRO 3 with offload (checkpoints at steps 2 and 4,
    validation at step 4), trained side by side to keep the module fast."""
    tmp = tmp_path_factory.mktemp("export")
    tokenized_store(tmp / "store")
    (tmp / "model.json").write_text(json.dumps(MODEL))
    base = json.loads((ROOT / "ds_configs" / "cpu.json").read_text())
    base["scheduler"]["params"]["warmup_num_steps"] = 1
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = {}
    for stage, zero in ZERO.items():
        cfg = {**base, "train_micro_batch_size_per_gpu": STREAMS, "zero_optimization": zero}
        (tmp / f"z{stage}.json").write_text(json.dumps(cfg))
        procs[stage] = subprocess.Popen(
            [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--ds_config", str(tmp / f"z{stage}.json"),
             "--model", str(tmp / "model.json"), "--data", str(tmp / "store"), "--out", str(tmp / f"run{stage}"),
             "--steps", str(STEPS), "--save_every", "2", "--eval_every", str(STEPS),
             "--eval_segments", str(EVAL_SEGMENTS)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for stage, p in procs.items():
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    return tmp


def export(*args):
    result = CliRunner().invoke(main, ["export", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def engine_val_loss(run):
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["val/loss"] for r in lines if "val/loss" in r][-1]


@torch.no_grad()
def val_loss(model, store):
    """The trainer's own validation, replayed on a plain FoldedLM."""
    sampler = SegmentStreamSampler(store, "val", 0, 1, STREAMS, MODEL["segment_len"], 0)
    acc, state = PositionLoss("cpu"), None
    for _ in range(EVAL_SEGMENTS):
        batch = next(sampler)
        out = model(batch.ids, state=state, reset=batch.reset, targets=batch.targets)
        state = out.state
        acc.add(out.token_loss, batch.targets, batch.seg_index)
    return acc.summary()[0]


@pytest.mark.parametrize("stage", ZERO)
def test_export_reproduces_the_engines_validation_loss(runs, tmp_path, stage):
    """The exported model gives the loss the DeepSpeed engine itself measured at that step."""
    result = export(runs / f"run{stage}", "--out", tmp_path / "m")
    assert result["step"] == STEPS and result["check_batch"].startswith(str(runs / "store"))
    assert result["loss_exported"] == pytest.approx(result["loss_deepspeed"], rel=1e-6)
    model = FoldedLM.from_pretrained(tmp_path / "m").eval()
    assert val_loss(model, TokenStore.open(runs / "store")) == pytest.approx(engine_val_loss(runs / f"run{stage}"), rel=1e-5)
    tensors = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert "lm_head.weight" not in tensors and all(t.dtype == torch.float32 for t in tensors.values())
    assert model.lm_head.weight is model.tok_emb.weight


def test_zero0_export_holds_the_module_weights(runs, tmp_path):
    export(runs / "run0", "--out", tmp_path / "m")
    module = torch.load(runs / "run0" / "checkpoints" / "step00000004" / "mp_rank_00_model_states.pt",
                        weights_only=True)["module"]
    tensors = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert set(tensors) == set(module) - {"lm_head.weight"}
    for k, v in tensors.items():
        assert torch.equal(v, module[k]), k


def test_loads_in_a_process_without_deepspeed(runs, tmp_path):
    export(runs / "run3", "--out", tmp_path / "m")
    code = ("import sys, torch; from foldscale.model import FoldedLM; import foldscale.export, foldscale.evaluate; "
            f"m = FoldedLM.from_pretrained({str(tmp_path / 'm')!r}); "
            "m(torch.zeros(1, 4, dtype=torch.long)); assert 'deepspeed' not in sys.modules, 'deepspeed imported'")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr


def test_tag_bf16_torch_format_and_tokenizer(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs / "run2", run)
    older = export(run, "--tag", "step00000002", "--out", tmp_path / "old")
    newest = export(run, "--out", tmp_path / "new")
    assert older["step"] == 2 and older["loss_deepspeed"] != newest["loss_deepspeed"]
    assert newest["tokenizer"] and (tmp_path / "new" / "tokenizer.model").read_bytes() == \
        (runs / "store" / "tokenizer.model").read_bytes()

    half = export(run, "--dtype", "bf16", "--out", tmp_path / "half")
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(tmp_path / "half" / "model.safetensors")).values())
    assert half["loss_exported"] == pytest.approx(newest["loss_deepspeed"], rel=3e-2)
    assert half["loss_exported"] != newest["loss_exported"]  # rounded, yet within the tolerance

    assert not export(run, "--format", "torch", "--out", tmp_path / "m.pt")["tokenizer"]
    as_torch = load_torch_export(tmp_path / "m.pt").state_dict()
    for k, v in FoldedLM.from_pretrained(tmp_path / "new").state_dict().items():
        assert torch.equal(v, as_torch[k]), k


def test_random_check_batch_when_the_store_is_gone(runs, tmp_path):
    (runs / "store").rename(tmp_path / "moved")  # the checkpoint's data.json still names it
    try:
        result = CliRunner().invoke(main, ["export", str(runs / "run0"), "--out", str(tmp_path / "m")])
    finally:
        (tmp_path / "moved").rename(runs / "store")
    assert result.exit_code == 0, result.output
    assert "self-check on random ids" in result.output and "match" in result.output
    assert "(DeepSpeed checkpoint) vs" in result.output
    again = CliRunner().invoke(main, ["export", str(tmp_path / "m"), "--out", str(tmp_path / "m2")])
    assert again.exit_code == 0 and "(source export) vs" in again.output, again.output


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage,message", [
    ("missing run", "no checkpoint here"),
    ("unknown tag", "step00000099: no such checkpoint directory"),
    ("incomplete", "no COMPLETE marker"),
    ("truncated zero0", "step00000004/mp_rank_00_model_states.pt: "),
    ("truncated zero3", "step00000004/zero_pp_rank_0_mp_rank_00_optim_states.pt: "),
    ("tampered model.json", "step00000004/model.json: "),
    ("out is a file", "is a file"),
])
def test_refusals(runs, tmp_path, damage, message):
    stage = 3 if "zero3" in damage else 0
    run = tmp_path / "run"
    shutil.copytree(runs / f"run{stage}", run)
    ckpt = run / "checkpoints" / "step00000004"
    args = ["export", str(run), "--out", str(tmp_path / "m")]
    if damage == "missing run":
        args[1] = str(tmp_path / "nope")
    elif damage == "unknown tag":
        args += ["--tag", "step00000099"]
    elif damage == "incomplete":
        (ckpt / "COMPLETE").unlink()
        args += ["--tag", "step00000004"]
    elif damage == "truncated zero0":
        _truncate(ckpt / "mp_rank_00_model_states.pt")
    elif damage == "truncated zero3":
        _truncate(ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    elif damage == "tampered model.json":
        (ckpt / "model.json").write_text(json.dumps({**MODEL, "d_model": 64}))
    elif damage == "out is a file":
        (tmp_path / "m").write_text("x")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)


def test_export_files_are_readable_alike_and_an_unrelated_out_is_kept(runs, tmp_path):
    export(runs / "run0", "--out", tmp_path / "m")
    modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "m").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] != 0o600, modes
    export(runs / "run0", "--out", tmp_path / "m")  # an earlier export is replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')
    (mine / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, ["export", str(runs / "run0"), "--out", str(mine)])
    assert result.exit_code == 2 and "holds other files (notes.txt), not an earlier export" in result.output
    assert (mine / "config.json").read_text() == '{"my": "settings"}'


def test_generate_and_eval_take_a_run_directory(runs, tmp_path):
    """A run (its newest complete checkpoint) is read as its export would be."""
    export(runs / "run2", "--out", tmp_path / "m")
    for args in (["generate", "--prompt", "def f", "--max-new-tokens", "8", "--temperature", "0", "--json"],
                 ["eval", "--data", str(runs / "store"), "--max-tokens", "200", "--json"]):
        results = [CliRunner().invoke(main, [args[0], str(model), *args[1:]]) for model in (runs / "run2", tmp_path / "m")]
        assert all(r.exit_code == 0 for r in results), results[0].output + results[1].output
        from_run, from_export = (json.loads(r.stdout) for r in results)
        assert from_run.get("text", from_run.get("models", [{}])[0].get("loss")) == \
            from_export.get("text", from_export.get("models", [{}])[0].get("loss"))
