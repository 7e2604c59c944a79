"""The two kinds of failure the CLI distinguishes.

UserError: bad input (recipe, source, option) — one line naming the file/tensor/rule and the fix; exit code 2.
VerifyFailed is not an exception: verify returns a report; its findings give exit code 1.
"""
from __future__ import annotations

import os

NAME_MAX, PATH_MAX = 255, 4096  # Linux's limits, in bytes: no file can be at a longer name or path


class UserError(Exception):
    """A problem with what the user gave us. The message is one line and says how to fix it."""

    exit_code = 2


def path_too_long(path) -> str | None:
    """Why nothing can be at `path` (a name over NAME_MAX bytes, or PATH_MAX in all), else None: pathlib's exists()
    and is_dir() raise on such a path instead of answering, and each command's first look at one crashed."""
    raw = os.fsencode(path)
    longest = max(len(part) for part in raw.split(b"/"))
    if longest > NAME_MAX or len(raw) >= PATH_MAX:
        return (f"longer than the file system allows ({len(raw)} bytes, a name of {longest}; at most {NAME_MAX} a "
                f"name and {PATH_MAX - 1} in all)")
    return None


def file_failed(e: OSError, outcome: str = "") -> UserError:
    """A file the command was using that the file system then refused — moved, replaced or removed while the
    command ran (a user rebuilding or cleaning up beside it), or a failing disk. Every earlier look at it had passed,
    so it is named as a file that changed underfoot, not as bad input or a bug. `outcome`: what the command left
    (e.g. "nothing was written — ")."""
    return UserError(f"{e.filename}: {e.strerror or e} — moved, replaced or removed while mpconvert was using it, "
                     f"or the disk failed; {outcome}run again once it is stable")


def and_more(items: list) -> str:
    """What follows the first of several problems in a one-line message: " (and N more)", or nothing for one."""
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""
