"""Atomic training state: write to a temporary folder, rename into place, prune.

Layout of ``train_state_dir``::

    state-000005000/            one complete state per folder (newest wins)
        complete.json           written last: a folder without it is ignored
        model.pt optimizer.pt scheduler.pt [scaler.pt]
        train_state.json data_state.json config.json fingerprint.json
        rng_rank0.pt rng_rank1.pt ...
    .tmp-state-000006000/       a save in progress (removed if found stale)

The previous state stays until the new one is complete, so a crash, a kill or
a second Ctrl-C during a save loses nothing that was already saved. Every
rank must see the same filesystem (one machine, or a shared mount).
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
from typing import Any, Callable

from config import UserError

# torch and numpy are imported inside the functions that need them, so that
# `train --dry_run=True` (which asks for the latest state) stays fast.

MARKER = 'complete.json'
_STATE_RE = re.compile(r'^state-(\d+)$')


def state_name(step: int) -> str:
    return f'state-{step:09d}'


def list_complete_states(state_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete state, oldest first."""
    out = []
    if not os.path.isdir(state_dir):
        return out
    for name in os.listdir(state_dir):
        m = _STATE_RE.match(name)
        path = os.path.join(state_dir, name)
        if m and os.path.isfile(os.path.join(path, MARKER)):
            out.append((int(m.group(1)), path))
    return sorted(out)


def latest_state(state_dir: str) -> str | None:
    states = list_complete_states(state_dir)
    return states[-1][1] if states else None


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {'python': random.getstate(), 'numpy': np.random.get_state(), 'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def write_json(path: str, obj) -> None:
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(obj, f, ensure_ascii=False, indent=1, default=str)


def read_json(path: str):
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def atomic_torch_save(obj, path: str) -> None:
    """torch.save to path.tmp, then rename: a reader never sees half a file."""
    import torch

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp'
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_state(state_dir: str, step: int, *, is_main: bool, rank: int, barrier: Callable[[], None],
               tensors: dict[str, Any], jsons: dict[str, Any], keep: int = 2) -> str:
    """Collective: every rank calls it. Main writes the shared parts, each rank its RNG.

    ``tensors`` go to ``<name>.pt``, ``jsons`` to ``<name>.json`` (main only).
    Returns the final folder.
    """
    import torch

    tmp = os.path.join(state_dir, '.tmp-' + state_name(step))
    final = os.path.join(state_dir, state_name(step))
    if is_main:
        os.makedirs(state_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    torch.save(rng_state(), os.path.join(tmp, f'rng_rank{rank}.pt'))
    if is_main:
        for name, obj in tensors.items():
            torch.save(obj, os.path.join(tmp, f'{name}.pt'))
        for name, obj in jsons.items():
            write_json(os.path.join(tmp, f'{name}.json'), obj)
    barrier()
    if is_main:
        for name in os.listdir(tmp):  # data on disk before the marker says complete
            _fsync_file(os.path.join(tmp, name))
        write_json(os.path.join(tmp, MARKER), {'step': step})
        _fsync_dir(tmp)
        replaced = None
        if os.path.isdir(final):  # same step saved again: swap, never a moment without it
            replaced = final + '.replaced'
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(tmp, final)
        if replaced:
            shutil.rmtree(replaced, ignore_errors=True)
        _fsync_dir(state_dir)
        for _, old in list_complete_states(state_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in glob.glob(os.path.join(state_dir, '.tmp-state-*')):
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    return final


def _fsync_file(path: str) -> None:
    with open(path, 'rb') as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_state(state_dir: str, rank: int) -> dict[str, Any]:
    """The newest complete state: its json parts, tensor parts (on CPU) and this rank's RNG."""
    import torch

    path = latest_state(state_dir)
    if path is None:
        raise UserError(f'--is_keep_training=True but no complete saved state in {state_dir}; '
                        f'start without --is_keep_training (or check --train_state_dir)')
    out: dict[str, Any] = {'path': path}
    for f in os.listdir(path):
        name, ext = os.path.splitext(f)
        if ext == '.json':
            out[name] = read_json(os.path.join(path, f))
    for name in ('model', 'optimizer', 'scheduler', 'scaler'):
        p = os.path.join(path, f'{name}.pt')
        if os.path.isfile(p):
            out[name] = torch.load(p, map_location='cpu', weights_only=False)
    rng = os.path.join(path, f'rng_rank{rank}.pt')
    out['rng_exact'] = os.path.isfile(rng)
    if not out['rng_exact']:  # resumed on more ranks than saved: borrow rank 0's
        rng = os.path.join(path, 'rng_rank0.pt')
    out['rng'] = torch.load(rng, map_location='cpu', weights_only=False)
    return out


def prune_model_files(model_file: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` step files of model_file ('{}' = step); 'best' stays."""
    pattern = re.compile('^' + re.escape(os.path.basename(model_file)).replace(r'\{\}', r'(\d+)') + '$')
    folder = os.path.dirname(model_file) or '.'
    steps = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        m = pattern.match(name)
        if m:
            steps.append((int(m.group(1)), os.path.join(folder, name)))
    removed = [p for _, p in sorted(steps)[:-keep]] if keep > 0 else []
    for p in removed:
        os.remove(p)
    return removed


def compare_fingerprints(saved: dict, current: dict, allow_data_change: bool) -> list[str]:
    """Raise on a changed model shape; on changed data unless allowed. Returns notes."""
    if saved.get('model_shape') != current['model_shape']:
        diff = {k: (saved.get('model_shape', {}).get(k), v) for k, v in current['model_shape'].items()
                if saved.get('model_shape', {}).get(k) != v}
        desc = ', '.join(f'{k}: saved {a} -> now {b}' for k, (a, b) in diff.items())
        raise UserError(f'the saved state has a different model shape ({desc}); resume with the '
                        f'same shape, or start a new run in another --train_state_dir')
    notes = []
    if saved.get('data') != current['data']:
        msg = (f'the training data changed since the save (saved {saved.get("data")}, '
               f'now {current["data"]})')
        if not allow_data_change:
            raise UserError(msg + '; pass --allow_data_change=True to continue on the new data anyway')
        notes.append(msg + '; continuing as --allow_data_change=True asks')
    if saved.get('tokenizer') != current['tokenizer']:
        raise UserError('the tokenizer changed since the save; the saved model only works with the '
                        'tokenizer it was trained with')
    return notes


def previous_run_artifacts(train_state_dir: str, model_file: str, output_dir: str) -> list[str]:
    """What an earlier run left at these paths (states, step/best model files, HF folders)."""
    found = []
    if os.path.isdir(train_state_dir) and os.listdir(train_state_dir):
        found.append(train_state_dir)
    folder = os.path.dirname(model_file) or '.'
    pattern = re.compile('^' + re.escape(os.path.basename(model_file)).replace(r'\{\}', r'(\d+|best)') + '$')
    if os.path.isdir(folder):
        found += sorted(os.path.join(folder, n) for n in os.listdir(folder) if pattern.match(n))
    found += [p for p in (os.path.join(output_dir, 'best'), os.path.join(output_dir, 'final'))
              if os.path.isdir(p)]
    return found


def archive_previous_run(train_state_dir: str, model_file: str, output_dir: str, stamp: str) -> str | None:
    """Move an earlier run's artifacts under output_dir/previous_runs/<stamp>/ instead of
    overwriting them: a fresh run never destroys what was saved. Returns the archive folder."""
    items = previous_run_artifacts(train_state_dir, model_file, output_dir)
    if not items:
        return None
    archive = os.path.join(output_dir, 'previous_runs', stamp)
    os.makedirs(archive, exist_ok=True)
    for item in items:
        shutil.move(item, os.path.join(archive, os.path.basename(os.path.normpath(item))))
    return archive
