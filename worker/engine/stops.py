"""Stop strings: noticing one while a row generates, and cutting the final text before it.

This module knows nothing about models or batches; it sees token ids and a decode function.
"""

from __future__ import annotations

from typing import Callable

TAIL_SLACK_TOKENS = 8
"""Extra tokens decoded beyond the longest stop string. Every token that decodes to text gives at least one
character, so a stop string completed by the newest token lies inside ``len(stop)`` tokens; the slack covers
tokens that decode to nothing (skipped special tokens) and byte pieces of one character."""


class StopStrings:
    """``matched(tokens)``: does the text of the newest tokens contain a stop string?

    Only a tail is decoded, so the check costs the same at token 10 and at token 4000; it runs after every
    token, so a stop string is seen at the step that completes it.
    """

    def __init__(self, stops: tuple[str, ...], decode: Callable[[list[int]], str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.decode = decode
        self.window = max((len(s) for s in self.stops), default=0) + TAIL_SLACK_TOKENS

    def __bool__(self) -> bool:
        return bool(self.stops)

    def matched(self, tokens: list[int]) -> bool:
        tail = self.decode(tokens[-self.window :])
        return any(s in tail for s in self.stops)


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """The text before the earliest stop string, and whether one was found."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    if not found:
        return text, False
    return text[: min(found)], True
