"""Loss and perplexity over whole documents, overall and by position in the document.

Each model reads every document from its start with its own segment length and carried state
(`forward_stream`). To compare models whose segment lengths differ on the same footing, a token
at position p of its document is counted in the bucket of segment index p // l_ref, l_ref being
the first model's segment length; the buckets (0, 1, 2-3, 4-7, ...) are training's.
"""
import math

import numpy as np
import torch

from foldscale.data import TokenStore
from foldscale.metrics import PositionLoss, bucket_label
from foldscale.model import FoldedLM


def select_documents(store: TokenStore, split: str, max_tokens: int | None) -> list[np.ndarray]:
    """Documents of SPLIT in index order until MAX_TOKENS predicted tokens; the last one is cut
    so the count is exact. A document of n tokens gives n - 1 predictions."""
    docs, budget = [], math.inf if max_tokens is None else max_tokens
    for i in store.docs(split):
        if budget <= 0:
            break
        doc = store.doc(int(i))
        if len(doc) < 2:
            continue
        doc = doc[:int(min(len(doc), budget + 1))]
        docs.append(doc)
        budget -= len(doc) - 1
    return docs


@torch.no_grad()
def position_losses(model: FoldedLM, docs: list[np.ndarray], l_ref: int, streams: int, device,
                    progress=None, context: int | None = None) -> PositionLoss:
    """Per-token losses of MODEL on DOCS, summed into segment-index buckets of l_ref tokens.

    With `context`, every document is read in windows of that many tokens, each from S0 as if a
    new document began there: no token sees further back than the start of its window. Windows
    go `streams` at a time, shortest first, each padded at its end; padding is never a target
    and, attention being causal, never changes the loss of an earlier token.
    """
    model.eval().to(device)
    acc = PositionLoss("cpu")
    step = context or max(len(d) for d in docs)
    windows = sorted(((d[start:start + step + 1], start) for d in docs for start in range(0, len(d) - 1, step)),
                     key=lambda w: len(w[0]))
    for first in range(0, len(windows), streams):
        chunk = windows[first:first + streams]
        T = max(len(d) for d, _ in chunk) - 1
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        targets = torch.full((len(chunk), T), -100, dtype=torch.long)
        for b, (d, _) in enumerate(chunk):
            d = torch.from_numpy(d.astype(np.int64))
            ids[b, :len(d) - 1], targets[b, :len(d) - 1] = d[:-1], d[1:]
        out = model.forward_stream(ids.to(device), targets=targets.to(device), keep_logits=False)
        token_loss = out.token_loss.cpu()
        for b, (d, start) in enumerate(chunk):
            n = len(d) - 1  # one row per token: bucket by the token's own position in its document
            acc.add(token_loss[b, :n, None], targets[b, :n, None], (start + torch.arange(n)) // l_ref)
            if progress is not None:
                progress.update(n)
    return acc


def evaluate(models: dict[str, FoldedLM], store: TokenStore, split: str = "val",
             max_tokens: int | None = None, streams: int = 4, device="cpu", context: int | None = None) -> dict:
    """Every model on exactly the same documents; by-position tables in units of the first
    model's segment length. `context` limits how far back any token sees (position_losses)."""
    from tqdm import tqdm
    docs = select_documents(store, split, max_tokens)
    n_tokens = sum(len(d) - 1 for d in docs)
    l_ref = next(iter(models.values())).cfg.segment_len
    results = []
    for name, model in models.items():
        with tqdm(total=n_tokens, desc=name, unit="tok", unit_scale=True) as bar:
            acc = position_losses(model, docs, l_ref, streams, device, bar, context)
        loss, table = acc.summary()
        counts = {bucket_label(b): int(c) for b, c in enumerate(acc.counts.tolist()) if c > 0}
        results.append({"model": name, "segment_len": model.cfg.segment_len, "loss": loss,
                        "perplexity": math.exp(min(loss, 50)), "by_position": table,
                        "tokens_by_position": counts})
    return {"split": split, "documents": len(docs), "tokens": n_tokens, "position_unit": l_ref,
            "context": context, "models": results}
