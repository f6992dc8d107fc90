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


# SIGTERM (Terminated) and SIGINT (KeyboardInterrupt) are raised where they land, except inside
# deferred_termination(): library code that may swallow them (torch's ONNX exporter retries another way after
# any failure, and has segfaulted when an exception came through its callbacks) finishes first, and the
# exception is raised as it returns. A second signal in a deferred region raises at once. check_terminated()
# catches a signal that library code swallowed anyway.
_term: dict = {"signals": [], "deferred": 0}


def _stop_exception(signum: int) -> BaseException:
    import signal

    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated()


def on_stop_signal(signum, frame) -> None:
    """The CLI's handler of SIGTERM and SIGINT."""
    _term["signals"].append(signum)
    if not _term["deferred"] or len(_term["signals"]) > 1:
        raise _stop_exception(signum)


def check_terminated() -> None:
    """Raise what the first SIGTERM / SIGINT of this process would have raised, if one arrived (and was deferred
    or swallowed)."""
    if _term["signals"]:
        raise _stop_exception(_term["signals"][0])


class deferred_termination:
    """`with deferred_termination(): call_into_library()`: a SIGTERM / SIGINT inside takes effect when the block ends."""

    def __enter__(self) -> None:
        _term["deferred"] += 1

    def __exit__(self, *exc) -> None:
        _term["deferred"] -= 1
        if not _term["deferred"] and not (exc[0] is not None and issubclass(exc[0], (Terminated, KeyboardInterrupt))):
            check_terminated()


class PromptTooLong(UserError):
    """The prompt does not fit the build's context (the server answers OpenAI's context_length_exceeded)."""
