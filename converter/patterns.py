"""`re:REGEX` patterns, as recipes (rules' match) and compressed-tensors configs (targets, ignore) write them."""
from __future__ import annotations

import re


def check_re_patterns(patterns: list[str]) -> list[str]:
    """Raise ValueError naming the first `re:` pattern that does not compile; return the patterns."""
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise ValueError(f"bad regex {p!r}: {e}") from None
    return patterns
