"""Every file of a real token store, damaged every way: `TokenStore.open` + `verify` refuse it by
name with the command that rebuilds it, and the built-in corpus rebuilds itself."""
import shlex
import shutil

import pytest
from click.testing import CliRunner

from data_helpers import train_small_tokenizer
from foldscale.cli import main
from foldscale.data.corpus import default_store
from foldscale.data.store import DamagedStoreError, TokenStore, prepare

BUILT_IN = dict(vocab_size=400, max_files=5, num_proc=1)


def delete(file):
    file.unlink()


def truncate(file):
    file.write_bytes(file.read_bytes()[:file.stat().st_size // 2])


def flip_byte(file):
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def flip_bit(file):
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x01
    file.write_bytes(bytes(data))


DAMAGES = (delete, truncate, flip_byte, flip_bit)


def refusal(store) -> DamagedStoreError | None:
    try:
        TokenStore.open(store).verify()
    except DamagedStoreError as e:  # any other exception fails the test
        return e
    return None


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A store made by `prepare` from relative paths, as a user in the data directory would."""
    d = tmp_path_factory.mktemp("made")
    train_small_tokenizer(d / "tok.model")
    (d / "a.txt").write_text("def f():\n    return 1\n")
    (d / "b.txt").write_text("x = [1, 2, 3]\n" * 50)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(d)
        prepare("*.txt", "tok.model", "store", num_proc=1)
    return TokenStore.open(d / "store")


def test_meta_json_lists_every_other_file(made):
    names = sorted(p.name for p in made.path.iterdir())
    assert names == sorted([*made.meta["files"], "meta.json"])
    assert {"tokens.bin", "offsets.npy", "split.npy", "tokenizer.model"} <= set(names)


def test_every_damage_to_every_file_is_refused_by_name(made, tmp_path):
    hint = f"`{made.meta['command']} --overwrite`"
    for name in sorted(p.name for p in made.path.iterdir()):
        for damage in DAMAGES:
            case = tmp_path / f"{damage.__name__}-{name}"
            shutil.copytree(made.path, case)
            damage(case / name)
            error = refusal(case)
            assert error is not None, f"{damage.__name__} {name}: opened and verified"
            assert error.file == name and str(case / name) in str(error), str(error)
            # only a deleted meta.json takes the recorded command with it
            assert (hint in str(error)) == (name != "meta.json" or damage is not delete), str(error)


def test_open_alone_hashes_all_but_tokens_bin(made, tmp_path):
    for name in made.meta["files"]:
        case = tmp_path / name
        shutil.copytree(made.path, case)
        flip_byte(case / name)
        if name == "tokens.bin":
            store = TokenStore.open(case)  # the size is checked; the hash only by verify()
            with pytest.raises(DamagedStoreError, match="tokens.bin does not match the sha256"):
                store.verify()
        else:
            with pytest.raises(DamagedStoreError, match=f"{name} does not match the sha256"):
                TokenStore.open(case)


def test_the_hint_rebuilds_the_store_from_anywhere(made, tmp_path, monkeypatch):
    before = tmp_path / "before"
    shutil.copytree(made.path, before)
    truncate(made.path / "tokens.bin")
    command = str(refusal(made.path)).split("`")[1]
    assert command.endswith(f"--out {made.path} --val-fraction 0.01 --seed 0 --overwrite")
    monkeypatch.chdir(tmp_path)  # not where the store was made from
    result = CliRunner().invoke(main, shlex.split(command)[1:] + ["--num-proc", "1"])
    assert result.exit_code == 0, result.output
    for name in sorted(p.name for p in before.iterdir()):
        assert (made.path / name).read_bytes() == (before / name).read_bytes(), name


def test_built_in_corpus_rebuilds_every_damage(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FOLDSCALE_CACHE", str(tmp_path))
    path = default_store(**BUILT_IN)
    good = tmp_path / "good"
    shutil.copytree(path, good)
    capsys.readouterr()
    for name in sorted(p.name for p in good.iterdir()):
        for damage in DAMAGES:
            damage(path / name)
            assert default_store(**BUILT_IN) == path
            out = capsys.readouterr().out
            assert f"rebuilding the built-in corpus at {path} (damaged: {name} " in out, out
            assert "built-in corpus ready" in out
            assert TokenStore.open(path).verify().n_tokens == TokenStore.open(good).n_tokens
    assert sorted(p.name for p in path.parent.iterdir()) == ["build.lock", "store"]


def test_cli_prepare_default_overwrite_rebuilds(tmp_path, monkeypatch):
    monkeypatch.setenv("FOLDSCALE_CACHE", str(tmp_path))
    path = default_store(**BUILT_IN)
    built = (path / "meta.json").stat().st_mtime_ns
    args = ["prepare", "--default", "--vocab-size", "400", "--max-files", "5", "--num-proc", "1"]
    kept = CliRunner().invoke(main, args)
    assert kept.exit_code == 0 and str(path) in kept.output
    assert (path / "meta.json").stat().st_mtime_ns == built
    rebuilt = CliRunner().invoke(main, args + ["--overwrite"])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert "a rebuild was asked for" in rebuilt.output
    assert (path / "meta.json").stat().st_mtime_ns != built
    assert TokenStore.open(path).verify().meta["command"] == " ".join(args[:-2]).replace(
        "prepare", "foldscale prepare", 1)
