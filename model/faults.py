"""Fault points for tests: widen a window or inject an error where a save can be interrupted.

``CHAT_SMALL_T5_FAULT=<point>[@<step>]:<action>`` with action ``sleep=<seconds>``, ``enospc``
(an OSError 'No space left on device'), ``sigterm`` or ``sigint`` (the process signals itself
there: a preemption that lands exactly at that point); with ``@<step>`` only the call of that
optimizer step is hit. Several specs are separated by commas. Unset -- the only case outside tests -- it costs one dictionary
lookup per call.
"""

from __future__ import annotations

import errno
import os
import signal
import time

ENV = 'CHAT_SMALL_T5_FAULT'


def fault_point(name: str, step: int | None = None) -> None:
    specs = os.environ.get(ENV)
    if not specs:
        return
    for spec in specs.split(','):
        point, _, action = spec.partition(':')
        point, _, at = point.partition('@')
        if point != name or (at and step != int(at)):
            continue
        if action.startswith('sleep='):
            time.sleep(float(action.split('=', 1)[1]))
        elif action == 'enospc':
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        elif action in ('sigterm', 'sigint'):
            os.kill(os.getpid(), signal.SIGTERM if action == 'sigterm' else signal.SIGINT)
