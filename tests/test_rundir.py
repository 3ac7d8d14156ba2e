"""The run directory: one training at a time, no earlier run started over by accident."""
import pytest

from foldscale.config import ConfigError
from foldscale.rundir import LOCK, claimed


def test_a_second_training_into_the_same_out_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "run"
    with claimed(out, 0, None, False):
        with pytest.raises(ConfigError, match=r"in use by the training of PID \d+ on host .*: wait for that training"):
            with claimed(out, 0, None, False):
                pass
    with claimed(out, 0, None, False):  # released at the end of the first
        assert (out / LOCK).is_file()


def test_an_earlier_run_needs_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step00000010").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 10}\n')
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds an earlier run: continue it with --resume auto, start it afresh with "
                                          "--overwrite"):
        with claimed(out, 0, None, False):
            pass
    with claimed(out, 0, "auto", False):
        pass
    with pytest.raises(ConfigError, match="pass one of them"):
        with claimed(out, 0, "auto", True):
            pass
    with claimed(out, 0, None, True):
        assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite deletes what a training wrote, nothing else


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_directory_it_made(tmp_path):
    with pytest.raises(ConfigError):
        with claimed(tmp_path / "new", 0, None, False):
            (tmp_path / "new" / "metrics.jsonl").write_text("")
            raise ConfigError("a config check failed")
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    with pytest.raises(ConfigError):
        with claimed(tmp_path / "old", 0, None, False):
            raise ConfigError("a config check failed")
    assert (tmp_path / "old").is_dir()  # not made by this run: left alone
