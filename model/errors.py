"""The one kind of error a user can cause, and fix.

Every face (train_low_mem.py, prepare_data.py, start-up checks) prints a :class:`UserError` as one
line, ``error: <message>; <fix>``, and exits 2; anything else that escapes is a bug. The fix is
kept apart from the message so that a caller that knows a better fix for its own context (the
dry run names the run's preset) can replace it without parsing text.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (a bad flag, a missing file, a bad column)."""

    def __init__(self, message: str, fix: str = ''):
        super().__init__(message + (f'; {fix}' if fix else ''))
        self.message, self.fix = message, fix


class NotOurs(UserError):
    """An output place holds what this toolkit did not write (or changed since): it is never
    replaced. Raised by model/state/ownership.check_replaceable; a training run meeting it at a
    best-model export mid-run says so and trains on (model/train/trainer.py)."""
