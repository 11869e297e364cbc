"""Per-token compute as colour, text and a sparkline: the pure pieces ``solm run --show`` and the eval report share.

A token's value is its realised compute relative to the dense budget (the cost model's bytes fraction at that
step's L and controls, 1.0 = dense). It is mapped onto viridis (perceptually uniform, readable with every common
colour-vision deficiency) between ``lo`` (the cheapest the policy could have made it) and ``hi`` = 1.

Records are dicts ``{"token": id, "text": str, "cost_fraction": float, ...}``; ``text`` is what the token added
to the decoded output: "" for a token that ends inside a UTF-8 character (its bytes are held and shown with the
token that completes the character), see :class:`IncrementalText`.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Sequence

# matplotlib's viridis sampled at 0, 1/8, ..., 1 (linear interpolation in between)
VIRIDIS = ((68, 1, 84), (71, 45, 123), (59, 82, 139), (44, 114, 142), (33, 145, 140), (40, 174, 128),
           (94, 201, 98), (173, 220, 48), (253, 231, 37))
BARS = "▁▂▃▄▅▆▇█"
RESET = "\x1b[0m"


# ---------------------------------------------------------------------------------------------- colour
def position(value: float, lo: float = 0.0, hi: float = 1.0) -> float:
    """``value`` on the scale [lo, hi] as 0..1 (clamped; a degenerate scale puts everything at the top)."""
    if hi <= lo:
        return 1.0
    return min(1.0, max(0.0, (float(value) - lo) / (hi - lo)))


def colour(value: float, lo: float = 0.0, hi: float = 1.0) -> tuple[int, int, int]:
    """The viridis colour of ``value`` on [lo, hi] as an (r, g, b) of 0..255."""
    x = position(value, lo, hi) * (len(VIRIDIS) - 1)
    i = min(int(x), len(VIRIDIS) - 2)
    f = x - i
    a, b = VIRIDIS[i], VIRIDIS[i + 1]
    return tuple(round(a[k] + (b[k] - a[k]) * f) for k in range(3))


def hex_colour(rgb: Sequence[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def foreground(rgb: Sequence[int]) -> tuple[int, int, int]:
    """Black or white, whichever contrasts more with the background ``rgb`` (WCAG relative luminance)."""
    def lin(c):
        c /= 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    lum = 0.2126 * lin(rgb[0]) + 0.7152 * lin(rgb[1]) + 0.0722 * lin(rgb[2])
    return (0, 0, 0) if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else (255, 255, 255)


def cube_index(rgb: Sequence[int]) -> int:
    """The nearest colour of xterm's 256-colour 6x6x6 cube (indices 16..231)."""
    steps = (0, 95, 135, 175, 215, 255)
    idx = [min(range(6), key=lambda j: abs(steps[j] - c)) for c in rgb]
    return 16 + 36 * idx[0] + 6 * idx[1] + idx[2]


def ansi(rgb: Sequence[int], truecolor: bool = True) -> str:
    """The escape that sets background ``rgb`` and a readable foreground."""
    fg = foreground(rgb)
    if truecolor:
        return "\x1b[48;2;{};{};{}m\x1b[38;2;{};{};{}m".format(*rgb, *fg)
    return f"\x1b[48;5;{cube_index(rgb)}m\x1b[38;5;{16 if fg == (0, 0, 0) else 231}m"


def use_colour(stream, env: dict | None = None) -> bool:
    """Colour only for a terminal, and never with ``NO_COLOR`` set (https://no-color.org) or ``TERM=dumb``."""
    env = os.environ if env is None else env
    if env.get("NO_COLOR") or env.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def truecolor(env: dict | None = None) -> bool:
    env = os.environ if env is None else env
    return env.get("COLORTERM", "").lower() in ("truecolor", "24bit")


# ---------------------------------------------------------------------------------------------- text
class IncrementalText:
    """Text as tokens arrive: ``push(id)`` returns what the token adds, "" while the bytes so far end inside
    a UTF-8 character (the tokenizer decodes those to U+FFFD); the token that completes it returns the whole
    character. Decodes the whole prefix each time (as ``SolmSession.generate`` does), so tokenizers that
    depend on the previous token (a sentencepiece space) come out right."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode, self.ids, self.shown = decode, [], ""

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return ""
        new, self.shown = text[len(self.shown):], text
        return new

    def flush(self) -> str:
        """Whatever is still held (a truncated character) at the end, as the tokenizer decodes it."""
        text = self.decode(self.ids)
        new = text[len(self.shown):] if text.startswith(self.shown) else ""
        self.shown = text
        return new


def token_texts(decode: Callable[[list[int]], str], ids: Iterable[int]) -> list[str]:
    """Per token, the text it adds ("" for a token held inside a UTF-8 character); the last keeps any rest."""
    inc = IncrementalText(decode)
    out = [inc.push(t) for t in ids]
    if out:
        out[-1] += inc.flush()
    return out


def groups(records: Sequence[dict]) -> list[tuple[str, float, list[dict]]]:
    """Display units: (text, mean cost, records) where tokens held inside a character join the one that
    completes it. A trailing held group (no text yet) is left out."""
    out, held = [], []
    for r in records:
        held.append(r)
        if r["text"]:
            out.append((r["text"], sum(h["cost_fraction"] for h in held) / len(held), held))
            held = []
    return out


# ---------------------------------------------------------------------------------------------- terminal
def paint(text: str, value: float, lo: float, hi: float, colour_on: bool, true: bool = True) -> str:
    """``text`` on its colour (line breaks left outside the colour, so no background runs to the margin)."""
    if not colour_on:
        return text
    code = ansi(colour(value, lo, hi), true)
    return "\n".join(code + part + RESET if part else "" for part in text.split("\n"))


def legend(lo: float, hi: float = 1.0, colour_on: bool = True, true: bool = True, n: int = 5) -> str:
    """One line: what the colours mean (plain text says how to get them)."""
    if not colour_on:
        return f"compute per token as a fraction of the dense budget's bytes, {lo:.2f} to {hi:.2f}"
    marks = " ".join(paint(f" {lo + (hi - lo) * i / (n - 1):.2f} ", lo + (hi - lo) * i / (n - 1), lo, hi, True, true)
                     for i in range(n))
    return f"compute per token (fraction of dense bytes): {marks}"


def render(records: Sequence[dict], lo: float, hi: float = 1.0, colour_on: bool = True, true: bool = True) -> str:
    """The text of ``records``, each display unit on its colour (or plain)."""
    return "".join(paint(text, value, lo, hi, colour_on, true) for text, value, _ in groups(records))


def sparkline(values: Sequence[float], lo: float = 0.0, hi: float = 1.0) -> str:
    """One bar per value: the nearest of eight equally spaced levels, ▁ at ``lo`` (or below) to █ at ``hi``."""
    return "".join(BARS[round(position(v, lo, hi) * (len(BARS) - 1))] for v in values)


def summary(records: Sequence[dict], lo: float, hi: float = 1.0) -> str:
    vals = [r["cost_fraction"] for r in records]
    if not vals:
        return "no generated tokens"
    return f"{sparkline(vals, lo, hi)}  mean {sum(vals) / len(vals):.3f} of dense bytes over {len(vals)} tokens"
