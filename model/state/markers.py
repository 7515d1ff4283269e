"""What the toolkit's marks are: the kinds of things it makes, a folder marker's header, and the
marker sealed into a file (a Parquet footer key, a safetensors header, a PNG text chunk, a JSONL
first line) with the SHA-256 of the rest of the file. Whether a file is the toolkit's is read
from its content here (:func:`file_kind`); model/state/ownership.py judges folders and places."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import struct
import time
import zlib

MARKER_FILE = 'chat_small_t5.json'
MARKER_KEY = 'chat_small_t5'
LOCK_FILE = '.chat_small_t5.lock'
# in a state's folder from the first moment of its save until it is in place: a half-done save is
# known by it, never by its name alone (model/state/states.py); not part of the state
SAVING_FILE = '.chat_small_t5.saving'
# the name of a state folder in a train_state_dir: state-<step>, or state-<step>.<n> where a save stepped around
# a folder it may not replace (model/state/states.py names them; model/state/ownership.py judges a folder by them)
STATE_NAME = re.compile(r'^state-(\d+)(?:\.(\d+))?$')


def state_key(name: str) -> tuple[int, int] | None:
    """(step, n) of a state folder's name (n 0 for state-<step>), in the order saves are newer; None: not one."""
    m = STATE_NAME.match(name)
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None

CONTENT_KEY = 'content_sha256'
PLACEHOLDER = '0' * 64  # the content hash of a file before seal_file fills it in
MAX_MARKER_BYTES = 64 << 20  # a marker (a manifest of a sharded state included) is read up to this

# kinds of things the toolkit makes
TOKENIZER, MODEL, STATE_DIR, STATE, WEIGHTS, DATA, PREDICTIONS, PLOT = (
    'tokenizer', 'model', 'train-state', 'state', 'weights', 'prepared-data', 'predictions', 'plot')


def marker_info(kind: str, **info) -> dict:
    return {'made_by': MARKER_KEY, 'kind': kind, 'version': 2,
            'created': time.strftime('%Y-%m-%d %H:%M:%S'), **info}


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 22), b''):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- file markers


def file_marker_info(kind: str, **info) -> dict:
    """The marker of a file: :func:`seal_file` replaces the placeholder by the content's hash."""
    return marker_info(kind, **info, **{CONTENT_KEY: PLACEHOLDER})


def parquet_marker(kind: str, **info) -> dict[str, str]:
    """Footer key-value metadata (ParquetWriter.add_key_value_metadata, not the schema's: a
    table read from this file and written elsewhere does not carry it along)."""
    return {MARKER_KEY: json.dumps(file_marker_info(kind, **info), ensure_ascii=False)}


def weights_metadata(**info) -> dict[str, str]:
    """safetensors header metadata (str -> str) that marks a weights file as the toolkit's."""
    return {'format': 'pt', MARKER_KEY: json.dumps(file_marker_info(WEIGHTS, **info))}


def safetensors_header(path: str) -> dict | None:
    """The JSON header of a safetensors file, or None if it is not one."""
    try:
        with open(path, 'rb') as f:
            head = f.read(8)
            if len(head) < 8:
                return None
            (size,) = struct.unpack('<Q', head)
            if size > 100 << 20:
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError):
        return None
    return header if isinstance(header, dict) else None


class _Layout:
    """Where a marked file keeps its marker and its content: byte ranges of the content (hashed)
    and of the marker (where the placeholder is filled in), and the marker's text."""

    def __init__(self, content: list[tuple[int, int]], marker: tuple[int, int], text: str | None,
                 png_chunk: int | None = None):
        self.content, self.marker, self.text, self.png_chunk = content, marker, text, png_chunk


def _layout(f, size: int) -> _Layout | None:
    f.seek(0)
    head = f.read(8)
    if head[:4] == b'PAR1':
        return _parquet_layout(f, size)
    if head == b'\x89PNG\r\n\x1a\n':
        return _png_layout(f, size)
    if len(head) == 8:  # safetensors: a little-endian header length, then the JSON header
        (n,) = struct.unpack('<Q', head)
        if n <= 100 << 20 and 8 + n <= size:
            try:
                header = json.loads(f.read(n))
            except ValueError:
                header = None
            if isinstance(header, dict):
                text = (header.get('__metadata__') or {}).get(MARKER_KEY)
                return _Layout([(8 + n, size)], (8, 8 + n), text if isinstance(text, str) else None)
    if head[:1] == b'{':  # a JSONL file whose first line is the marker
        f.seek(0)
        first = f.readline(MAX_MARKER_BYTES)
        try:
            json.loads(first)
        except ValueError:
            return None
        return _Layout([(len(first), size)], (0, len(first)), first.decode('utf-8', 'replace'))
    return None


def _parquet_layout(f, size: int) -> _Layout | None:
    """Content: every byte before the footer. The marker is the footer's key-value of that name
    (read by pyarrow); it is found in the footer's bytes by its exact text, after the row groups'
    statistics, so a row that happens to hold the same words is never taken for it."""
    import pyarrow.parquet as pq

    if size < 12:
        return None
    f.seek(size - 8)
    footer_len, magic = struct.unpack('<I4s', f.read(8))
    start = size - 8 - footer_len
    if magic != b'PAR1' or start < 4:
        return None
    f.seek(0)
    raw = (pq.read_metadata(f).metadata or {}).get(MARKER_KEY.encode())
    if raw is None:
        return _Layout([(0, start)], (start, start), None)
    f.seek(start)
    at = f.read(footer_len).rfind(raw)
    if at < 0:
        return None
    return _Layout([(0, start)], (start + at, start + at + len(raw)), raw.decode('utf-8', 'replace'))


def _png_layout(f, size: int) -> _Layout | None:
    pos, content, found = 8, [(0, 8)], None
    while pos + 12 <= size:
        f.seek(pos)
        length, kind = struct.unpack('>I4s', f.read(8))
        end = pos + 12 + length
        if kind == b'tEXt' and found is None and length <= MAX_MARKER_BYTES:
            data = f.read(length)
            key, _, value = data.partition(b'\0')
            if key == MARKER_KEY.encode():
                found = (pos, end, value.decode('latin-1'))
                pos = end
                continue
        content.append((pos, end))
        pos = end
        if kind == b'IEND':
            break
    if found is None:
        return _Layout(content, (0, 0), None)
    return _Layout(content, (found[0], found[1]), found[2], png_chunk=found[0])


def _content_hash(f, ranges: list[tuple[int, int]]) -> str:
    digest = hashlib.sha256()
    for a, b in ranges:
        f.seek(a)
        left = b - a
        while left > 0:
            chunk = f.read(min(left, 1 << 22))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def seal_file(path: str) -> None:
    """Fill in the hash of a marked file's content, in place (same length, so nothing moves;
    a PNG chunk's CRC is recomputed)."""
    with open(path, 'r+b') as f:
        size = os.fstat(f.fileno()).st_size
        layout = _layout(f, size)
        if layout is None or layout.text is None:
            raise RuntimeError(f'{path}: no marker to seal')
        digest = _content_hash(f, layout.content).encode()
        a, b = layout.marker
        f.seek(a)
        region = f.read(b - a)
        at = region.find(PLACEHOLDER.encode())
        if at < 0 or region.find(PLACEHOLDER.encode(), at + 1) >= 0:
            raise RuntimeError(f'{path}: the marker holds no single placeholder to seal')
        region = region[:at] + digest + region[at + len(digest):]
        f.seek(a)
        f.write(region)
        if layout.png_chunk is not None:  # CRC over the chunk's type and data
            f.seek(b - 4)
            f.write(struct.pack('>I', zlib.crc32(region[4:-4]) & 0xFFFFFFFF))


def file_marker(path: str) -> dict | None:
    """The marker embedded in a plain file (read through no link), whatever its content."""
    return file_status(path)[0]


def file_status(path: str) -> tuple[dict | None, bool]:
    """(the embedded marker or None, whether the content matches the hash it records)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a FIFO: no wait for a writer
    except OSError:
        return None, False
    try:
        with os.fdopen(fd, 'rb') as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                return None, False
            layout = _layout(f, st.st_size)
            if layout is None or not layout.text:
                return None, False
            info = json.loads(layout.text)
            if not isinstance(info, dict) or info.get('made_by') != MARKER_KEY:
                return None, False
            return info, info.get(CONTENT_KEY) == _content_hash(f, layout.content)
    except Exception:  # noqa: BLE001 - anything unreadable is simply not ours
        return None, False


def file_kind(path: str) -> str | None:
    """The kind of a file the toolkit wrote and nobody changed since, else None."""
    info, intact = file_status(path)
    return info.get('kind') if info and intact else None
