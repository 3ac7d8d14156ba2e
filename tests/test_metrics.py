"""foldscale/metrics.py: loss by position, and the one logger interface behind which the
console, metrics.jsonl and TensorBoard sit."""
import json

import torch

from foldscale.metrics import ConsoleLogger, JsonlLogger, MetricsLogger, PositionLoss, bucket_label, read_metrics


def test_position_loss_of_k_segments_per_row_equals_k_calls():
    """A micro-step of k segments per stream is bucketed segment by segment, as k one-segment
    calls would be."""
    g = torch.Generator().manual_seed(0)
    B, k, t = 3, 4, 5
    token_loss = torch.rand(B, k * t, generator=g)
    targets = torch.randint(0, 9, (B, k * t), generator=g)
    targets[0, 3:11] = -100
    token_loss[targets == -100] = 0.0  # as the model gives it
    seg_index = torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8], [30, 0, 1, 2]])
    together, apart = PositionLoss("cpu"), PositionLoss("cpu")
    together.add(token_loss, targets, seg_index)
    for i in range(k):
        apart.add(token_loss[:, i * t:(i + 1) * t], targets[:, i * t:(i + 1) * t], seg_index[:, i])
    torch.testing.assert_close(together.sums, apart.sums)
    assert torch.equal(together.counts, apart.counts)
    loss, table = together.summary()
    assert set(table) == {bucket_label(b) for b in (0, 1, 2, 3, 4, 5)}
    assert abs(loss - token_loss.double().sum().item() / (targets != -100).sum().item()) < 1e-12


def test_merge_adds_windows():
    a, b = PositionLoss("cpu"), PositionLoss("cpu")
    a.add(torch.ones(1, 4), torch.zeros(1, 4, dtype=torch.long), torch.tensor([0]))
    b.add(3 * torch.ones(1, 4), torch.zeros(1, 4, dtype=torch.long), torch.tensor([0]))
    a.merge(b)
    assert a.summary()[0] == 2.0


def test_only_rank_zero_writes(tmp_path):
    quiet = MetricsLogger.for_run(tmp_path / "r1", rank=1, total_steps=10)
    quiet.log(1, {"train/loss": 1.0})
    quiet.figure(1, "x", lambda: 1 / 0)  # never built on a rank that writes nothing
    assert not (tmp_path / "r1").exists()
    loud = MetricsLogger.for_run(tmp_path / "r0", rank=0, total_steps=10)
    loud.log(1, {"train/loss": 1.0})
    loud.close()
    assert json.loads((tmp_path / "r0" / "metrics.jsonl").read_text()) == {"step": 1, "train/loss": 1.0}
    assert list((tmp_path / "r0" / "tensorboard").iterdir())


def test_console_line(capsys):
    MetricsLogger.for_run("unused", rank=1, total_steps=50).log(3, {"train/loss": 2.0})
    assert capsys.readouterr().out == ""
    ConsoleLogger(50).log(10, {"train/loss": 2.34567, "train/tokens_per_s": 12345.6, "train/eta_s": 65.0,
                               "train/lr": 1e-3})
    out = capsys.readouterr().out
    assert out.startswith("step 10/50 | loss 2.3457 | 12,346 tok/s") and out.rstrip().endswith("eta 1m05s")
    assert "lr" not in out


def test_resume_logs_every_step_once(tmp_path):
    """A run stopped at step 7 after a checkpoint at step 5 logged steps 6 and 7; resumed from
    step 5 it logs them again, so the rewind must drop the first copies."""
    path = tmp_path / "metrics.jsonl"
    first = JsonlLogger(path)
    for step in range(1, 8):
        first.log(step, {"train/loss": float(step)})
    second = JsonlLogger(path)
    second.rewind(5)
    for step in range(6, 10):
        second.log(step, {"train/loss": 10.0 + step})
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert steps == list(range(1, 10))
    assert json.loads(path.read_text().splitlines()[5])["train/loss"] == 16.0  # step 6, logged once, anew


def test_read_metrics_is_what_the_jsonl_logger_wrote_complete_lines_only(tmp_path):
    assert read_metrics(tmp_path) == []  # nothing logged yet
    logger = JsonlLogger(tmp_path / "metrics.jsonl")
    logger.log(1, {"train/loss": 2.5})
    logger.log(2, {"train/loss": 2.25, "val/loss": 2.75})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "train/lo')  # a line still being written
    assert read_metrics(tmp_path) == [{"step": 1, "train/loss": 2.5}, {"step": 2, "train/loss": 2.25, "val/loss": 2.75}]
