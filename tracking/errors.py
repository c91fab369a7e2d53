"""The one exception type the library raises for bad input or a run it cannot use.

The CLI turns it into a one-line message; callers catch it to skip a run and go on.
"""


class ActionScoresError(ValueError):
    """A problem with a run, a table or an argument, stated so that a user can fix it."""


def preview(values: object, limit: int = 10) -> str:
    """`[3, 7, 9] and 12 more`: ids in an error message without flooding the terminal."""
    items = list(values)  # type: ignore[call-overload]
    head = ", ".join(str(v) for v in items[:limit])
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return f"[{head}]{more}"
