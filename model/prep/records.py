"""What every reader of prepare_data.py builds on: the encoding checks (UTF-8, no UTF-16/32),
and records -> prompt/response tables of ``BATCH_ROWS`` rows (:class:`RecordBatcher`), each
record's text bounded as it comes.
"""

from __future__ import annotations

import codecs
import os
import math
from typing import Any, Iterator

import pyarrow as pa

from model.errors import UserError
from model.data.files import show_names

from model.prep.output import BATCH_ROWS, OUTPUT_SCHEMA

READ_CHUNK_BYTES = 1 << 20  # read size of the JSON parser and the UTF-8 scanner
BATCH_TEXT_BYTES = 16 << 20  # a batch of records is handed on at this much text, even if short of BATCH_ROWS
RECORD_FIX = 'no training row is that long: split or drop such records before converting'
BOM = codecs.BOM_UTF8


# --------------------------------------------------------------------------- UTF-8


def find_bad_utf8(path: str) -> tuple[int, int, bytes] | None:
    """(line, byte offset, bad bytes) of the first invalid UTF-8 in a file, or None."""
    line, offset, pending = 1, 0, b''
    with open(path, 'rb') as f:
        while True:
            chunk = f.read(READ_CHUNK_BYTES)
            data = pending + chunk
            try:
                # final=False leaves a character cut by the chunk boundary for the next read
                _, used = codecs.utf_8_decode(data, 'strict', not chunk)
            except UnicodeDecodeError as e:
                return line + data.count(b'\n', 0, e.start), offset + e.start, data[e.start:e.end]
            line += data.count(b'\n', 0, used)
            offset += used
            pending = data[used:]
            if not chunk:
                return None


def build_utf8_error(path: str) -> UserError:
    found = find_bad_utf8(path)
    if found and found[1] + len(found[2]) == os.path.getsize(path):
        return UserError(f'{path}: line {found[0]}: the file ends inside a character (byte 0x{found[2].hex()}): '
                         f'it was cut short; copy or write it again')
    where = f'line {found[0]}: byte 0x{found[2].hex()} at offset {found[1]}' if found else 'somewhere'
    stem, ext = os.path.splitext(path)
    return UserError(f'{path}: {where} is not UTF-8 (a GBK file?); convert it first, e.g. '
                     f'iconv -f GBK -t UTF-8 {path} > {stem}.utf8{ext}')


_WIDE_BOMS = ((codecs.BOM_UTF32_LE, 'UTF-32'), (codecs.BOM_UTF32_BE, 'UTF-32'),
              (codecs.BOM_UTF16_LE, 'UTF-16'), (codecs.BOM_UTF16_BE, 'UTF-16'))


def check_not_wide_unicode(path: str) -> None:
    """A text file saved as UTF-16 or UTF-32 (Windows' "Unicode") says so in its first bytes."""
    with open(path, 'rb') as f:
        head = f.read(4)
    for bom, name in _WIDE_BOMS:
        if head.startswith(bom):
            stem, ext = os.path.splitext(path)
            raise UserError(f'{path}: the file is {name} (it starts with a {name} byte-order mark), not UTF-8; '
                            f'convert it first, e.g. iconv -f {name} -t UTF-8 {path} > {stem}.utf8{ext}')


# --------------------------------------------------------------------------- records


def _to_text(value: Any) -> str | None:
    """A JSON value as text: numbers become str, null (and NaN) stay null (clean drops them);
    a list or an object is a TypeError naming what it is."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, float) and math.isnan(value):
        return None  # json.dump writes a missing float as NaN
    if isinstance(value, (int, float)) or type(value).__name__ == 'Decimal':
        return str(value)
    raise TypeError('a list' if isinstance(value, list) else 'an object')


class RecordBatcher:
    """Collects (prompt, response) of JSON records into tables of BATCH_ROWS rows. A record is
    an object, or a list when the columns are given as positions (--prompt_col=0)."""

    def __init__(self, path: str, prompt_col: str, response_col: str):
        self.path, self.keys = path, (prompt_col, response_col)
        self.prompts: list[str | None] = []
        self.responses: list[str | None] = []
        self.wheres: list = []  # to name a record Arrow refuses (a lone surrogate)
        self.chars = 0

    def add(self, record: Any, where) -> pa.Table | None:
        """where: a string, or a function giving one (called only to report an error)."""
        if isinstance(record, list) and all(k.isdigit() for k in self.keys):
            record = dict(enumerate(record))
            keys = tuple(int(k) for k in self.keys)
        elif isinstance(record, list):
            raise UserError(f'{self.path}: {place(where)}: a row is a list, which has no column names; pass the '
                            f'positions of the columns, e.g. --prompt_col=0 --response_col=1')
        elif not isinstance(record, dict):
            raise UserError(f'{self.path}: {place(where)}: expected a JSON object, got {type(record).__name__}')
        else:
            keys = self.keys
        for key in keys:
            if key not in record:
                raise UserError(f'{self.path}: {place(where)}: record has no field {key!r} '
                                f'(has: {show_names(record)}); '
                                f'pass --prompt_col=... --response_col=...')
        values = []
        for key in keys:
            try:
                values.append(_to_text(record[key]))
            except TypeError as kind:
                raise UserError(f'{self.path}: {place(where)}: field {key!r} is {kind}, expected text') from None
        self.prompts.append(values[0])
        self.responses.append(values[1])
        self.wheres.append(where)
        self.chars += sum(len(v) for v in values if v is not None)
        # characters, not bytes (no encoding pass): a batch holds at most ~4x BATCH_TEXT_BYTES
        return self.take() if len(self.prompts) >= BATCH_ROWS or self.chars >= BATCH_TEXT_BYTES else None

    def take(self) -> pa.Table:
        try:
            table = pa.Table.from_arrays([pa.array(self.prompts, pa.string()),
                                          pa.array(self.responses, pa.string())], schema=OUTPUT_SCHEMA)
        except UnicodeEncodeError:
            raise self._not_unicode() from None
        self.prompts, self.responses, self.wheres, self.chars = [], [], [], 0
        return table

    def _not_unicode(self) -> UserError:
        """JSON may escape half of a UTF-16 pair alone (\\ud800): valid JSON, not text."""
        for prompt, response, where in zip(self.prompts, self.responses, self.wheres):
            for key, value in zip(self.keys, (prompt, response)):
                try:
                    (value or '').encode('utf-8')
                except UnicodeEncodeError as e:
                    char = value[e.start]
                    return UserError(f'{self.path}: {place(where)}: field {key!r} holds {ascii(char)}, half of a '
                                     f'UTF-16 surrogate pair, which is not text; write the file again from its source '
                                     f'(or replace the escape with the whole character)')
        return UserError(f'{self.path}: a field is not valid Unicode text')


def place(where) -> str:
    return where() if callable(where) else where


def tables(path: str, prompt_col: str, response_col: str, records) -> Iterator[pa.Table]:
    """records: (record, where) pairs -> tables of BATCH_ROWS rows (and a last, shorter one)."""
    batcher = RecordBatcher(path, prompt_col, response_col)
    for record, where in records:
        table = batcher.add(record, where)
        if table is not None:
            yield table
    yield batcher.take()
