import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from foldscale.data import TokenStore, write_store
from tools import store_parts

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    return write_store([rng.integers(0, 1000, n) for n in (900, 1500, 400, 2000)], tmp_path / "store",
                       vocab_size=1000, val_fraction=0.25)


def test_a_store_in_parts_arrives_whole_in_any_order(tmp_path, store):
    parts = store_parts.split(store.path, tmp_path / "parts", max_bytes=3000)
    sizes = [sum(f.stat().st_size for f in p.iterdir() if f.name != store_parts.MANIFEST) for p in parts]
    assert len(parts) >= 3 and max(sizes) <= 3000  # tokens.bin alone is 9,600 bytes, about 6,500 compressed
    dest = tmp_path / "there" / "store"
    for part in reversed(parts[1:]):
        assert store_parts.receive(part, dest) is None and not dest.exists()
    got = store_parts.receive(parts[0], dest)
    assert np.array_equal(got.tokens, store.tokens) and got.fingerprint == store.fingerprint
    assert np.array_equal(TokenStore.open(dest).docs("val"), store.docs("val"))
    assert not dest.with_name("store.parts").exists()


def test_a_damaged_or_foreign_part_is_refused(tmp_path, store):
    parts = store_parts.split(store.path, tmp_path / "parts", max_bytes=3000)
    chunk = next(f for f in parts[1].iterdir() if f.name.startswith("tokens.bin"))
    good = chunk.read_bytes()
    chunk.write_bytes(good[:-2] + b"\0\0" if good[-2:] != b"\0\0" else good[:-2] + b"\1\1")
    dest = tmp_path / "there" / "store"
    with pytest.raises(store_parts.PartsError, match=f"{chunk.name} is missing or damaged.*send this part again"):
        store_parts.receive(parts[1], dest)
    chunk.write_bytes(good)
    assert store_parts.receive(parts[1], dest) is None
    other = write_store([np.arange(50)], tmp_path / "other", vocab_size=1000, val_fraction=0.0)
    foreign = store_parts.split(other.path, tmp_path / "other_parts", max_bytes=3000)
    with pytest.raises(store_parts.PartsError, match="belongs to another split"):
        store_parts.receive(foreign[0], dest)
    manifest = json.loads((foreign[0] / store_parts.MANIFEST).read_text())
    del manifest["compression"]  # as split wrote it before the parts were compressed
    (foreign[0] / store_parts.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(store_parts.PartsError, match="split by an older store_parts.*split the store again"):
        store_parts.receive(foreign[0], tmp_path / "elsewhere")


@pytest.mark.e2e
def test_the_cli_splits_and_says_what_is_still_to_send(tmp_path, store):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "tools.store_parts", *map(str, args)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    split = cli("split", store.path, tmp_path / "parts", "--max-mib", 0.002)
    assert split.returncode == 0 and "part-00: " in split.stdout and "part-02: " in split.stdout
    first = cli("receive", tmp_path / "parts" / "part-00", tmp_path / "dest")
    assert first.returncode == 0 and "still to send: part-01" in first.stdout
    again = cli("split", store.path, tmp_path / "parts")
    assert again.returncode == 1 and again.stderr.startswith("store_parts: ") and "already exists" in again.stderr
