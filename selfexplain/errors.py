"""The package's error types; a leaf module that imports nothing from the package."""


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit code 2."""


def some(names, n: int = 3) -> str:
    """The first ``n`` of ``names`` for a message: 'a, b, c, ...'."""
    names = [str(x) for x in names]
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def one_line(text, limit: int = 300) -> str:
    """``text`` on one line for an error message, cut at a word (not mid-word, as '...please unse)')
    when over ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."
