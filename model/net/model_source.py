"""What a model path a user gives holds, read without torch: a Hugging Face folder written by
train (output_dir/best, final), or a weights file (model_file: chat_small_t5.<step>.bin, best).

Used before any work -- by the dry run for --init_from, by generate, chat and test -- so a
wrong path, a training state, or a model of another shape is one line, not a traceback.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from model.errors import UserError
from model.state import markers, ownership
from model.data.tokenizer import check_tokenizer_folder, tokenizer_fingerprint
from model.net.sizing import shape_of_t5_config

WHERE = 'output_dir/best or output_dir/final'


@dataclass
class ModelSource:
    path: str
    kind: str  # 'folder' | 'weights'
    tokenizer_dir: str  # the folder itself, or the tokenizer given with a weights file
    shape: dict | None  # the model shape recorded with it (None: a weights file without it)
    max_seq_len: int | None  # what it was trained with, where recorded
    trained_tokenizer: str | None = None  # a weights file's recorded tokenizer fingerprint
    objective: str | None = None  # what it was trained on, where recorded (pairs, span_corruption)


def describe_model_source(path: str, tokenizer_dir: str, what: str = '--model_dir') -> ModelSource:
    """A ModelSource, or a UserError saying what the path is instead (the path resolved through
    links first)."""
    path = ownership.resolve_place(path, what)
    if not os.path.exists(path):
        raise UserError(f'{what}={path}: no such file or folder')
    if os.path.isdir(path):
        return _describe_folder(path, what)
    if not os.path.isfile(path):  # a FIFO would block the first read for ever
        raise UserError(f'{what}={path}: not a regular file (a FIFO, device or socket); give a model folder '
                        f'or a weights file')
    header = markers.safetensors_header(path)
    if header is None and not _is_torch_file(path):
        raise UserError(f'{what}={path}: neither a model folder nor a weights file (safetensors or torch)')
    info = {}
    if header is not None:
        raw = (header.get('__metadata__') or {}).get(markers.MARKER_KEY)
        info = json.loads(raw) if raw else {}
    shape = info.get('model_shape')
    source = ModelSource(path, 'weights', tokenizer_dir, shape, info.get('max_seq_len'), info.get('tokenizer'),
                         info.get('objective'))
    try:
        check_tokenizer_folder(tokenizer_dir)
    except UserError as e:  # a new tokenizer would not be the one these weights know: the one beside them is
        own = tokenizer_beside(path, source.trained_tokenizer)
        if own:
            fact = e.message.split('; ')[0]  # what is wrong there, without its advice (train one, retrain it)
            raise UserError(f'{fact}; {path} was trained with the tokenizer in {own}: '
                            f'give --tokenizer_dir={own}') from None
        raise
    check_same_tokenizer(source, tokenizer_dir, what)
    return source


def tokenizer_beside(path: str, fingerprint: str | None = None) -> str | None:
    """The folder of the tokenizer a model was trained with, found where train leaves one: the
    model folder itself, or, for a weights file (output_dir/chat_small_t5.<step>.bin), the run's
    best/ and final/ beside it -- with the recorded fingerprint where there is one. None if none."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    places = [folder] if os.path.isdir(path) else [os.path.join(folder, 'best'), os.path.join(folder, 'final'), folder]
    for place in places:
        try:
            if os.path.isfile(os.path.join(place, 'tokenizer.json')) and (
                    fingerprint is None or tokenizer_fingerprint(place) == fingerprint):
                return place
        except Exception:  # noqa: BLE001 - a hint looked for in places the user never named: never a traceback
            continue
    return None


def weights_path(path: str) -> str:
    """The weights file of a model folder, or the file itself."""
    if os.path.isdir(path):
        for name in ('model.safetensors', 'pytorch_model.bin'):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
    return path


def check_same_tokenizer(source: ModelSource, tokenizer_dir: str, what: str) -> None:
    """Weights trained with one tokenizer answer garbage through another of the same size:
    refused where the weights recorded theirs (files written by train do)."""
    theirs = tokenizer_fingerprint(source.path) if source.kind == 'folder' else source.trained_tokenizer
    if theirs and theirs != tokenizer_fingerprint(tokenizer_dir):
        own = tokenizer_beside(source.path, theirs)
        give = (f'give --tokenizer_dir={own}, the one it was trained with' if own
                else 'give the tokenizer it was trained with (--tokenizer_dir)')
        raise UserError(f'{what}: {source.path} was trained with another tokenizer than the one in {tokenizer_dir} '
                        f'(other pieces); {give}')


def _describe_folder(folder: str, what: str) -> ModelSource:
    kind = ownership.folder_kind(folder)
    parent_kind = ownership.folder_kind(os.path.dirname(os.path.abspath(folder).rstrip(os.sep)))
    if kind in (markers.STATE_DIR, markers.STATE) or parent_kind == markers.STATE_DIR:
        raise UserError(f'{what}={folder} is a training state (for --is_keep_training), not a model folder; '
                        f'give a model folder such as {WHERE}')
    if kind == markers.TOKENIZER:
        raise UserError(f'{what}={folder} is a tokenizer folder, not a model; give a model folder such as {WHERE}')
    config = os.path.join(folder, 'config.json')
    weights = [n for n in ('model.safetensors', 'pytorch_model.bin') if os.path.isfile(os.path.join(folder, n))]
    if not os.path.isfile(config) or not weights:
        raise UserError(f'{what}={folder} is not a model folder (it needs config.json and model.safetensors, as '
                        f'train writes to {WHERE})')
    try:
        with open(config, encoding='utf-8') as f:
            spec = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f'{config}: unreadable ({e})') from None
    if spec.get('model_type') != 't5':
        raise UserError(f'{what}={folder} holds a {spec.get("model_type")!r} model; this toolkit uses T5 models')
    if not os.path.isfile(os.path.join(folder, 'tokenizer.json')):
        raise UserError(f'{what}={folder} has no tokenizer.json: models written by train carry their tokenizer')
    check_tokenizer_folder(folder)
    shape = shape_of_t5_config(spec)
    info = ownership.read_marker(folder) or {}
    return ModelSource(folder, 'folder', folder, shape, info.get('max_seq_len'), objective=info.get('objective'))


def _is_torch_file(path: str) -> bool:
    with open(path, 'rb') as f:
        head = f.read(4)
    return head[:2] == b'PK' or head[:1] == b'\x80'
