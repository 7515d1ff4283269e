"""Weights the toolkit exports: step files (model_file.format(step)) as marked safetensors, loaded
without unpickling anything; Hugging Face model folders (best/, final/); finding, refusing and
pruning the files a model_file pattern names."""

from __future__ import annotations

import os
import re

from model.errors import UserError
from model.state import markers, ownership, writes
from model.state.markers import MODEL, WEIGHTS


def save_weights_file(state_dict: dict, path: str, **info) -> None:
    """A full state dict as safetensors (tied weights once), marked as the toolkit's."""
    from accelerate.utils.other import clean_state_dict_for_safetensors
    from safetensors.torch import save_file

    state_dict = clean_state_dict_for_safetensors({k: v.contiguous() for k, v in state_dict.items()})
    with writes.atomic_file(path, WEIGHTS, 'model_file', own_name=True) as tmp:  # a link there: never followed
        save_file(state_dict, tmp, metadata=markers.weights_metadata(**info))


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
    with writes.building_folder(target, MODEL, 'output_dir', own_name=True) as tmp:  # best/, final/: never a link
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        ownership.write_marker(tmp, MODEL, **info)


# what a run keeps in output_dir: its model folders, each replaced whole when written, and the
# folder its earlier runs are moved into (previous_runs.archive_previous_run)
MODEL_FOLDERS = ('best', 'final')
PREVIOUS_RUNS = 'previous_runs'
# where a run given only --output_dir keeps its states and step files (config.follow_output_dir)
STATES_IN_OUTPUT_DIR = 'train_latest_state'
STEP_FILES_IN_OUTPUT_DIR = 'chat_small_t5.{}.bin'


def model_folders(output_dir: str) -> list[str]:
    """output_dir's model folders (best/, final/), each replaced whole when written."""
    return [os.path.join(output_dir, name) for name in MODEL_FOLDERS]


def run_folders(output_dir: str) -> list[str]:
    """output_dir's folders that a run replaces whole or fills with earlier runs: no other place of
    a run (states, step files, logs) may lie in one (preflight.layout_problems)."""
    return [*model_folders(output_dir), os.path.join(output_dir, PREVIOUS_RUNS)]


def model_identity(path: str) -> str | None:
    """What a model the toolkit wrote is, by content, wherever it lies: a model folder's marker
    (which records every file's checksum) hashed, a weights file's sealed content hash. None for
    anything else, or one changed since it was written."""
    if ownership.kind_of(path) == MODEL:
        return 'folder:' + markers.file_sha256(os.path.join(path, markers.MARKER_FILE))
    info, intact = markers.file_status(path)
    if info and intact and info.get('kind') == WEIGHTS:
        return 'weights:' + str(info.get(markers.CONTENT_KEY))
    return None


RUN_ID = 'run_id'  # the key of the run's id in a model's marker and a state's run.json (contract.new_run_id)


def model_record(path: str) -> dict | None:
    """The marker of a model the toolkit wrote (a model folder or a weights file, never through a
    link); None for anything else."""
    if ownership.is_link(path) or not os.path.lexists(path):
        return None
    info = ownership.read_marker(path) if os.path.isdir(path) else markers.file_marker(path)
    return info if info and info.get('kind') in (MODEL, WEIGHTS) else None


def recorded_run(path: str) -> str | None:
    """The id of the run that wrote this model, as its marker records it; None for anything else,
    or a model written before runs had ids."""
    return _run_of(model_record(path))


def _run_of(record: dict | None) -> str | None:
    found = (record or {}).get(RUN_ID)
    return found if isinstance(found, str) and found else None


def _recorded_runs(output_dir: str, model_file: str | None) -> list[tuple[str, str | None]]:
    """(path, the id its marker records: None before runs had ids) of the toolkit's models a run
    with these places writes: output_dir's model folders, the model_file pattern's step and best
    files (each marker read once)."""
    files = [p for _, p in owned_model_files(model_file, r'\d+|best')] if model_file else []
    found = []
    for path in [*model_folders(output_dir), *files]:
        record = model_record(path)
        if record is not None:
            found.append((path, _run_of(record)))
    return found


def holds_run(output_dir: str, model_file: str | None, run_id: str | None) -> bool:
    """Whether these places hold models of the run with this id (None: a run from before ids --
    models there, none with an id)."""
    runs = [run for _, run in _recorded_runs(output_dir, model_file)]
    return run_id in runs if run_id else bool(runs) and not any(runs)


def other_runs_models(output_dir: str, model_file: str, run_id: str | None) -> list[tuple[str, str | None]]:
    """(path, its run's id) of the models at these places that a run with this id did not write:
    another id, or -- for a run with an id -- none (a run from before ids). A run from before ids
    (None) writes none with an id; its own models, without one, are not told apart from others."""
    return [(p, run) for p, run in _recorded_runs(output_dir, model_file) if run != run_id]


PREDICTIONS_TAIL = r'\.predictions\.[\w.-]+\.jsonl'  # what predictions_path adds to a model's name (a regex)


def predictions_path(model_path: str, test_file: str) -> str:
    """Where `test` puts a model's predictions by default, beside the model:
    <model folder or weights file>.predictions.<test file name>.jsonl (a fresh run moves them
    with the earlier run's models: model/state/previous_runs.py)."""
    # a glob's '*' (or any odd character) never ends up in a file name a shell would expand
    stem = re.sub(r'[^\w.-]+', '_', os.path.splitext(os.path.basename(os.path.normpath(test_file)))[0]).strip('_.')
    stem = stem or 'test'
    return f'{os.path.normpath(model_path)}.predictions.{stem}.jsonl'


STEP = '\0'  # stands for the '{}' while a pattern is taken apart (no path holds it)


def split_model_file(model_file: str) -> tuple[str, str, str]:
    """(folder, text before the step, text after it) of a model_file pattern, each as it is on
    disk: doubled braces anywhere ('{{', '}}') are the literal characters, as format writes them."""
    folder, name = os.path.split(model_file.format(STEP))
    before, after = name.split(STEP)
    return folder or '.', before, after


def model_folder(model_file: str) -> str:
    """The folder the model_file pattern writes into."""
    return split_model_file(model_file)[0]


def join_model_file(folder: str, before: str, after: str) -> str:
    """The pattern of split_model_file's parts (its braces doubled again)."""
    def literal(text):
        return text.replace('{', '{{').replace('}', '}}')

    return os.path.join(literal(folder), literal(before) + '{}' + literal(after))


def model_file_pattern(model_file: str, tags: str = r'\d+', then: str = '') -> re.Pattern:
    """The names of the pattern's files whose step is one of ``tags`` (group 1), followed by the
    regular expression ``then`` (e.g. what `test` adds to a model's name for its predictions)."""
    _, before, after = split_model_file(model_file)
    return re.compile('^' + re.escape(before) + f'({tags})' + re.escape(after) + then + '$')


def owned_model_files(model_file: str, tags: str = r'\d+') -> list[tuple[str, str]]:
    """(tag, path) of the files of the model_file pattern that carry the toolkit's weights marker
    (their content is judged again right before one is moved or deleted)."""
    folder = model_folder(model_file)
    pattern = model_file_pattern(model_file, tags)
    found = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        m = pattern.match(name)
        if m and (markers.file_marker(os.path.join(folder, name)) or {}).get('kind') == WEIGHTS:
            found.append((m.group(1), os.path.join(folder, name)))
    return found


def foreign_model_files(model_file: str) -> list[str]:
    """Files of the model_file pattern (steps or best) that are not the toolkit's unchanged
    weights: a run could overwrite or prune them."""
    folder = model_folder(model_file)
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
        writes.remove_owned(p, WEIGHTS)
    return removed
