"""Multi-key retrieval (RULER's niah_multikey): k needles "One of the special magic numbers for
NAME is: VALUE." with distinct names and 7-digit values, at random depths; one name is asked.

    One of the special magic numbers for walnut is: 3950217.
    ...
    One of the special magic numbers for harbor is: 8114096.
    ...
    What is the special magic number for walnut? The special magic number for walnut is: 3950217

At least one distractor lies between the asked needle and the question, so "the most recent
number" is wrong; the others fall before or after it at random, so "the first number" is wrong
too. Scored on the seven digits: a uniform guess is right with probability 1e-7, a guess among
the k numbers the document states with probability 1/k.
"""
from experiments.longctx.text import Story, encode

NAMES = ["walnut", "harbor", "violet", "copper", "falcon", "meadow", "lantern", "pepper", "glacier",
         "saddle", "orchid", "anchor", "timber", "marble", "comet", "thistle", "canyon", "ember",
         "willow", "quartz", "badger", "cobalt", "juniper", "sparrow", "tundra", "velvet", "hazel",
         "mosaic", "pigeon", "summit", "basil", "ferret"]
NEEDLE = "\nOne of the special magic numbers for {name} is: {value}.\n"
QUESTION = "\nWhat is the special magic number for {name}? The special magic number for {name} is: "


class MultiKey:
    name = "multikey"
    chance = 1e-7

    def __init__(self, tokenizer, keys: int = 4, mix: bool = False):
        if not 2 <= keys <= len(NAMES):
            raise ValueError(f"multikey needs 2..{len(NAMES)} keys, got {keys}")
        self.tokenizer, self.keys, self.mix = tokenizer, keys, mix

    def story(self, rng) -> Story:
        """k = `keys` distinct names with distinct 7-digit values; the first is asked. Of the k - 1
        distractors, 1 to k - 1 (uniform) come after the asked needle, the rest before it.
        With `mix` (for training), k is uniform in 1..keys: a one-needle story teaches copying
        the value, which a model shown only k >= 2 needles may never start to learn (its answer
        loss stays at ln 10, a uniform digit)."""
        k = int(rng.integers(1, self.keys + 1)) if self.mix else self.keys
        names = [NAMES[i] for i in rng.choice(len(NAMES), k, replace=False)]
        values = []
        while len(values) < k:
            value = str(int(rng.integers(10**6, 10**7)))
            values += [value] if value not in values else []
        needles = [encode(self.tokenizer, NEEDLE.format(name=n, value=v)) for n, v in zip(names, values)]
        after = int(rng.integers(1, k)) if k > 1 else 0
        distractors = [("distractor", t) for t in needles[1:]]
        return Story(before=distractors[after:], needle=needles[0], after=distractors[:after],
                     question=encode(self.tokenizer, QUESTION.format(name=names[0])),
                     answer=encode(self.tokenizer, values[0]))
