"""The text of one generated sequence as its tokens arrive (sample, chat, serve): whole
characters only, cut exactly before the first stop string, and never sending text that a stop
string may yet start with."""

from __future__ import annotations

import codecs


class ChoiceText:
    """Tokens in, text out (the part that is sure), until a stop string ends it."""

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")  # never half a character
        self.text = ""  # everything decoded so far (up to a stop)
        self.sent = 0  # characters of text handed out
        self.stopped = False

    def add(self, token: int) -> str:
        """The new text that token makes sure of ("" while a stop string may be starting)."""
        return self._take(self.decoder.decode(self.tokenizer.decode_bytes([token])))

    def flush(self) -> str:
        """What is left at the end: the rest of a held-back stop prefix, a broken character."""
        if self.stopped:
            return ""
        self.text += self.decoder.decode(b"", final=True)
        return self._out(len(self.text))

    def _take(self, piece: str) -> str:
        if self.stopped:
            return ""
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        self.text += piece
        cut = min((at for s in self.stops if (at := self.text.find(s, start)) >= 0), default=-1)
        if cut >= 0:  # a stop string: the text ends before it
            self.text, self.stopped = self.text[:cut], True
            return self._out(cut)
        return self._out(len(self.text) - self._held())

    def _held(self) -> int:
        """Characters at the end that begin some stop string: not sent yet."""
        most = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), most, -1):
                if self.text.endswith(s[:n]):
                    most = n
                    break
        return most

    def _out(self, upto: int) -> str:
        upto = max(upto, self.sent)
        piece, self.sent = self.text[self.sent : upto], upto
        return piece
