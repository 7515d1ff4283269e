"""How one rank of a batch job ended, for the SLURM script (scripts/slurm_2nodes.sbatch):
``$RANK_OUTCOME_DIR/rank-<RANK>`` holds ``running <host> <pid>`` while the rank runs, then its exit
code, or ``exception``. Written by scripts/rank_outcome.py around the run, and by a run that ends
with os._exit (model/state/locks.py's give-way), which skips that script's own record.

A record replaces only an outcome: a missing file, or a plain file (one name, not a link) that
holds one; anything else at that path is left as it is, with a warning (the job then reads the
rank as crashed: the safe side)."""

from __future__ import annotations

import os
import re
import stat
import sys

OUTCOME = re.compile(rb'(running \S+ \d+|exception|-?\d+)\n?')


def record(path: str, text: str) -> None:
    """Written whole or not at all (a temporary beside it, renamed over it): the batch shell may
    read it at any time."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        return _warn(path, e.strerror)
    if st is not None:
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            return _warn(path, 'it is not a plain file this script wrote (a link, a folder, a second name)')
        with open(path, 'rb') as f:
            if not OUTCOME.fullmatch(f.read(256)):
                return _warn(path, 'it holds something else than a rank\'s outcome')
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        return _warn(path, e.strerror)
    try:
        with os.fdopen(fd, 'w', encoding='utf-8') as f:
            f.write(text + '\n')
        os.replace(tmp, path)
    except OSError as e:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        _warn(path, e.strerror)


def path_of_this_rank() -> str | None:
    """This rank's record under $RANK_OUTCOME_DIR, or None when no batch job asked for one."""
    folder = os.environ.get('RANK_OUTCOME_DIR')
    return os.path.join(folder, f"rank-{os.environ.get('RANK', '0')}") if folder else None


def _warn(path: str, why: str) -> None:  # the outcome stays what it was, read as a crash: the safe side
    print(f'warning: cannot record this rank\'s outcome in {path}: {why}', file=sys.stderr)
