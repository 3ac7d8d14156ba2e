"""Passkey at any depth (the passkey of RMT, Landmark Attention and Infini-attention): one
5-digit key stated in real text, asked for at the end.

    The pass key is 40817. Remember it. 40817 is the pass key.
    ...
    What is the pass key? The pass key is 40817

Scored on the five digits; a uniform guess is right with probability 1e-5.
"""
from experiments.longctx.text import Story, encode

NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is "


class Passkey:
    name = "passkey"
    chance = 1e-5

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def story(self, rng) -> Story:
        """The key is five uniform digits (a leading 0 included); nothing else in the story."""
        key = "".join(str(d) for d in rng.integers(0, 10, 5))
        return Story(before=[], needle=encode(self.tokenizer, NEEDLE.format(key=key)), after=[],
                     question=encode(self.tokenizer, QUESTION), answer=encode(self.tokenizer, key))
