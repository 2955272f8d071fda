"""The one exception type for bad input: the CLI prints its message on one line and exits 2."""


class InputError(ValueError):
    """Bad input from the user (a file, a flag, a model directory).

    The message is a single line that names the problem and, where there is one, the fix.
    Library code raises it; only the CLI turns it into an exit code.
    """


class InputWarning(UserWarning):
    """Input that is accepted but probably not what was meant; issued with `warnings.warn`.

    Library code never prints: the CLI shows each one as a single `warning:` line on stderr.
    """


def first_line(err: BaseException) -> str:
    """A foreign exception's message reduced to its first line (its type name when it has none), for an InputError."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
