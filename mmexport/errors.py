"""Exceptions that the CLI's single error boundary turns into exit codes.

UserError: the user asked for something that cannot be done (bad recipe name, missing file, a prompt
longer than the context, a corrupt artifact); one line on stderr, exit 2.
VerificationFailed: the exported model does not answer like the original; exit 1.
"""


class UserError(Exception):
    exit_code = 2


class VerificationFailed(Exception):
    exit_code = 1


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt, so `finally` blocks remove temporary files."""

    exit_code = 143


# SIGTERM is raised as Terminated where it lands, except inside deferred_termination(): library code that may
# swallow it (torch's ONNX exporter retries another way after any failure, and has segfaulted when an exception
# came through its callbacks) finishes first, and Terminated is raised as it returns. A second SIGTERM in a
# deferred region raises at once. check_terminated() catches a SIGTERM that library code swallowed anyway.
_term = {"seen": 0, "deferred": 0}


def on_sigterm(signum, frame) -> None:
    _term["seen"] += 1
    if not _term["deferred"] or _term["seen"] > 1:
        raise Terminated()


def check_terminated() -> None:
    """Raise Terminated if SIGTERM arrived (and was deferred or swallowed) since the process started."""
    if _term["seen"]:
        raise Terminated()


class deferred_termination:
    """`with deferred_termination(): call_into_library()`: a SIGTERM inside takes effect when the block ends."""

    def __enter__(self) -> None:
        _term["deferred"] += 1

    def __exit__(self, *exc) -> None:
        _term["deferred"] -= 1
        if not _term["deferred"] and not (exc[0] is not None and issubclass(exc[0], Terminated)):
            check_terminated()


class PromptTooLong(UserError):
    """The prompt does not fit the build's context (the server answers OpenAI's context_length_exceeded)."""
