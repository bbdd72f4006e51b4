"""One way to check settings: `check_settings(SomeConfigError, [(holds, message), ...])` raises
the first failed check's message as that error. Each config's validator lists its checks (the
message names the key, its value and what is expected: "rl.steps=0: expected >= 1") and calls
this; every layer above models/ already imports models/, so this is where they all find it.
"""
from __future__ import annotations

from collections.abc import Iterable


def check_settings(error: type[Exception], checks: Iterable[tuple[bool, str]]) -> None:
    """Raise `error(message)` for the first check that does not hold. Checks whose conditions
    would fail on a bad earlier value (a division by a count, say) belong in a later call."""
    for holds, message in checks:
        if not holds:
            raise error(message)
