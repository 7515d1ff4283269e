"""One rank of `train_low_mem.py train`, run in this process, recording how it ended.

    RANK_OUTCOME_DIR=<folder> python scripts/rank_outcome.py train_low_mem.py train --use_large_config=True

start_pretrain_large.sh launches its ranks through this when RANK_OUTCOME_DIR is set (the SLURM
script sets it). A launcher reports every failing rank as 1, but a batch job must tell a stop
that saved (130/143) or a crash (requeue: the next job resumes) from a divergence (1) or a user
error (2), which would only fail again (model/run_outcome.py: what the record holds, and that it
replaces only a record). A rank killed by a signal leaves `running`.
"""

from __future__ import annotations

import os
import runpy
import signal
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the toolkit's root
from model.run_outcome import path_of_this_rank, record  # noqa: E402


def main() -> None:
    path = path_of_this_rank()
    if path is None:
        sys.exit('error: RANK_OUTCOME_DIR is not set: this script records a rank\'s outcome there')
    record(path, f'running {socket.gethostname()} {os.getpid()}')
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(script))  # as `python train_low_mem.py` would have it
    outcome = 'exception'
    try:
        runpy.run_path(script, run_name='__main__')
        outcome = '0'
    except SystemExit as e:
        code = e.code
        outcome = str(code if isinstance(code, int) else 0 if code is None else 1)
        raise
    finally:
        # the trainer has decided: a peer node's early exit makes SLURM signal this one, which
        # must not turn a divergence or a finished run into a death by signal before it is recorded
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        record(path, outcome)


if __name__ == '__main__':
    main()
