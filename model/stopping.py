"""One stop for every command: what SIGTERM and SIGINT do, wherever they land.

Both faces call :func:`install` at process start. The first SIGTERM or SIGINT then:

* anywhere else: raises :class:`Stopped` where the program is, so that ``finally`` blocks
  remove temporaries on the way out; the face prints one line and exits 128 + the signal;
* inside a critical region (:func:`critical`: renaming an output into place, writing a marker,
  a state save, moving a previous run aside): is recorded, and raised when the outermost region
  ends, so that no rename or marker is ever cut in half;
* while polled (:func:`polling`: a training run): is only recorded. The run looks at
  :func:`requested` at every step, every validation batch and every generated token, saves at
  the last completed step and raises :class:`Stopped` itself.

A process is stopped once: copies of the signal (a terminal signals its whole process group,
a launcher forwards the signal to every rank and sends SIGTERM again when a rank exits) are
ignored. A person pressing Ctrl-C again more than ``REPEAT_S`` later aborts at once (exit 130).

Stopped derives from BaseException so that no ``except Exception`` swallows it; on SIGINT it
is also a KeyboardInterrupt, so code that lets Ctrl-C end one answer of a chat still can (it
calls :func:`clear` to go on). This module imports nothing heavy: prepare_data uses it too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from typing import Iterator

REPEAT_S = 2.0
SIGNALS = (signal.SIGINT, signal.SIGTERM)
IN_TRAINING = 'finishing the step or evaluation batch in progress, then saving and stopping'  # what a polled stop does


class Stopped(BaseException):
    """A stop by signal. ``kept`` says what the command kept (e.g. the state it saved); ``said``
    what stopped it, where that is more than the signal's name (:meth:`StopSignals.said`)."""

    def __init__(self, signum: int, kept: str = '', said: str = ''):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.kept, self.said = int(signum), kept, said or signal.Signals(signum).name

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Interrupted(Stopped, KeyboardInterrupt):
    """A stop by SIGINT (Ctrl-C)."""


def shared_signal(signals: float, stopped: float) -> int:
    """The signal the stopped ranks got, from a vote's sums (their signal numbers, how many): one of
    SIGNALS when all got the same (the mean of two different ones lies between them, none of them),
    else 0 (not known)."""
    mean = signals / stopped if stopped else 0
    return int(mean) if mean in SIGNALS else 0


def stop_error(signum: int, kept: str = '', said: str = '') -> Stopped:
    return (Interrupted if signum == signal.SIGINT else Stopped)(signum, kept, said)


class StopSignals:
    """The process's stop state (one instance: :data:`STOP`)."""

    def __init__(self):
        self.signum = 0  # the stop's signal; 0 while none came
        # where the stop came from, when not a signal sent to this process: 'launcher' (the SIGTERM the kernel
        # sends a rank whose launcher died, stop_with_launcher), 'rank' (another rank's stop, followed)
        self.source = ''
        self.peer_signum = 0  # 'rank': the signal the ranks said they got (0: not known)
        self.since = 0.0  # time.monotonic() of the first signal
        self.raised = False  # a Stopped is on its way out: nothing raises another one
        self._critical = 0
        self._polling = 0
        self.polled_says = IN_TRAINING  # what the polling region does with a stop (said at the signal)
        self.finished = False  # the command's work is done (a run's final model written): a stop changes nothing
        self._pid = 0  # the process that installed the handlers (not a forked worker)
        self._previous: dict[int, object] = {}

    # --- set-up ---

    def install(self) -> None:
        """Take SIGINT and SIGTERM for this process (idempotent)."""
        self._pid = os.getpid()
        for s in SIGNALS:
            # also when inherited as ignored: a script's `cmd &` ignores SIGINT, and a launcher
            # started so forwards Ctrl-C to its ranks as SIGINT all the same
            previous = signal.signal(s, self._handle)
            self._previous.setdefault(s, previous)

    def uninstall(self) -> None:
        """Give the handlers back and forget any stop (tests run commands in-process)."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        self.__init__()

    def clear(self) -> None:
        """A stop was handled and the program goes on (Ctrl-C ended one chat answer)."""
        self.signum, self.since, self.raised = 0, 0.0, False
        if self._pid == os.getpid():
            signal.signal(signal.SIGTERM, self._handle)

    # --- the handler ---

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker: its parent stops it
        if self.signum:
            if signum == signal.SIGINT and time.monotonic() - self.since > REPEAT_S:
                os.write(2, b'second Ctrl-C: aborting now (the last complete state is kept)\n')
                os._exit(130)
            return  # a copy of the signal that is being handled
        self._record(signum, 'launcher' if signum == signal.SIGTERM and launcher_gone() else '')
        if self.finished:
            os.write(2, f'{self.said()} after the work was done: nothing to stop, exiting as done\n'.encode())
            return
        if self._polling:
            os.write(2, f'{self.said()}: {self.polled_says} (Ctrl-C again after {REPEAT_S:.0f} s '
                        f'aborts at once)\n'.encode())
        elif not self._critical:
            raise self.stopped()

    def _record(self, signum: int, source: str = '') -> None:
        self.signum, self.since, self.source = int(signum), time.monotonic(), source
        # the process is on its way out with 128 + signal: a launcher's later SIGTERM must not
        # turn that into a death by signal, even once the interpreter has given its handlers up
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def follow(self, signum: int = 0) -> None:
        """Another rank's stop (its signal, 0 where not known): this rank leaves the same way, as at
        a SIGTERM where the signal is not known, and says it was another rank's."""
        if not self.signum:
            self._record(signum or signal.SIGTERM, 'rank')
            self.peer_signum = int(signum)

    def said(self) -> str:
        """What stopped this process, in words: the signal it was sent, or what is known where it
        was sent none of its own -- never a signal it did not get. A rank whose launcher died gets
        SIGTERM from the kernel whatever ended the launcher (SIGKILL, a crash): that is not known
        here (the start script names it)."""
        name = signal.Signals(self.signum or signal.SIGTERM).name
        if self.source == 'launcher':
            return (f'{name} (its launcher, pid {_PARENT}, was gone: the kernel sends a rank {name} when its launcher '
                    f'dies, whatever ended that, which is not known here)')
        if self.source == 'rank':
            return f'another rank\'s {signal.Signals(self.peer_signum).name}' if self.peer_signum else \
                'another rank\'s stop'
        return name

    # --- regions ---

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """A region a signal must not cut: the stop is raised when the outermost one ends."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        self.raise_if_stopped()

    @contextlib.contextmanager
    def critical_from_mark(self) -> Iterator:
        """A region that begins where the body calls the yielded mark() and ends with this
        block: placed first in a `with` of several outputs, and marked once they are all written,
        it keeps their renames together (a stop between them would leave a mismatched pair)."""
        with contextlib.ExitStack() as region:
            marked = []

            def mark() -> None:
                if not marked:
                    region.enter_context(self.critical())
                    marked.append(True)

            yield mark

    @contextlib.contextmanager
    def polling(self, says: str = IN_TRAINING) -> Iterator[None]:
        """A region that looks at :attr:`signum` itself (the training run); ``says`` is what it
        does with a stop, printed at the signal (:meth:`polled_now` changes it as the region goes on)."""
        self._polling += 1
        before, self.polled_says = self.polled_says, says
        try:
            yield
        finally:
            self._polling -= 1
            self.polled_says = before

    def finish(self) -> None:
        """The command's work is done: a stop from now on is said and ignored, the exit code stays
        the command's (a finished run that exited 143 was requeued by the cluster script)."""
        self.finished = True

    def polled_now(self, says: str) -> None:
        """What the polling region now does with a stop (e.g. training began after the start-up)."""
        self.polled_says = says

    def raise_if_stopped(self) -> None:
        if self.signum and not self.raised and not self._critical and not self._polling and not self.finished:
            raise self.stopped()

    def stopped(self, kept: str = '') -> Stopped:
        """The exception that ends this process's stop (raise it)."""
        self.raised = True
        return stop_error(self.signum or signal.SIGTERM, kept, self.said() if self.signum else '')

    def seconds_since_signal(self) -> float:
        return time.monotonic() - self.since if self.signum else 0.0


STOP = StopSignals()


def ignore_in_worker(worker_id: int = 0) -> None:
    """A DataLoader worker's worker_init_fn: the stop belongs to the main process, which ends its
    workers itself. (torch's own handler lets a SIGTERM sent to every process -- a terminal's
    process group, a SLURM job step -- kill a worker mid-batch, and the main process then gets
    an error at whatever it is doing, the stop's save included.) And the worker dies with the
    main process: a SIGKILLed run's worker would otherwise wait for ever to hand a batch to a
    pipe nobody reads, ignoring SIGTERM, holding its memory."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    die_with_parent()


def die_with_parent() -> None:
    """Linux: SIGKILL this process when the one that forked it dies (prctl PR_SET_PDEATHSIG;
    under the forkserver start method that is the server, which ends with the main process); if
    the main process died already, exit now. Elsewhere nothing (torch's watchdog still ends a
    worker whose parent is gone, when it is not blocked)."""
    import multiprocessing

    if not sys.platform.startswith('linux'):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    parent = multiprocessing.parent_process()  # the main process, whatever the start method
    if parent is not None and not parent.is_alive():  # gone between the fork and the prctl
        os._exit(1)


_PARENT = os.getppid()  # the process that started this one (read at import, as early as can be)
_WATCHING_LAUNCHER = False  # stop_with_launcher set PR_SET_PDEATHSIG: a SIGTERM may be the launcher's death


def launcher_gone(wait_s: float = 0.05) -> bool:
    """This rank watches its launcher (:func:`stop_with_launcher`) and the launcher is gone or
    dying: a SIGTERM now is the kernel's, for that death. The kernel sends it when the launcher's
    thread that started the rank exits, and a SIGKILLed launcher's threads exit one by one: the
    rank is first handed to a sibling thread (the same pid) -- so the launcher's main thread, a
    zombie then, is looked at too, for up to ``wait_s`` (a launcher passing a stop on lives on
    while its ranks save). Either way the rank got SIGTERM and its launcher is gone: both said."""
    if not _WATCHING_LAUNCHER:
        return False
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with open(f'/proc/{_PARENT}/stat', 'rb') as f:
                state = f.read().rpartition(b')')[2].split()[0]
        except (OSError, IndexError):
            state = b'X'
        if os.getppid() != _PARENT or state in (b'Z', b'X'):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)


def stop_with_launcher() -> None:
    """Linux, a rank started by torchrun's agent (TORCHELASTIC_RUN_ID): SIGTERM this rank when the
    agent dies (prctl PR_SET_PDEATHSIG). The agent starts every rank in a session of its own, so a
    job killed by process group (SIGKILL at the end of a grace period, a scheduler that tracks
    jobs so) would leave the ranks training with no one watching, holding the run's lock against
    the requeue; with this they save their last step and stop as at any SIGTERM. If the agent is
    gone already, the stop comes now."""
    if not sys.platform.startswith('linux') or not os.environ.get('TORCHELASTIC_RUN_ID'):
        return
    global _WATCHING_LAUNCHER
    try:
        import ctypes

        if ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0):  # 1: PR_SET_PDEATHSIG
            return
    except (OSError, AttributeError):
        return
    _WATCHING_LAUNCHER = True
    if os.getppid() != _PARENT:  # the agent died between this process's start and the prctl
        os.kill(os.getpid(), signal.SIGTERM)


def install() -> None:
    """At process start (each face's main): the handlers, no output watched yet, and a rank of a
    launcher stops with it."""
    STOP.install()
    OUTPUTS.clear()
    stop_with_launcher()


def requested() -> int:
    """The stop's signal number, 0 while none came."""
    return STOP.signum


def critical():
    return STOP.critical()


def critical_from_mark():
    return STOP.critical_from_mark()


def polling(says: str = IN_TRAINING):
    return STOP.polling(says)


# --------------------------------------------------------------------------- the face's line


class Outputs:
    """What a command is about to write, to say after a stop which of it was written."""

    def __init__(self):
        self._before: dict[str, tuple | None] = {}

    def clear(self) -> None:
        self._before.clear()

    def watch(self, *paths: str) -> None:
        for p in paths:
            self._before[p] = _mtime(p)

    def describe(self) -> str:
        if not self._before:
            return 'nothing was written'
        parts = []
        for path, before in self._before.items():
            now = _mtime(path)
            if now is not None and now != before:
                parts.append(f'{path} written')
            else:
                parts.append(f'{path} not written' + (' (the earlier one is unchanged)' if before is not None else ''))
        return '; '.join(parts) + '; nothing half-written is left'


def _mtime(path: str) -> tuple | None:
    """What tells a replaced file or folder from the one before it (a rename brings a new inode)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


OUTPUTS = Outputs()


def watch_outputs(*paths: str) -> None:
    OUTPUTS.watch(*paths)


def stop_line(stop: Stopped) -> str:
    """The one line a face prints for a stop (each rank its own, under a launcher)."""
    kept = stop.kept or OUTPUTS.describe()
    rank = os.environ.get('RANK', '') if int(os.environ.get('WORLD_SIZE', '1') or 1) > 1 else ''
    return f'{f"rank {rank}: " if rank else ""}stopped by {stop.said}: {kept}'


def report(stop: Stopped) -> int:
    """Print the stop's line on stderr; the exit code (130 SIGINT, 143 SIGTERM)."""
    try:
        print(stop_line(stop), file=sys.stderr, flush=True)
    except (OSError, ValueError):  # stderr gone: the exit code says it
        pass
    # nothing after the line: a library cut short in its import (torch) would log its exit chatter
    logging.disable(logging.INFO)
    return stop.exit_code


def describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f'{type(error).__name__}: {text[0][:200]}' if text else type(error).__name__
