"""Loss and perplexity over whole documents, overall, by position in the document, and by
offset within the model's segment (`by_offset`, in OFFSET_PARTS parts of its own l).

Each model reads every document from its start with its own segment length and carried state,
many documents side by side as training reads them (`position_losses`). To compare models whose
segment lengths differ on the same footing, a token at position p of its document is counted in
the bucket of segment index p // l_ref, l_ref being the first model's segment length; the
buckets (0, 1, 2-3, 4-7, ...) are training's.
"""
import math

import numpy as np
import torch

from foldscale.data import TokenStore, assign_documents
from foldscale.metrics import PositionLoss, bucket_label
from foldscale.model import FoldedLM, segments


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


OFFSET_PARTS = 8
"""`by_offset` splits each model's own segment into this many equal parts."""


@torch.no_grad()
def position_losses(model: FoldedLM, docs: list[np.ndarray], l_ref: int, streams: int, device,
                    progress=None, context: int | None = None, block: int = 64) -> tuple[PositionLoss, torch.Tensor]:
    """Per-token losses of MODEL on DOCS, summed into segment-index buckets of l_ref tokens, and
    (2, l) sums of loss and counted tokens by offset within the model's own segment (a token at
    offset 0 sees the segment before it only through the carried state).

    Read as training reads: the documents (with `context`, windows of that many tokens, each
    from S0 as if a new document began there, so no token sees further back than its window's
    start) are dealt to `streams` streams of near-equal length (`assign_documents`), and every
    stream reads its own back to back, one segment of all streams at a time, a window starting
    at a segment boundary with `reset` and its last segment padded. Padding is never a target
    and, attention being causal, never changes an earlier token's loss. Streams are run longest
    first, and every BLOCK segments those that have finished leave the batch.
    """
    model.eval().to(device)
    l = model.cfg.segment_len
    step = context or max(len(d) for d in docs)
    windows = [(d[start:start + step + 1], start) for d in docs for start in range(0, len(d) - 1, step)]
    n_segments = np.array([-(-(len(w) - 1) // l) for w, _ in windows])
    dealt = assign_documents(n_segments, min(streams, len(windows)), seed=0, epoch=0)
    dealt.sort(key=lambda mine: -n_segments[mine].sum())  # longest first: the active streams are a prefix
    lengths = [int(n_segments[mine].sum()) for mine in dealt]
    ids = torch.zeros(len(dealt), lengths[0] * l, dtype=torch.long)
    targets = torch.full_like(ids, -100)
    position = torch.zeros_like(ids)  # of each token in its document
    reset = torch.zeros(len(dealt), lengths[0], dtype=torch.bool)
    for b, mine in enumerate(dealt):
        at = 0
        for i in mine:
            w, start = windows[i]
            w, n = torch.from_numpy(w.astype(np.int64)), len(w) - 1
            ids[b, at * l:at * l + n], targets[b, at * l:at * l + n] = w[:-1], w[1:]
            position[b, at * l:at * l + n] = start + torch.arange(n)
            reset[b, at] = True
            at += int(n_segments[i])
    acc, state = PositionLoss(device), None
    by_offset = torch.zeros(2, l, dtype=torch.float64, device=device)
    for first in range(0, lengths[0], block):
        rows = sum(n > first for n in lengths)
        cols = slice(first * l, (first + block) * l)
        state = None if state is None else state[:rows]
        counted = targets[:rows, cols].to(device)
        losses = []
        for out in segments(model, ids[:rows, cols].to(device), l, counted, state,
                            reset[:rows, first:first + block].to(device)):
            losses.append(out.token_loss)
            state = out.state
        # the block's losses are summed where they are: no wait for the device within a block
        token_loss = torch.cat(losses, 1)  # (rows, k * l)
        acc.add(token_loss.reshape(-1, 1), counted.reshape(-1, 1), position[:rows, cols].to(device).reshape(-1) // l_ref)
        by_offset += torch.stack([token_loss.double().view(rows, -1, l).sum((0, 1)),
                                  (counted != -100).double().view(rows, -1, l).sum((0, 1))])
        if progress is not None:
            progress.update(int((targets[:rows, cols] != -100).sum()))
    return acc, by_offset.cpu()


def offset_table(by_offset: torch.Tensor, parts: int = OFFSET_PARTS) -> list[float | None]:
    """Mean loss in each of `parts` equal parts of a segment (None where no token was counted),
    from position_losses' (2, l) sums by offset."""
    part = torch.arange(by_offset.shape[1]) * parts // by_offset.shape[1]
    sums = [by_offset[:, part == p].sum(1).tolist() for p in range(parts)]
    return [s / c if c else None for s, c in sums]


def evaluate(models: dict[str, FoldedLM], store: TokenStore, split: str = "val",
             max_tokens: int | None = None, streams: int = 16, device="cpu", context: int | None = None,
             l_ref: int | None = None, progress: bool = True) -> dict:
    """Every model on exactly the same documents; by-position tables in units of l_ref tokens
    (default: the first model's segment length). `context` limits how far back any token sees
    (position_losses); `progress` shows a bar per model."""
    from tqdm import tqdm
    docs = select_documents(store, split, max_tokens)
    n_tokens = sum(len(d) - 1 for d in docs)
    l_ref = l_ref or next(iter(models.values())).cfg.segment_len
    results = []
    for name, model in models.items():
        with tqdm(total=n_tokens, desc=name, unit="tok", unit_scale=True, smoothing=0.05, disable=not progress) as bar:
            acc, by_offset = position_losses(model, docs, l_ref, streams, device, bar, context)
        loss, table = acc.summary()
        counts = {bucket_label(b): int(c) for b, c in enumerate(acc.counts.tolist()) if c > 0}
        results.append({"model": name, "segment_len": model.cfg.segment_len, "loss": loss,
                        "perplexity": math.exp(min(loss, 50)), "by_position": table,
                        "tokens_by_position": counts, "by_offset": offset_table(by_offset)})
    return {"split": split, "documents": len(docs), "tokens": n_tokens, "position_unit": l_ref,
            "context": context, "models": results}
