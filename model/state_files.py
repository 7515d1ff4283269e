"""The files of a run: atomic training states, weights files, model folders, previous runs.

Layout of ``train_state_dir`` (marked as the toolkit's by ``chat_small_t5.json``)::

    state-000005000/            one complete state per folder (newest wins)
        chat_small_t5.json      the marker (kind "state"), written last with every file's size and
                                checksum: a folder without it, or whose files do not match it, is
                                not a state
        model.safetensors optimizer.bin custom_checkpoint_0.pkl (schedule) custom_checkpoint_1.pkl
        (data position) [scaler.pt] random_states_<rank>.pkl
                                what accelerate's save_state writes for the engine in use (FSDP:
                                sharded model and optimizer folders; DeepSpeed: its checkpoint)
        train_state.json config.json fingerprint.json run.json
        tokenizer/              the run's tokenizer, so a retrained one never strands a state
    .tmp-state-000006000/       a save in progress (removed when found stale)

The previous state stays until the new one is complete, so a crash, a kill or a full disk
during a save loses nothing that was already saved; a resume falls back past a damaged
newest state to the previous complete one. Every rank must see the same filesystem.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import os
import re
import shutil
from typing import Any, Callable

from config import UserError
from model import ownership
from model.faults import fault_point
from model.ownership import MODEL, STATE, STATE_DIR, WEIGHTS

# torch and numpy are imported inside the functions that need them, so that
# `train --dry_run=True` (which inspects the saved states) stays fast.

logger = logging.getLogger(__name__)

MARKER = ownership.MARKER_FILE
TOKENIZER_COPY = 'tokenizer'
_STATE_RE = re.compile(r'^state-(\d+)$')


def state_name(step: int) -> str:
    return f'state-{step:09d}'


def list_complete_states(state_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every state folder with a completion marker, oldest first."""
    out = []
    if not os.path.isdir(state_dir):
        return out
    for name in os.listdir(state_dir):
        m = _STATE_RE.match(name)
        path = os.path.join(state_dir, name)
        if m and ownership.folder_kind(path) == STATE:
            out.append((int(m.group(1)), path))
    return sorted(out)


def state_problem(path: str, deep: bool = False) -> str | None:
    """Why a state folder cannot be loaded (a file missing or of another size; with deep, also
    of other content than saved), or None."""
    try:
        manifest = read_json(os.path.join(path, MARKER)).get('files')
    except (OSError, ValueError, AttributeError) as e:
        return f'unreadable {MARKER} ({e})'
    if not isinstance(manifest, dict):
        return f'{MARKER} lists no files'
    for name, saved in manifest.items():
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            return f'{name} is missing'
        size = os.path.getsize(p)
        if size != saved.get('bytes'):
            return f'{name} has {size} bytes, {saved.get("bytes")} were saved'
        if deep and file_sha256(p) != saved.get('sha256'):
            return f'{name} differs from what was saved (checksum)'
    return None


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 22), b''):
            digest.update(chunk)
    return digest.hexdigest()


def latest_state(state_dir: str, deep: bool = False) -> str | None:
    """The newest state whose files match its manifest (with deep, their checksums too)."""
    for _, path in reversed(list_complete_states(state_dir)):
        if state_problem(path, deep) is None:
            return path
    return None


def write_json(path: str, obj) -> None:
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(obj, f, ensure_ascii=False, indent=1, default=str)


def read_json(path: str):
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def ensure_state_dir(state_dir: str) -> None:
    """Create (or adopt an empty) train_state_dir and mark it as the toolkit's."""
    ownership.check_replaceable(state_dir, STATE_DIR, 'train_state_dir', folder=True)
    os.makedirs(state_dir, exist_ok=True)
    if ownership.folder_kind(state_dir) != STATE_DIR:
        ownership.write_marker(state_dir, STATE_DIR, manifest=False)


def save_state(state_dir: str, step: int, *, is_main: bool, all_ok: Callable[[bool], bool],
               write_all_ranks: Callable[[str], None], write_main: Callable[[str], None], keep: int = 2) -> str:
    """Collective: every rank calls it. ``write_all_ranks(folder)`` runs on every rank (the
    engine's save: accelerate's save_state), then ``write_main(folder)`` on the main process
    (the JSON parts, the tokenizer). ``all_ok`` is a collective vote after each part, so a rank
    whose write failed -- a full disk -- never leaves the others waiting. The folder is
    checksummed, marked and renamed into place; the oldest states beyond ``keep`` are pruned.
    Returns the final folder."""
    tmp = os.path.join(state_dir, '.tmp-' + state_name(step))
    final = os.path.join(state_dir, state_name(step))
    steps = [lambda: _new_tmp(state_dir, tmp) if is_main else None,
             lambda: write_all_ranks(tmp),
             lambda: (fault_point('state-save', step), write_main(tmp)) if is_main else None,
             lambda: _complete(state_dir, tmp, final, step, keep) if is_main else None]
    for part in steps:
        error: BaseException | None = None
        try:
            part()
        except Exception as e:  # noqa: BLE001 - reported after the vote, on every rank
            error = e
        if not all_ok(error is None):
            raise _save_error(error, state_dir, tmp, is_main)
    return final


def _new_tmp(state_dir: str, tmp: str) -> None:
    ensure_state_dir(state_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    previous = latest_state(state_dir)
    if previous:  # a state the size of the last one must fit: found before any rank writes
        need = sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(previous) for n in names)
        if shutil.disk_usage(state_dir).free < need * 1.05:
            raise OSError(errno.ENOSPC, f'No space left on device: a state needs about {need} bytes')
    os.makedirs(tmp)


def _complete(state_dir: str, tmp: str, final: str, step: int, keep: int) -> None:
    files = {}
    for root, _, names in os.walk(tmp):
        for name in names:  # data on disk before the marker says complete
            p = os.path.join(root, name)
            _fsync_file(p)
            files[os.path.relpath(p, tmp)] = {'bytes': os.path.getsize(p), 'sha256': file_sha256(p)}
    ownership.write_marker(tmp, STATE, step=step, files=files)
    ownership.replace_folder(tmp, final, STATE, 'train_state_dir')  # a step saved again: swapped
    for _, old in list_complete_states(state_dir)[:-keep]:
        extra = ownership.foreign_files(old)
        if extra:
            logger.warning('%s is not pruned: it holds files this toolkit did not write (%s)', old,
                           ', '.join(extra[:3]))
        else:
            shutil.rmtree(old, ignore_errors=True)
    for stale in glob.glob(os.path.join(state_dir, '.tmp-state-*')):
        shutil.rmtree(stale, ignore_errors=True)


def _save_error(error: BaseException | None, state_dir: str, tmp: str, is_main: bool) -> BaseException:
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    previous = latest_state(state_dir)
    kept = f'; the previous state {previous} is intact' if previous else '; no earlier state was saved'
    if error is None:
        return UserError(f'another process failed while saving the state in {state_dir}{kept}')
    if ownership.is_disk_full(error):
        return UserError(f'disk full while saving the training state in {state_dir}{kept} and nothing '
                         f'half-written was left. Free space, then resume with --is_keep_training=True')
    return error


def _fsync_file(path: str) -> None:
    with open(path, 'rb') as f:
        os.fsync(f.fileno())


def load_state(state_dir: str, load_all_ranks: Callable[[str], None]) -> dict[str, Any]:
    """The newest state that loads: its JSON parts, after ``load_all_ranks(folder)`` (the
    engine's load_state) filled the live objects. A damaged state (a file missing, truncated,
    of another checksum, or one that would need unpickling beyond tensors) is reported and the
    previous complete one is tried; none left is a UserError."""
    states = list_complete_states(state_dir)
    if not states:
        raise UserError(f'--is_keep_training=True but no complete saved state in {state_dir}; '
                        f'start without --is_keep_training (or check --train_state_dir)')
    damaged = []
    for _, path in reversed(states):
        problem = state_problem(path, deep=True) or unsafe_pickles(path)
        if problem is None:
            try:
                out: dict[str, Any] = {'path': path, 'damaged': damaged}
                for f in os.listdir(path):
                    name, ext = os.path.splitext(f)
                    if ext == '.json' and f != MARKER:
                        out[name] = read_json(os.path.join(path, f))
                load_all_ranks(path)
                return out
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - a damaged file of any kind
                problem = f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
        damaged.append((path, problem))
        logger.warning('state %s is damaged (%s); trying the previous one', path, problem)
    raise UserError(f'every saved state in {state_dir} is damaged ({damaged[0][1]} in {damaged[0][0]}); '
                    f'start a new run without --is_keep_training')


def unsafe_pickles(path: str) -> str | None:
    """The first torch file of a state that does not load as plain tensors and numbers
    (``weights_only=True``, numpy arrays allowed as accelerate allows them): loading it would
    run code from the file. None when every one loads so."""
    from accelerate.utils.other import load

    for root, _, names in os.walk(path):
        for name in sorted(names):
            if not name.endswith(('.bin', '.pkl', '.pt')):
                continue
            try:
                load(os.path.join(root, name), map_location='cpu', weights_only=True)
            except Exception as e:  # noqa: BLE001
                return (f'{os.path.relpath(os.path.join(root, name), path)} holds more than tensors and numbers '
                        f'(loading it could run code from the file: {type(e).__name__})')
    return None


# --------------------------------------------------------------------------- weights


def save_weights_file(state_dict: dict, path: str, **info) -> None:
    """A full state dict as safetensors (tied weights once), marked as the toolkit's."""
    from accelerate.utils.other import clean_state_dict_for_safetensors
    from safetensors.torch import save_file

    state_dict = clean_state_dict_for_safetensors({k: v.contiguous() for k, v in state_dict.items()})
    with ownership.atomic_file(path, WEIGHTS, 'model_file') as tmp:
        save_file(state_dict, tmp, metadata=ownership.weights_metadata(**info))


def load_weights_file(path: str) -> dict:
    """A state dict from a weights file: safetensors, or a torch file of plain tensors only
    (``weights_only=True``: loading never runs code from the file)."""
    import torch

    with open(path, 'rb') as f:
        head = f.read(4)
    try:
        if head[:2] == b'PK' or head[:1] == b'\x80':
            try:
                return torch.load(path, map_location='cpu', weights_only=True)
            except Exception as e:  # noqa: BLE001
                if 'weights_only' in str(e) or 'Unsupported global' in str(e):
                    raise UserError(f'{path}: this torch file holds more than tensors, and loading it '
                                    f'could run code from it; it is not loaded') from None
                raise
        from safetensors.torch import load_file

        return load_file(path)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f'{path}: not a readable weights file ({type(e).__name__}: '
                        f'{str(e).splitlines()[0] if str(e) else "damaged"})') from None


def save_model_folder(model, state_dict: dict, tokenizer, target: str, **info) -> None:
    """A Hugging Face folder (the full state dict, the tokenizer, the marker) swapped in atomically."""
    with ownership.building_folder(target, MODEL, 'output_dir') as tmp:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        ownership.write_marker(tmp, MODEL, **info)


def model_file_pattern(model_file: str, tags: str = r'\d+') -> re.Pattern:
    return re.compile('^' + re.escape(os.path.basename(model_file)).replace(r'\{\}', f'({tags})') + '$')


def owned_model_files(model_file: str, tags: str = r'\d+') -> list[tuple[str, str]]:
    """(tag, path) of the files of the model_file pattern that the toolkit wrote."""
    folder = os.path.dirname(model_file) or '.'
    pattern = model_file_pattern(model_file, tags)
    found = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        m = pattern.match(name)
        if m and ownership.file_kind(os.path.join(folder, name)) == WEIGHTS:
            found.append((m.group(1), os.path.join(folder, name)))
    return found


def foreign_model_files(model_file: str) -> list[str]:
    """Files of the model_file pattern (steps or best) that the toolkit did not write."""
    folder = os.path.dirname(model_file) or '.'
    pattern = model_file_pattern(model_file, r'\d+|best')
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, n) for n in sorted(os.listdir(folder))
            if pattern.match(n) and ownership.kind_of(os.path.join(folder, n)) != WEIGHTS]


def prune_model_files(model_file: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` step files the toolkit wrote; 'best' stays."""
    steps = sorted((int(tag), path) for tag, path in owned_model_files(model_file))
    removed = [p for _, p in steps[:-keep]] if keep > 0 else []
    for p in removed:
        ownership.remove_owned(p, WEIGHTS)
    return removed


# --------------------------------------------------------------------------- previous runs


def previous_run_artifacts(train_state_dir: str, model_file: str, output_dir: str) -> list[str]:
    """What an earlier run of the toolkit left at these paths: only things it marked."""
    found = []
    if ownership.folder_kind(train_state_dir) == STATE_DIR and any(
            _STATE_RE.match(n) or n.startswith('.tmp-state-') for n in os.listdir(train_state_dir)):
        found.append(train_state_dir)
    found += [p for _, p in owned_model_files(model_file, r'\d+|best')]
    found += [p for p in (os.path.join(output_dir, 'best'), os.path.join(output_dir, 'final'))
              if ownership.folder_kind(p) == MODEL]
    return found


def archive_previous_run(train_state_dir: str, model_file: str, output_dir: str, stamp: str) -> str | None:
    """Move an earlier run's artifacts under output_dir/previous_runs/<stamp>/ instead of
    overwriting them: a fresh run never destroys what was saved. Returns the archive folder."""
    items = previous_run_artifacts(train_state_dir, model_file, output_dir)
    if not items:
        return None
    archive = os.path.join(output_dir, 'previous_runs', stamp)
    suffix = 1
    while os.path.exists(archive):
        archive = os.path.join(output_dir, 'previous_runs', f'{stamp}-{suffix}')
        suffix += 1
    os.makedirs(archive)
    for item in items:
        dest = os.path.join(archive, os.path.basename(os.path.normpath(item)))
        if item == train_state_dir:
            # the folder itself may be in use (its lock); move its contents, keep the folder
            os.makedirs(dest)
            for name in os.listdir(item):
                if _STATE_RE.match(name) or name.startswith('.tmp-state-'):
                    shutil.move(os.path.join(item, name), os.path.join(dest, name))
            ownership.write_marker(dest, STATE_DIR, manifest=False)
        else:
            shutil.move(item, dest)
    return archive


# --------------------------------------------------------------------------- fingerprints


def data_fingerprint(files: list[str]) -> list[dict]:
    """Names, sizes and row counts of the training files (metadata only, not a content hash)."""
    from model.files import inspect_parquet

    return [{'name': os.path.basename(f), 'bytes': os.path.getsize(f),
             'rows': inspect_parquet(f).num_rows} for f in files]


def compare_fingerprints(saved: dict, current: dict, allow_data_change: bool,
                         state_path: str = '') -> list[str]:
    """Raise on a changed tokenizer or model shape; on changed data unless allowed. Returns notes."""
    if saved.get('tokenizer') != current['tokenizer']:
        copy = os.path.join(state_path, TOKENIZER_COPY) if state_path else ''
        fix = (f'resume with the run\'s own copy: --tokenizer_dir={copy}' if copy and os.path.isdir(copy)
               else 'resume with the tokenizer it was trained with')
        raise UserError(f'the tokenizer in tokenizer_dir is not the one this run was trained with '
                        f'(retrained or replaced since the save); {fix}')
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
    return notes
