"""Fault points for tests: widen a window or inject an error where a save can be interrupted.

``CHAT_SMALL_T5_FAULT=<point>[@<step>]:<action>`` with action ``sleep=<seconds>`` or
``enospc`` (an OSError 'No space left on device'); with ``@<step>`` only the save of that
optimizer step is hit. Unset -- the only case outside tests -- it costs one dictionary
lookup per call.
"""

from __future__ import annotations

import errno
import os
import time

ENV = 'CHAT_SMALL_T5_FAULT'


def fault_point(name: str, step: int | None = None) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, action = spec.partition(':')
    point, _, at = point.partition('@')
    if point != name or (at and step != int(at)):
        return
    if action.startswith('sleep='):
        time.sleep(float(action.split('=', 1)[1]))
    elif action == 'enospc':
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
