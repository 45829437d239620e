"""Ctrl-C held back while a lock section changes the scheduler's state, and this process's ids.

Python runs signal handlers on the main thread, between any two bytecodes: a ``KeyboardInterrupt``
raised halfway through a change of the scheduler's state would leave it broken. The drivers
bracket every lock section with :class:`deferred_interrupts`, and a lone call with
:class:`interrupts_kept`. The process id and the main thread are kept here, up to date across
forks (``os.getpid`` is a system call: several microseconds on some virtual machines).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import signal
import threading
from typing import Any

__all__ = ["current_pid", "deferred_interrupts", "interrupts_kept"]

# The C functions ``signal`` wraps: the wrappers' enum conversions cost about 15 µs per handler
# swap (measured with benchmarks/overhead.py); a lone call swaps twice, a queued one twice per section.
_raw_signal: Any = importlib.import_module("_signal") if importlib.util.find_spec("_signal") else signal
_SIGINT = int(signal.SIGINT)
_main_ident = threading.main_thread().ident
"""The thread Python runs signal handlers on (after a fork: the thread that forked)."""


def _forked() -> None:
    global _main_ident, _pid  # noqa: PLW0603 (one value per process)
    _main_ident = threading.main_thread().ident
    _pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


_pid = os.getpid()


def current_pid() -> int:
    """This process's id, kept up to date across forks (``os.getpid`` is a system call)."""
    return _pid


_held_sigint: list[tuple[int, Any]] = []
"""SIGINTs that arrived while the main thread held them back."""


class _Sigint:
    """The main thread's SIGINT state while mosel's handler is installed.

    ``previous``: the handler it replaced (None: not installed); ``holding``: lock sections
    open now. With none open, a SIGINT goes to ``previous`` at once (see :class:`interrupts_kept`).
    """

    previous: Any = None
    holding = 0


def _hold_sigint(signum: int, frame: Any) -> None:
    if _Sigint.holding:
        _held_sigint.append((signum, frame))
    else:
        _forward(_Sigint.previous, (signum, frame))


def _forward(previous: Any, held: tuple[int, Any]) -> None:
    """Hand a SIGINT to the handler mosel's replaced, as Python would have (ignored: nothing)."""
    if callable(previous):
        previous(*held)
    elif previous == signal.SIG_DFL:
        signal.default_int_handler(*held)


def _install_hold() -> Any:
    """Put mosel's SIGINT handler in place on the main thread; the one it replaced, or None if not."""
    if threading.get_ident() != _main_ident:
        return None
    try:
        previous = _raw_signal.getsignal(_SIGINT)
        if previous is None or previous is _hold_sigint:  # set from C (cannot be put back), or in place
            return None
        _raw_signal.signal(_SIGINT, _hold_sigint)
    except (ValueError, TypeError):  # not the main interpreter, or an unusual handler
        return None
    _Sigint.previous = previous
    return previous


def _remove_hold(previous: Any) -> None:
    """Put ``previous`` back (unless the model's code replaced mosel's), then hand it what was held."""
    _Sigint.previous = None
    if _raw_signal.getsignal(_SIGINT) is _hold_sigint:
        _raw_signal.signal(_SIGINT, previous)
    _release(previous)


def _release(previous: Any) -> None:
    """Hand the SIGINT held back, if any, to ``previous`` (at most one: Python raises one)."""
    if _held_sigint:
        held = _held_sigint[0]
        _held_sigint.clear()
        _forward(previous, held)


class deferred_interrupts:
    """On the main thread, hold Ctrl-C (``SIGINT``) back until the block is done.

    Scheduler state changes under the lock are short and must not be cut in half: an interrupt
    arriving meanwhile is raised (or handed to the previous handler) right after the block.
    Elsewhere (other threads, no signals) this does nothing. Inside :class:`interrupts_kept`
    or another section, the handler is already in place: the section only counts itself. A
    class rather than a generator: it brackets every lock section of every call.
    """

    __slots__ = ("_counted", "_previous")

    def __enter__(self) -> None:
        self._previous: Any = None
        self._counted = False
        if threading.get_ident() != _main_ident:
            return
        if _Sigint.previous is None:
            self._previous = _install_hold()
            if self._previous is None:
                return
        _Sigint.holding += 1
        self._counted = True

    def __exit__(self, *exc: object) -> None:
        if not self._counted:
            return
        _Sigint.holding -= 1
        if self._previous is not None:
            _remove_hold(self._previous)
        elif not _Sigint.holding:  # the outer bracket forwards from now on
            _release(_Sigint.previous)


class interrupts_kept:
    """Keep mosel's SIGINT handler in place across a call's lock sections (main thread only).

    Between sections it hands every SIGINT to the handler it replaced at once, so the model's
    code is interrupted as without it; the call swaps handlers twice instead of twice per
    section (each swap is a system call).
    """

    __slots__ = ("_previous",)

    def __enter__(self) -> None:
        self._previous = _install_hold() if _Sigint.previous is None else None

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            _remove_hold(self._previous)
