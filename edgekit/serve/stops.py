"""Stop strings over streamed text: text is released only once it cannot be the start of a stop string,
so a client never sees part of one (a stop string may span several tokens)."""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The text that can be sent now; sets ``stopped`` when a stop string appeared (it is cut off)."""
        if self.stopped:
            return ""
        text = self._held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return text[: min(hits)]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """What is held back when generation ends without a stop string."""
        text, self._held = ("" if self.stopped else self._held), ""
        return text
