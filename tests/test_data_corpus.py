import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from click.testing import CliRunner

from foldscale.cli import main
from foldscale.data import corpus
from foldscale.data.corpus import default_store, stdlib_files
from foldscale.data.store import TokenStore
from foldscale.data.tokenizer import Tokenizer

SMALL = dict(vocab_size=512, max_files=25, num_proc=1)


def test_stdlib_files_are_sorted_python_sources_outside_site_packages():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = stdlib_files()
    assert files == sorted(files) and len(files) > 500
    assert all(f.suffix == ".py" and root in f.parents for f in files)
    assert not any({"site-packages", "dist-packages"} & set(f.parts) for f in files)
    assert any(f.name == "os.py" for f in files)
    assert stdlib_files(10) == files[:10]


def test_default_store_builds_once_and_reuses(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FOLDSCALE_CACHE", str(tmp_path))
    stale = tmp_path / "stdlib-py{}.{}-v512-f25".format(*sys.version_info[:2]) / "store.tmp-99999"
    stale.mkdir(parents=True)  # left behind by an interrupted build
    path = default_store(**SMALL)
    assert path.parent.parent == tmp_path and path.name == "store"
    out = capsys.readouterr().out
    assert "building the built-in corpus" in out and "[1/2] tokenizer trained (" in out
    assert "[2/2] built-in corpus ready (" in out
    assert not stale.exists()
    assert sorted(p.name for p in path.parent.iterdir()) == ["build.lock", "store"]
    store = TokenStore.open(path).verify()
    tok = Tokenizer(store.tokenizer_path)
    assert store.vocab_size == 512 and store.tokenizer_hash == tok.hash
    assert store.n_docs + store.meta["dropped_empty_docs"] == 25
    assert "stdlib" in store.meta["source"]
    assert len(store.docs("val")) >= 1
    texts = [f.read_text() for f in stdlib_files(25)]
    assert store.meta["dropped_empty_docs"] == texts.count("")
    assert tok.decode(store.doc(0)[:-1]) == next(t for t in texts if t)  # one file, one document
    mtime = (path / "meta.json").stat().st_mtime_ns
    assert default_store(**SMALL) == path
    assert capsys.readouterr().out == ""
    assert (path / "meta.json").stat().st_mtime_ns == mtime


@pytest.mark.e2e
def test_concurrent_callers_build_once(tmp_path):
    code = ("from foldscale.data.corpus import default_store\n"
            "print('PATH', default_store(vocab_size=512, max_files=20, num_proc=1))")
    env = {**os.environ, "FOLDSCALE_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    paths = {line for out in outs for line in out.splitlines() if line.startswith("PATH")}
    assert len(paths) == 1
    assert sum("building the built-in corpus" in out for out in outs) == 1
    TokenStore.open(paths.pop().split(" ", 1)[1])


def test_cli_prepare_default(monkeypatch, tmp_path):
    calls = []

    def fake(vocab_size, max_files, num_proc, rebuild):
        calls.append((vocab_size, max_files, num_proc, rebuild))
        return tmp_path / "store"

    monkeypatch.setattr(corpus, "default_store", fake)
    result = CliRunner().invoke(main, ["prepare", "--default", "--vocab-size", "4096"])
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "store") in result.output and calls == [(4096, None, None, False)]
    again = CliRunner().invoke(main, ["prepare", "--default", "--overwrite", "--max-files", "9"])
    assert again.exit_code == 0 and calls[-1] == (8192, 9, None, True)
    refused = CliRunner().invoke(main, ["prepare", "--default", "--input", "x.txt"])
    assert refused.exit_code == 2 and "takes no --input" in refused.output
