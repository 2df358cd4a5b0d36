"""Line numbers of the keys of a TOML text (``tomllib`` gives none).

``key_lines(text)`` maps key paths to 1-based line numbers: ``("host", "cpus")``,
``("vm", "program", 1, "ops")`` for the second ``[[vm.program]]``, a table's
own path for its header line, and ``path + (i,)`` for element ``i`` of an
array value.  ``content_line(text, path)`` is the line where a multi-line
string value's content starts.  It is a scanner, not a parser: the text has
already been parsed by ``tomllib``, so it only needs to find things.
"""

from __future__ import annotations

import re

_BARE = re.compile(r"[A-Za-z0-9_-]+")


def _split_key(s: str) -> tuple:
    parts, i, n = [], 0, len(s)
    while i < n:
        c = s[i]
        if c in " \t.":
            i += 1
        elif c in "\"'":
            j = _quote_end(s, i)
            raw = s[i + 1:j - 1] if j - 1 > i else s[i + 1:j]
            parts.append(_unescape(raw) if c == '"' else raw)
            i = j
        else:
            m = _BARE.match(s, i)
            if not m:
                break
            parts.append(m.group())
            i = m.end()
    return tuple(parts)


def _quote_end(s: str, i: int) -> int:
    """The index just past the quoted string that opens at ``s[i]`` (basic strings
    honour backslash escapes); the end of the line if it is not closed."""
    q, j, n = s[i], i + 1, len(s)
    while j < n and s[j] != q and s[j] != "\n":
        j += 2 if q == '"' and s[j] == "\\" else 1
    return min(j + 1, n) if j < n and s[j] == q else min(j, n)


def _unescape(raw: str) -> str:
    try:
        return raw.encode("utf-8", "surrogatepass").decode("unicode_escape") \
            if "\\" in raw else raw
    except (UnicodeDecodeError, UnicodeEncodeError):
        return raw


def _key_end(s: str, i: int, stops: str) -> int:
    """The index of the first character of ``stops`` at or after ``i`` that is not inside
    a quoted key part (or of the line's end): keys may quote '=', ']' and '.'."""
    n = len(s)
    while i < n and s[i] != "\n" and s[i] not in stops:
        i = _quote_end(s, i) if s[i] in "\"'" else i + 1
    return i


class _Scan:
    def __init__(self, text: str):
        self.t = text
        self.pos = 0
        self.line = 1

    def peek(self, k=1):
        return self.t[self.pos:self.pos + k]

    def adv(self, k=1):
        chunk = self.t[self.pos:self.pos + k]
        self.line += chunk.count("\n")
        self.pos += k

    def skip_ws(self, newlines=False):
        while self.pos < len(self.t):
            c = self.t[self.pos]
            if c in " \t\r" or (newlines and c == "\n"):
                self.adv()
            elif c == "#":
                while self.pos < len(self.t) and self.t[self.pos] != "\n":
                    self.adv()
            else:
                break

    def string(self):
        q3 = self.peek(3)
        if q3 in ('"""', "'''"):
            self.adv(3)
            end = self.t.find(q3, self.pos)
            end = len(self.t) if end < 0 else end
            while end + 3 < len(self.t) + 1 and self.t[end + 3:end + 4] == q3[0]:
                end += 1
            self.adv(end + 3 - self.pos)
            return
        q = self.peek()
        self.adv()
        while self.pos < len(self.t) and self.t[self.pos] not in (q, "\n"):
            self.adv(2 if q == '"' and self.t[self.pos] == "\\" else 1)
        self.adv()

    def value(self, path, out):
        """Skip one value starting here, recording array elements' lines."""
        c = self.peek()
        if c in "\"'":
            self.string()
        elif c == "[":
            self.adv()
            i = 0
            while True:
                self.skip_ws(newlines=True)
                if self.pos >= len(self.t) or self.peek() == "]":
                    self.adv()
                    return
                if self.peek() == ",":
                    self.adv()
                    continue
                out.setdefault(path + (i,), self.line)
                self.value(path + (i,), out)
                i += 1
        elif c == "{":
            self.adv()
            while True:
                self.skip_ws()
                if self.pos >= len(self.t) or self.peek() in "}\n":
                    self.adv()
                    return
                if self.peek() == ",":
                    self.adv()
                    continue
                end = _key_end(self.t, self.pos, "=}")
                if end == self.pos:
                    self.adv()
                    continue
                key = path + _split_key(self.t[self.pos:end])
                out.setdefault(key, self.line)
                self.adv(end - self.pos)
                if self.peek() == "=":
                    self.adv()
                    self.skip_ws()
                    self.value(key, out)
        else:
            while self.pos < len(self.t) and self.t[self.pos] not in ",]}\n#":
                self.adv()


def key_lines(text: str) -> dict:
    out: dict = {}
    counts: dict = {}
    table: tuple = ()
    s = _Scan(text)
    while True:
        s.skip_ws(newlines=True)
        if s.pos >= len(s.t):
            return out
        if s.peek(2) == "[[":
            end = _key_end(s.t, s.pos + 2, "]")
            name = _split_key(s.t[s.pos + 2:end])
            idx = counts[name] = counts.get(name, -1) + 1
            table = name + (idx,)
            out.setdefault(table, s.line)
            out.setdefault(name, s.line)
            s.adv(min(end + 2, len(s.t)) - s.pos)
        elif s.peek() == "[":
            end = _key_end(s.t, s.pos + 1, "]")
            name = _split_key(s.t[s.pos + 1:end])
            # a [a.b] under an array of tables [[a]] belongs to its last element
            if name[:1] and name[:1] in counts:
                name = name[:1] + (counts[name[:1]],) + name[1:]
            table = name
            out.setdefault(table, s.line)
            s.adv(min(end + 1, len(s.t)) - s.pos)
        else:
            end = _key_end(s.t, s.pos, "=")
            if end >= len(s.t) or s.t[end] != "=":
                s.adv(max(1, end - s.pos))
                continue
            key = table + _split_key(s.t[s.pos:end])
            out.setdefault(key, s.line)
            s.adv(end + 1 - s.pos)
            s.skip_ws()
            s.value(key, out)


def content_line(text: str, line: int) -> int:
    """The line where the multi-line string that starts on ``line`` has its content."""
    src = text.splitlines()[line - 1] if 0 < line <= len(text.splitlines()) else ""
    for q in ('"""', "'''"):
        i = src.find(q)
        if i >= 0:
            return line + 1 if not src[i + 3:].strip() else line
    return line
