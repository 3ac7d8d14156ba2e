"""bAbI-style reasoning in real text (BABILong's construction, generated here): facts about a
small cast, written with bAbI's templates, scattered through filler text, then a question.

    qa1, one supporting fact:   ... Mary went to the hallway. ... Mary travelled to the garden.
                                ... John moved to the office. ...
                                Question: Where is Mary? Answer: garden
    qa2, two supporting facts:  ... Daniel grabbed the apple. ... Daniel went to the kitchen.
                                ... Sandra picked up the milk. ...
                                Question: Where is the apple? Answer: kitchen

Every story is consistent (a person takes only what nobody holds and drops only what they
hold). The answer is a place, uniform over the six, so a guess is right with probability 1/6;
facts that come after the needle never involve the asked person or object, and their places
are drawn independently of the answer, so reading only the facts near the question gives no
better than a guess.
"""
from experiments.longctx.text import Story, encode

PEOPLE = ["Mary", "John", "Sandra", "Daniel"]
PLACES = ["bathroom", "bedroom", "garden", "hallway", "kitchen", "office"]
THINGS = ["apple", "football", "milk"]
MOVE = ["{who} went to the {place}.", "{who} journeyed to the {place}.", "{who} travelled to the {place}.",
        "{who} moved to the {place}.", "{who} went back to the {place}."]
TAKE = ["{who} picked up the {thing}.", "{who} got the {thing}.", "{who} grabbed the {thing}.",
        "{who} took the {thing}."]
DROP = ["{who} dropped the {thing}.", "{who} put down the {thing}.", "{who} discarded the {thing}.",
        "{who} left the {thing}."]
QUESTION = "\nQuestion: Where is {what}? Answer:"


def pick(rng, items):
    return items[int(rng.integers(len(items)))]


class Facts:
    """Renders facts as tokenized lines, and tells random consistent ones."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def line(self, rng, templates, **kw):
        return encode(self.tokenizer, "\n" + pick(rng, templates).format(**kw) + "\n")

    def move(self, rng, who, place):
        return self.line(rng, MOVE, who=who, place=place)

    def random(self, rng, n, people, things, held, barred=None):
        """n distractor facts: moves of `people` (to places other than `barred[who]`), takes of
        free `things` and drops by their holders; `held` (thing -> person) is updated."""
        barred = barred or {}
        out = []
        for _ in range(n):
            who = pick(rng, people)
            kind = pick(rng, ["move", "move", "take", "drop"])
            free = [t for t in things if t not in held]
            mine = [t for t in things if held.get(t) == who]
            if kind == "take" and free:
                thing = pick(rng, free)
                held[thing] = who
                out.append(("distractor", self.line(rng, TAKE, who=who, thing=thing)))
            elif kind == "drop" and mine:
                thing = pick(rng, mine)
                del held[thing]
                out.append(("distractor", self.line(rng, DROP, who=who, thing=thing)))
            else:
                place = pick(rng, [p for p in PLACES if p != barred.get(who)])
                out.append(("distractor", self.move(rng, who, place)))
        return out


class QA1:
    """Where is PERSON? The needle is the person's last move; before it, 1-3 facts about anyone,
    one of them a move of that person elsewhere (so the first move seen is wrong); after it,
    1-3 moves of the others."""
    name = "qa1"
    chance = 1 / len(PLACES)

    def __init__(self, tokenizer):
        self.tokenizer, self.facts = tokenizer, Facts(tokenizer)

    def story(self, rng) -> Story:
        cast = [PEOPLE[i] for i in rng.permutation(len(PEOPLE))]
        who, place = cast[0], pick(rng, PLACES)
        stale = ("distractor", self.facts.move(rng, who, pick(rng, [p for p in PLACES if p != place])))
        before = self.facts.random(rng, int(rng.integers(0, 3)), PEOPLE, [], {}, barred={who: place})
        before.insert(int(rng.integers(len(before) + 1)), stale)
        after = self.facts.random(rng, int(rng.integers(1, 4)), cast[1:], [], {})
        return Story(before=before, needle=self.facts.move(rng, who, place), after=after,
                     question=encode(self.tokenizer, QUESTION.format(what=who)),
                     answer=encode(self.tokenizer, " " + place))


class QA2:
    """Where is the THING? Its holder took it and went to a place, in either order (two
    supporting facts, the later one the needle); before them 1-3 facts about anyone and the
    other things; after them 1-3 facts about the others and the other things, one of them a
    move, so the last place named is the answer only by chance."""
    name = "qa2"
    chance = 1 / len(PLACES)

    def __init__(self, tokenizer):
        self.tokenizer, self.facts = tokenizer, Facts(tokenizer)

    def story(self, rng) -> Story:
        cast = [PEOPLE[i] for i in rng.permutation(len(PEOPLE))]
        who, thing, place = cast[0], pick(rng, THINGS), pick(rng, PLACES)
        others = [t for t in THINGS if t != thing]
        held = {}  # the story goes on from the facts before to those after
        before = self.facts.random(rng, int(rng.integers(1, 4)), PEOPLE, others, held)
        after = self.facts.random(rng, int(rng.integers(0, 3)), cast[1:], others, held)
        move = ("distractor", self.facts.move(rng, pick(rng, cast[1:]), pick(rng, PLACES)))
        after.insert(int(rng.integers(len(after) + 1)), move)  # "the last place named" is no answer
        take = self.facts.line(rng, TAKE, who=who, thing=thing)
        go = self.facts.move(rng, who, place)
        first, needle = (take, go) if rng.integers(2) else (go, take)
        return Story(before=before + [("support", first)], needle=needle, after=after,
                     question=encode(self.tokenizer, QUESTION.format(what="the " + thing)),
                     answer=encode(self.tokenizer, " " + place))
