"""What a request's tokens become on the wire: incremental detokenization and stop strings.

`Detokenizer` keeps the text of a request's tokens as they arrive, decoding only a short window
per token (the tokens since the last complete text, plus the chunk before them as context, so
decoders that strip a leading space or merge bytes see what a whole decode would). Decoding
the whole completion at every token costs O(n) per token, O(n^2) per request.

Text is streamed safely: a delta never ends inside a multi-byte character (the window's decode
ends in U+FFFD until the rest arrives) or with what may be the start of a stop string
(`sendable_end`), and the stop string itself is never sent (`find_stop`).
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what a decode shows for the bytes of an unfinished character


class Detokenizer:
    """The text of `ids` so far (complete characters only) for tokenizer `tok`."""

    def __init__(self, tok):
        self.tok = tok
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # ids[_prefix:_read]: the context decoded again with the new tokens
        self._read = 0  # ids[:_read] are in `text`

    def add(self, token: int) -> str:
        """Append `token`; returns the text it completes ("" while a character or a token
        that decodes to nothing is pending)."""
        self.ids.append(token)
        context = self.tok.decode(self.ids[self._prefix:self._read])
        window = self.tok.decode(self.ids[self._prefix:])
        if len(window) <= len(context) or window.endswith(REPLACEMENT):
            return ""
        delta = window[len(context):]
        self.text += delta
        self._prefix, self._read = self._read, len(self.ids)
        return delta

    def full_text(self, upto: int | None = None) -> str:
        """The whole decode of the first `upto` ids (default all), pending bytes included: what
        a finished request reports."""
        return self.tok.decode(self.ids[:upto])


def find_stop(text: str, stops: tuple[str, ...], sent: int) -> int:
    """Where the first stop string in `text` begins (-1: none), searching only where a stop
    could end beyond the `sent` characters already checked."""
    found = [at for stop in stops if (at := text.find(stop, max(0, sent - len(stop)))) >= 0]
    return min(found, default=-1)


def sendable_end(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` can be sent: not a trailing partial character (U+FFFD), nor a tail
    that may grow into a stop string."""
    end = len(text)
    while end and text[end - 1] == REPLACEMENT:
        end -= 1
    for stop in stops:
        for n in range(min(len(stop) - 1, end), 0, -1):
            if text[end - n:end] == stop[:n]:
                end -= n
                break
    return end
