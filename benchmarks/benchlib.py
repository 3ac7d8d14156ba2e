"""Small helpers the benchmarks share: a synthetic token store, a table, a JSON record."""
import datetime
import json
import platform
from pathlib import Path

import numpy as np
import torch


def synthetic_store(path, vocab_size: int, n_docs: int, doc_len: int, seed: int = 0):
    """Random documents of about doc_len tokens: throughput does not depend on the text."""
    from foldscale.data import TokenStore, write_store
    if not (Path(path) / "meta.json").is_file():
        rng = np.random.default_rng(seed)
        docs = [rng.integers(4, vocab_size, size=int(doc_len * rng.uniform(0.75, 1.25))) for _ in range(n_docs)]
        write_store(docs, path, vocab_size=vocab_size, val_fraction=0.05)
    return TokenStore.open(path)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()})"


def print_table(rows: list[dict], columns: list[str]):
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("-+-".join("-" * w for w in widths))
    for row in cells:
        print(" | ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_json(path, rows: list[dict], **meta):
    if path:
        record = {"date": datetime.date.today().isoformat(), "device": device_name(),
                  "torch": torch.__version__, **meta, "rows": rows}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(record, indent=2) + "\n")


def cuda_sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
