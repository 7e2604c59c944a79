"""The two kinds of failure the CLI distinguishes.

UserError: bad input (recipe, source, option) — one line naming the file/tensor/rule and the fix; exit code 2.
VerifyFailed is not an exception: verify returns a report; its findings give exit code 1.
"""


class UserError(Exception):
    """A problem with what the user gave us. The message is one line and says how to fix it."""

    exit_code = 2


def and_more(items: list) -> str:
    """What follows the first of several problems in a one-line message: " (and N more)", or nothing for one."""
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""
