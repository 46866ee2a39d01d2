"""The blocklist of the clean stage compiled into one regex (words whole or as substrings, user patterns)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from cptflow.core.config import ConfigError


def compile_blocklist(words: Sequence[str], patterns: Sequence[str], where: str = "clean") -> re.Pattern[str] | None:
    """One case-insensitive regex for all entries. A word made of ASCII letters/digits at its ends
    matches whole words only (``sex`` must not hit ``Sussex``); other words (Chinese) match as
    substrings, since Chinese has no word boundaries. Patterns are Python regexes, used as given."""
    alts: list[str] = []
    for w in words:
        w = w.strip()
        if not w:
            continue
        left = r"\b" if re.match(r"[A-Za-z0-9_]", w) else ""
        right = r"\b" if re.search(r"[A-Za-z0-9_]$", w) else ""
        alts.append(f"{left}{re.escape(w)}{right}")
    for i, p in enumerate(patterns):
        try:
            re.compile(p)
        except re.error as e:
            raise ConfigError(f"{where}: blocklist pattern {i} {p!r} is not a valid regex: {e}") from e
        alts.append(f"(?:{p})")
    if not alts:
        return None
    try:
        return re.compile("|".join(alts), re.IGNORECASE)
    except re.error as e:  # e.g. a global flag such as (?i) inside one pattern
        raise ConfigError(f"{where}: blocklist patterns cannot be combined ({e}); use scoped flags (?x:...)") from e
