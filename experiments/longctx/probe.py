"""Why a needle is missed: instruments for a trained folded model (issue 16).

- `by_offset`: exact match by where the needle ended within its segment (quarters of l). A
  memory that writes only some rows well misses needles at some offsets more than at others.
- `footprint`: how much of the needle is still in the carried state k segments later. Each
  document is read twice, once with its needle and once with a different needle of the same
  length (same filler, same positions); the relative difference of the two states,
  ||S - S'|| / ||S||, per row, is the needle's footprint. Its mean over rows and its largest
  row, against k, show whether the memory forgets (decay), and the gate's values on the same
  walk (mean, and the share above 0.99) show whether the rows holding it saturate.
- `by_answer_split`: exact match of the documents whose answer lies in one segment and of those
  whose answer crosses into the next (which sees the question only through the state).
- `by_answer_source`: exact match by the piece of the story that names the answer: the needle,
  or a supporting fact before it (qa2 when the take comes last: the place is in the earlier
  move). A model that misses only the second kind has not learned to join two facts; that is
  not memory.
- `misses`: what the model answered where it missed: its argmax digits beside the answer,
  what it answers by itself (greedy), where the needle and the question fell (segment, offset
  in it), and where the story names what it answered (`named_in`: a distractor after the
  needle is recency, "not in the story" a guess).
- `gradient`: the norm of the answer loss's gradient with respect to the state carried out of
  the needle's segment, and out of the segment before the question, for documents whose
  needle is k segments back: how much training signal reaches the write.

    python -m experiments.suite --tasks passkey --state-gate --state-norm --probe
"""
import collections
import copy
import re

import numpy as np
import torch

from experiments.longctx import text
from foldscale.model import FoldedLM, segments


def needle_end(doc: text.Document) -> int:
    """Position just past the needle (the last supporting piece)."""
    pos, tokens = doc.piece("support")
    return pos + len(tokens)


def by_offset(docs: list, exact, l: int, bins: int = 4) -> list[float | None]:
    """Exact match of the documents whose needle ended in each of `bins` equal parts of a
    segment (None for an empty part)."""
    part = np.array([(needle_end(d) - 1) % l * bins // l for d in docs])
    exact = np.asarray(exact, bool)
    return [round(float(exact[part == b].mean()), 3) if (part == b).any() else None for b in range(bins)]


def answer_crosses(doc: text.Document, l: int) -> bool:
    """Do the positions that predict the answer span two segments?"""
    at, answer = doc.piece("answer")
    return (at - 1) // l != (at + len(answer) - 2) // l


def by_answer_split(docs: list, exact, l: int) -> dict:
    """Exact match and count of the documents whose answer lies in one segment ("within") and of
    those whose answer crosses a segment boundary ("crossing")."""
    crossing, exact = np.array([answer_crosses(d, l) for d in docs]), np.asarray(exact, bool)
    return {name: {"exact": round(float(exact[mask].mean()), 3) if mask.any() else None, "docs": int(mask.sum())}
            for name, mask in (("within", ~crossing), ("crossing", crossing))}


NAMED_IN = ("needle", "support", "distractor before the needle", "distractor after the needle", "not in the story")


def named_in(doc: text.Document, word: str, tokenizer) -> str:
    """Where the story last names `word` before the question, one of NAMED_IN: "needle",
    "support" (a supporting piece before the needle), a distractor before or after the needle, or
    "not in the story". A word of the story that `word` begins with, or that begins with `word`,
    counts (both of 3 letters or more): a greedy answer has the right answer's number of tokens,
    so a wrong place comes back cut short ("bathro") or run on ("gardenden")."""
    end, word, found = needle_end(doc), word.strip(), "not in the story"
    if len(word) < 3:
        return found
    for role, pos, tokens in doc.pieces:  # in document order: the last match is the latest
        if role in ("question", "answer"):
            continue
        words = re.findall(r"\w{3,}", tokenizer.decode(tokens.tolist()))
        if any(word.startswith(w) or w.startswith(word) for w in words):
            if pos + len(tokens) == end:
                found = "needle"
            else:
                found = "support" if role == "support" else f"{role} {'before' if pos < end else 'after'} the needle"
    return found


def by_answer_source(docs: list, exact, tokenizer) -> dict:
    """Exact match and count of the documents grouped by the piece that names their answer
    (`named_in`), e.g. {"needle": {"exact": 0.9, "docs": 52}, "support": {...}}."""
    source = np.array([named_in(d, tokenizer.decode(d.piece("answer")[1].tolist()), tokenizer) for d in docs])
    exact = np.asarray(exact, bool)
    return {s: {"exact": round(float(exact[source == s].mean()), 3), "docs": int((source == s).sum())}
            for s in sorted(set(source))}


def named_counts(missed: list[dict]) -> dict:
    """How many of the listed misses answered (greedy) something the story names where (`named_in`)."""
    return dict(collections.Counter(x["answered_in"] for x in missed).most_common())


@torch.no_grad()
def misses(model: FoldedLM, docs: list, exact, tokenizer, device, most: int | None = 20) -> list[dict]:
    """For up to `most` documents that `exact` marks wrong (None: all): the answer and the model's
    argmax at each answer position (given the right tokens before it, as exact match scores it),
    what it answers by itself (greedy, each token fed back: a wrong first token makes a wrong
    place, where the argmax given the right ones may read "barden"), where the story names the
    answer and what was answered (`named_in`), the segment of the needle's end and its offset
    there, the question's segment, and the segment and offset of the position that predicts the
    answer's first token (`answer_crosses` tells whether the answer goes on into the next
    segment). Each document is read alone, up to its answer, once: the answers are read again
    from the state carried into their segment."""
    l, out = model.cfg.segment_len, []
    for doc, right in zip(docs, exact):
        if right or len(out) == most:
            continue
        at, answer = doc.piece("answer")
        start = (at - 1) // l * l  # the segment that predicts the answer's first token starts here
        ids = torch.from_numpy(text.batch([doc], 0, at + len(answer))[0]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            state = None
            for o in segments(model, ids[:, :start], l):
                state = o.state
            read = lambda tail: torch.cat([o.logits for o in segments(model, tail, l, state=state)], dim=1)
            guess = read(ids[:, start:])[0, at - 1 - start:at - 1 - start + len(answer)].argmax(-1).tolist()
            answered = ids[:, start:at]
            for _ in answer:
                answered = torch.cat([answered, read(answered)[:, -1:].argmax(-1)], dim=1)
        answered, said = tokenizer.decode(answered[0, at - start:].tolist()), tokenizer.decode(answer.tolist())
        end = needle_end(doc) - 1
        out.append({"answer": said, "predicted": tokenizer.decode(guess), "answered": answered,
                    "answer_in": named_in(doc, said, tokenizer), "answered_in": named_in(doc, answered, tokenizer),
                    "digits_right": int(sum(g == a for g, a in zip(guess, answer.tolist()))),
                    "needle_segment": end // l, "needle_offset": end % l,
                    "question_segment": doc.piece("question")[0] // l,
                    "answer_segment": (at - 1) // l, "answer_offset": (at - 1) % l})
    return out


def swapped(task, doc: text.Document, rng) -> text.Document | None:
    """The same document with another story's needle of the same length in place of its own,
    or None if 100 stories had none."""
    pos, tokens = doc.piece("support")
    for _ in range(100):
        other = task.story(rng).needle
        if len(other) == len(tokens) and not np.array_equal(other, tokens):
            twin = copy.copy(doc)
            twin.spans = [(p, n, other if p == pos and isinstance(src, np.ndarray) else src)
                          for p, n, src in doc.spans]
            return twin
    return None


class GateRecorder:
    """Records the gate g of every carry while installed (a forward hook on carry.gate)."""

    def __init__(self, model: FoldedLM):
        self.values, self.handle = [], None
        carry = model.carry
        if carry is not None and carry.gate is not None:
            self.handle = carry.gate.register_forward_hook(lambda m, i, z: self.values.append(carry.opening(z.float())))

    def remove(self):
        if self.handle is not None:
            self.handle.remove()


@torch.no_grad()
def footprint(model: FoldedLM, task, corpus: text.Corpus, device, seed: int, after: list[int],
              n_docs: int = 16, prefix_segments: int = 4) -> list[dict]:
    """The needle's footprint in the state `k` segments after the needle's segment, for each k
    in `after`: mean and largest-row relative difference, and the gate's mean, share above 0.99
    and share at exactly 1 at that segment, and the share of the state's channels at exactly 1 in
    every segment since the needle's (None without a gate). Only a channel at exactly 1
    (`state_gate_hard`) carries a value unchanged: 0.999 ** 16384 is 1e-7, and a channel whose
    gate falls below 1 once is mixed with new content."""
    l, rng = model.cfg.segment_len, np.random.default_rng(seed)
    docs = []
    while len(docs) < n_docs:
        doc = text.layout(task.story(rng), text.Filler(corpus, rng), int(rng.integers(prefix_segments * l)),
                          (max(after) + 2) * l, rng)
        twin = swapped(task, doc, rng)
        if twin is not None:
            docs += [doc, twin]
    needle_seg = np.array([(needle_end(d) - 1) // l for d in docs[::2]])
    length = (int(needle_seg.max()) + max(after) + 1) * l
    recorder = GateRecorder(model)
    rows = {k: [] for k in after}
    state, shut = None, None  # shut: (pairs, l, d), channels at exactly 1 in every segment after the needle's
    try:
        for a in range(0, length, l):
            ids = torch.from_numpy(text.batch(docs, a, a + l)[0]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                state = model(ids, state=state).state.float()
            gate = recorder.values.pop() if recorder.values else None
            recorder.values.clear()
            seg = a // l
            if gate is not None:
                shut = torch.ones_like(gate[::2], dtype=torch.bool) if shut is None else shut
                later = torch.from_numpy(needle_seg < seg).to(gate.device)
                shut &= (gate[::2] == 1) | ~later[:, None, None]
            for k in after:
                take = np.flatnonzero(needle_seg + k == seg)
                if not len(take):
                    continue
                s, s2 = state[2 * take], state[2 * take + 1]  # (n, l, d) with the needle and with its twin's
                rel = (s - s2).norm(dim=-1) / s.norm(dim=-1).clamp(min=1e-6)  # (n, l) per row
                g = None if gate is None else gate[2 * take]
                shares = (None,) * 4 if g is None else [x.float().mean(dim=(1, 2))
                                                        for x in (g, g > 0.99, g == 1, shut[take])]
                rows[k].append((rel.mean(dim=1), rel.max(dim=1).values, *shares))
    finally:
        recorder.remove()
    out = []
    for k in after:
        parts = list(zip(*rows[k]))
        mean = lambda i: None if parts[i][0] is None else round(float(torch.cat(parts[i]).mean()), 4)
        out.append({"after": k, "footprint_mean": mean(0), "footprint_max_row": mean(1), "gate_mean": mean(2),
                    "gate_above_0.99": mean(3), "gate_at_1": mean(4), "shut_since_needle": mean(5)})
    return out


def gradient(model: FoldedLM, task, corpus: text.Corpus, device, seed: int, distances: list[int],
             n_docs: int = 16) -> list[dict]:
    """For needles k segments before the question's segment (k in `distances`): the norm of the
    answer loss's gradient with respect to the state carried out of the needle's segment, and
    out of the segment just before the question's, with back-propagation through every segment
    (as the suite trains)."""
    l, rng = model.cfg.segment_len, np.random.default_rng(seed)
    model.eval()  # no dropout; gradients still flow
    out = []
    for k in distances:
        docs = [text.layout(task.story(rng), text.Filler(corpus, rng), int(rng.integers(l)), k * l, rng)
                for _ in range(n_docs)]
        end = max(d.end for d in docs)
        ids, targets = (torch.from_numpy(x) for x in text.batch(docs, 0, end))
        ids, targets = ids.to(device), targets.to(device)
        states, loss = [], 0.0
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            for o in segments(model, ids, l, targets, bptt=10**9):
                loss = loss + o.token_loss.sum()
                if o.state is not None and o.state.requires_grad:
                    o.state.retain_grad()
                states.append(o.state)
        loss.backward()
        model.zero_grad(set_to_none=True)
        needle = [(needle_end(d) - 1) // l for d in docs]
        question = [(d.piece("question")[0]) // l - 1 for d in docs]

        def norm(segs):
            return round(float(np.mean([states[s].grad[b].norm().item() if states[s].grad is not None else 0.0
                                        for b, s in enumerate(segs)])), 6)
        out.append({"segments": k, "grad_at_needle": norm(needle), "grad_before_question": norm(question)})
    return out
