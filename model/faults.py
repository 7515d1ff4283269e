"""Fault points for tests: widen a window, inject an error or land a signal at an exact place.

``CHAT_SMALL_T5_FAULT=<point>[@<step>][#<rank>]:<action>`` with action ``sleep=<seconds>``,
``enospc`` (an OSError 'No space left on device'), ``sigterm``, ``sigint`` or ``sigkill`` (the
process signals itself there: a preemption that lands exactly at that point); with ``@<step>``
only the calls of that optimizer step are hit, with ``#<rank>`` only that rank (RANK). Several
specs are separated by commas. Unset -- the only case outside tests -- it costs one dictionary
lookup per call.

Points: ``dry-run`` (a dry run, before its checks), ``start-up`` (a training run, before its
state is loaded), ``token-count`` (span corruption's counting pass at start-up, before each
batch of rows), ``moved-aside`` (a fresh run, right after it moved an earlier run aside),
``train-step`` (inside a step, after a micro-batch's backward; the step is the one being taken),
``eval-loss`` (before each validation batch), ``eval-generate`` (after each
token generated for BLEU and the samples), ``state-save`` (inside a state save, after the
engine's files), ``state-saved`` (a state saved, its step file not yet written), ``done`` (a run's final model
written and its last line logged), ``write`` (a file or folder written in full at its temporary name, not yet
renamed into place: every writer), ``written`` (the same file renamed into place, the region a stop
waits out not yet left).
"""

from __future__ import annotations

import errno
import os
import signal
import time

ENV = 'CHAT_SMALL_T5_FAULT'
SIGNALS = {'sigterm': signal.SIGTERM, 'sigint': signal.SIGINT, 'sigkill': signal.SIGKILL}


def fault_point(name: str, step: int | None = None) -> None:
    specs = os.environ.get(ENV)
    if not specs:
        return
    for spec in specs.split(','):
        point, _, action = spec.partition(':')
        point, _, rank = point.partition('#')
        point, _, at = point.partition('@')
        if point != name or (at and step != int(at)) or (rank and os.environ.get('RANK', '0') != rank):
            continue
        if action.startswith('sleep='):
            time.sleep(float(action.split('=', 1)[1]))
        elif action == 'enospc':
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        elif action in SIGNALS:
            os.kill(os.getpid(), SIGNALS[action])
