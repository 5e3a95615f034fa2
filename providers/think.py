"""`<think>…</think>` in generated text: the tags, and the streaming splitter for upstreams
that put a reasoning model's thinking inside `content` (DeepSeek-R1 style). The local
provider's output parser (providers/local/prompt.py) scans for the same tags together with
stop strings and tool-call blocks, and shares the partial-tag rule below."""
from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def partial_suffix(text: str, markers) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some marker: what
    a streaming parser must hold back until the next piece shows whether a tag begins."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best


class ThinkSplitter:
    """DeepSeek-R1 style `<think>…</think>` at the start of `content` becomes thinking.
    Tags may be split across chunks, so a possible partial tag is held back. Only a tag
    at the very start opens thinking: an answer that merely mentions <think> is left as is."""
    OPEN, CLOSE = THINK_OPEN, THINK_CLOSE

    def __init__(self):
        self.state = "start"             # start | think | after | text
        self.buf = ""

    def feed(self, text: str):
        """(content, thinking) to emit now."""
        self.buf += text
        content, thinking = "", ""
        while self.buf:
            if self.state == "start":
                s = self.buf.lstrip()
                if s.startswith(self.OPEN):
                    self.buf, self.state = s[len(self.OPEN):], "think"
                    continue
                if self.OPEN.startswith(s):          # maybe a tag still arriving
                    break
                self.state = "text"
            elif self.state == "think":
                end = self.buf.find(self.CLOSE)
                if end >= 0:
                    thinking += self.buf[:end]
                    self.buf, self.state = self.buf[end + len(self.CLOSE):], "after"
                    continue
                keep = partial_suffix(self.buf, (self.CLOSE,))
                thinking += self.buf[:len(self.buf) - keep]
                self.buf = self.buf[len(self.buf) - keep:]
                break
            elif self.state == "after":
                # The blank lines R1 puts between </think> and the answer are not content.
                self.buf = self.buf.lstrip()
                if self.buf:
                    self.state = "text"
            else:
                content += self.buf
                self.buf = ""
        return content, thinking

    def flush(self):
        rest, self.buf = self.buf, ""
        if self.state == "think":
            return "", rest
        return ("" if self.state == "after" else rest), ""
