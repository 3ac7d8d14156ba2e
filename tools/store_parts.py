"""A token store in parts small enough to travel one at a time, and joined again where it lands.

The GPU machines have no network and take at most 64 MiB of files per call, so a larger store
goes compressed and, where that is still too large, in parts: `split` compresses each file of the
store (xz: the prose corpus's 108 MB of tokens become 30 MB, one part) and writes OUT/part-00,
OUT/part-01, ..., each a directory of at most --max-mib of chunks of the compressed files and a
copy of the manifest (every chunk's file, offset, size and sha256). `receive` checks one part's
chunks against the manifest and keeps them beside DEST; once every part has arrived it writes the
store at DEST and verifies it whole (`TokenStore.verify`: every file's sha256 against the store's
own meta.json).

    python -m tools.store_parts split /work/corpus-build/store .gpu_data/parts     # here
    python -m tools.store_parts receive .gpu_data/parts/part-00 .gpu_data/prose/store   # there, a call per part
"""
import argparse
import hashlib
import json
import lzma
import shutil
import sys
from pathlib import Path

from foldscale.config import FoldscaleError
from foldscale.data import TokenStore

MANIFEST = "parts.json"


class PartsError(FoldscaleError):
    """A part that is damaged, of another store, or missing; the message says which."""


def split(store, out, max_bytes: int) -> list[Path]:
    """Write the files of the token store at STORE as parts of at most MAX_BYTES under OUT."""
    opened, out = TokenStore.open(store), Path(out)
    store = opened.path
    if out.exists():
        raise PartsError(f"{out} already exists: remove it or give another directory")
    chunks = []  # {"file", "offset", "bytes", "sha256", "part"} of the compressed files, largest first,
    used = []    # each in the first part with room
    files = {p.name: lzma.compress(p.read_bytes()) for p in store.iterdir() if p.is_file()}
    for name, packed in sorted(files.items(), key=lambda kv: -len(kv[1])):
        for offset in range(0, len(packed), max_bytes):
            data = packed[offset:offset + max_bytes]
            index = next((i for i, u in enumerate(used) if u + len(data) <= max_bytes), len(used))
            used += [0] * (index == len(used))
            chunks.append({"file": name, "offset": offset, "bytes": len(data), "part": index,
                           "sha256": hashlib.sha256(data).hexdigest()})
            used[index] += len(data)
            part = out / f"part-{index:02d}"
            part.mkdir(parents=True, exist_ok=True)
            (part / f"{name}.{offset}").write_bytes(data)
    manifest = {"store": store.name, "fingerprint": opened.fingerprint, "parts": len(used),
                "compression": "xz", "chunks": chunks}
    parts = [out / f"part-{i:02d}" for i in range(len(used))]
    for part in parts:
        (part / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return parts


def receive(part, dest) -> TokenStore | None:
    """Check PART's chunks and keep them in DEST.parts; with every part there, write and verify the
    store at DEST and return it (None while parts are missing)."""
    part, dest = Path(part), Path(dest)
    try:
        manifest = json.loads((part / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise PartsError(f"{part}: no readable {MANIFEST} ({e}); give a part written by `store_parts split`") from None
    if manifest.get("compression") != "xz":
        raise PartsError(f"{part} was split by an older store_parts (uncompressed): split the store again")
    staging = dest.with_name(dest.name + ".parts")
    staging.mkdir(parents=True, exist_ok=True)
    if (staging / MANIFEST).is_file() and json.loads((staging / MANIFEST).read_text()) != manifest:
        raise PartsError(f"{part} belongs to another split than the parts already in {staging}: remove {staging} "
                         "and send every part of one split")
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    index = int(part.name.rsplit("-", 1)[-1])
    for c in (c for c in manifest["chunks"] if c["part"] == index):
        name = f"{c['file']}.{c['offset']}"
        data = (part / name).read_bytes() if (part / name).is_file() else b""
        if len(data) != c["bytes"] or hashlib.sha256(data).hexdigest() != c["sha256"]:
            raise PartsError(f"{part / name} is missing or damaged (not the {c['bytes']} bytes split wrote): "
                             "send this part again")
        shutil.copyfile(part / name, staging / name)
    missing = sorted({c["part"] for c in manifest["chunks"] if not (staging / f"{c['file']}.{c['offset']}").is_file()})
    if missing:
        print(f"{staging}: part {index} of {manifest['parts']} received; still to send: "
              f"{', '.join(f'part-{i:02d}' for i in missing)}", flush=True)
        return None
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in {c["file"] for c in manifest["chunks"]}:
        packed = b"".join((staging / f"{name}.{c['offset']}").read_bytes()
                          for c in sorted(manifest["chunks"], key=lambda c: c["offset"]) if c["file"] == name)
        (tmp / name).write_bytes(lzma.decompress(packed))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    store = TokenStore.open(dest).verify()
    if store.fingerprint != manifest["fingerprint"]:
        raise PartsError(f"{dest} is not the store that was split (fingerprint {store.fingerprint}, split "
                         f"{manifest['fingerprint']})")
    shutil.rmtree(staging)
    print(f"{dest}: every part received, {store.n_tokens:,} tokens in {store.n_docs} documents, verified", flush=True)
    return store


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split", help="write STORE as parts under OUT")
    s.add_argument("store")
    s.add_argument("out")
    s.add_argument("--max-mib", type=float, default=36.0,
                   help="largest part, in MiB (a device call carries 64 in all: the repository's 20, "
                        "a trained model among them, and .whl/'s 6 included)")
    r = sub.add_parser("receive", help="take one part; write and verify the store at DEST once all are in")
    r.add_argument("part")
    r.add_argument("dest")
    args = p.parse_args(argv)
    try:
        if args.command == "split":
            for part in split(args.store, args.out, int(args.max_mib * 2**20)):
                size = sum(f.stat().st_size for f in part.iterdir())
                print(f"{part}: {size / 2**20:.1f} MiB")
        else:
            receive(args.part, args.dest)
    except FoldscaleError as e:
        sys.exit(f"store_parts: {e}")


if __name__ == "__main__":
    main()
