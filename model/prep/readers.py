"""Readers of the formats `prepare_data.py convert` takes, each yielding prompt/response tables.

CSV (pyarrow) and Parquet here, JSONL and JSON in model/prep/json_readers.py, on the shared parts here:
the format, the encoding checks and the record batcher. Everything streams: memory holds one
batch of rows, whatever the file size. Every reader runs under model/data/read_guard.py's guard
(whatever a parser raises on malformed content is one line naming the file), and a record over
``MAX_RECORD_BYTES`` is refused as it streams, before it is whole.
"""

from __future__ import annotations

import codecs
import math
import os
from typing import Any, Iterator

import pyarrow as pa

from model.errors import UserError
from model.data import read_guard
from model.data.files import as_text, check_row_group_sizes, check_text_columns, iter_file_batches, open_parquet, show_names
from model.prep.output import BATCH_ROWS, OUTPUT_SCHEMA
from model.data.read_guard import guarded, human_size, too_long

READ_CHUNK_BYTES = 1 << 20  # read size of the JSON parser and the UTF-8 scanner
BATCH_TEXT_BYTES = 16 << 20  # a batch of records is handed on at this much text, even if short of BATCH_ROWS
RECORD_FIX = 'no training row is that long: split or drop such records before converting'
FORMATS = ('csv', 'json', 'jsonl', 'parquet')
_EXTENSIONS = {'.csv': 'csv', '.json': 'json', '.jsonl': 'jsonl', '.ndjson': 'jsonl',
               '.parquet': 'parquet', '.pq': 'parquet'}
_BOM = codecs.BOM_UTF8


def infer_format(path: str, input_format: str | None = None) -> str:
    if input_format is not None:
        fmt = str(input_format).lower().lstrip('.')
        if fmt not in FORMATS:
            raise UserError(f'--format={input_format}: choose one of {", ".join(FORMATS)}')
        return fmt
    ext = os.path.splitext(path)[1].lower()
    if ext not in _EXTENSIONS:
        raise UserError(f'{path}: cannot tell the format from the extension {ext!r}; '
                        f'pass --format={"|".join(FORMATS)}')
    return _EXTENSIONS[ext]


def iter_input_tables(path: str, prompt_col: str = 'prompt', response_col: str = 'response',
                      input_format: str | None = None) -> Iterator[pa.Table]:
    """prompt/response tables of any supported file, streamed."""
    if not os.path.exists(path):
        raise UserError(f'{path}: no such file')
    if not os.path.isfile(path):
        raise UserError(f'{path}: not a regular file (a folder, a FIFO or a device); give a file')
    from model.prep.json_readers import iter_json, iter_jsonl  # they build on the records below

    readers = {'csv': iter_csv, 'json': iter_json, 'jsonl': iter_jsonl, 'parquet': iter_parquet_columns}
    fmt = infer_format(path, input_format)

    def tables():
        if fmt != 'parquet':
            check_not_wide_unicode(path)
        return readers[fmt](path, prompt_col, response_col)

    return guarded(path, tables)


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
            raise UserError(f'{self.path}: {_where(where)}: a row is a list, which has no column names; pass the '
                            f'positions of the columns, e.g. --prompt_col=0 --response_col=1')
        elif not isinstance(record, dict):
            raise UserError(f'{self.path}: {_where(where)}: expected a JSON object, got {type(record).__name__}')
        else:
            keys = self.keys
        for key in keys:
            if key not in record:
                raise UserError(f'{self.path}: {_where(where)}: record has no field {key!r} '
                                f'(has: {show_names(record)}); '
                                f'pass --prompt_col=... --response_col=...')
        values = []
        for key in keys:
            try:
                values.append(_to_text(record[key]))
            except TypeError as kind:
                raise UserError(f'{self.path}: {_where(where)}: field {key!r} is {kind}, expected text') from None
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
                    return UserError(f'{self.path}: {_where(where)}: field {key!r} holds {ascii(char)}, half of a '
                                     f'UTF-16 surrogate pair, which is not text; write the file again from its source '
                                     f'(or replace the escape with the whole character)')
        return UserError(f'{self.path}: a field is not valid Unicode text')


def _where(where) -> str:
    return where() if callable(where) else where


def _tables(path: str, prompt_col: str, response_col: str, records) -> Iterator[pa.Table]:
    """records: (record, where) pairs -> tables of BATCH_ROWS rows (and a last, shorter one)."""
    batcher = RecordBatcher(path, prompt_col, response_col)
    for record, where in records:
        table = batcher.add(record, where)
        if table is not None:
            yield table
    yield batcher.take()


# --------------------------------------------------------------------------- CSV, Parquet


def iter_csv(path: str, prompt_col: str, response_col: str) -> Iterator[pa.Table]:
    import pyarrow.csv as pcsv

    parse = pcsv.ParseOptions(newlines_in_values=True)  # multi-line answers are common
    # a row may span one block boundary, not two: the block size bounds a row (and the ~10 blocks
    # pyarrow reads ahead); a row between one and two blocks is refused once read
    limit = read_guard.MAX_RECORD_BYTES
    read = pcsv.ReadOptions(block_size=limit)
    try:
        names = pcsv.open_csv(path, read_options=read, parse_options=parse).schema.names
        _check_columns(path, names, prompt_col, response_col)
        cols = list(dict.fromkeys([prompt_col, response_col]))
        convert = pcsv.ConvertOptions(include_columns=cols, column_types={c: pa.string() for c in cols})
        reader = pcsv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert)
        first_row = 0
        for batch in reader:
            table = pa.Table.from_arrays([batch.column(prompt_col), batch.column(response_col)], schema=OUTPUT_SCHEMA)
            _check_row_bytes(path, table, first_row, limit, 'data row')
            first_row += table.num_rows
            yield table
    except UnicodeDecodeError:  # pyarrow decodes the header names itself
        raise build_utf8_error(path) from None
    except pa.ArrowInvalid as e:
        if 'UTF8' in str(e) or 'UTF-8' in str(e):
            raise build_utf8_error(path) from None
        if 'straddling' in str(e) or 'straddles' in str(e):
            raise UserError(f'{path}: a row is longer than {human_size(read_guard.MAX_RECORD_BYTES)} '
                            f'(read_guard.MAX_RECORD_BYTES), or a quote (") is opened and never closed; close '
                            f'the quote, or split or drop such rows before converting') from None
        raise


def _check_columns(path: str, names: list[str], prompt_col: str, response_col: str) -> None:
    for col in (prompt_col, response_col):
        if col not in names:
            raise UserError(f'{path}: missing column {col!r} (has: {show_names(names)}); '
                            f'pass --prompt_col=... --response_col=...')
        if names.count(col) > 1:  # the reader would take one of them silently
            raise UserError(f'{path}: column {col!r} appears {names.count(col)} times in the header; '
                            f'rename one of them')


def iter_parquet_columns(path: str, prompt_col: str, response_col: str) -> Iterator[pa.Table]:
    """The two columns of any Parquet file, row group by row group. A row group of any size is
    read in batches (this is how a file with too large row groups gets smaller ones), a page at a
    time; a row over MAX_RECORD_BYTES is refused -- from the footer and page headers
    (files.check_row_group_sizes) when they show it, else once read."""
    pf = open_parquet(path)
    cols = list(dict.fromkeys([prompt_col, response_col]))
    check_text_columns(path, pf.schema_arrow, cols, 'cast it to string first',
                       'pass --prompt_col=... --response_col=...')
    limit = read_guard.MAX_RECORD_BYTES
    md = pf.metadata
    batch_rows = BATCH_ROWS
    for i, size in enumerate(check_row_group_sizes(path, pf, cols, RECORD_FIX)):
        if size:  # long rows: fewer of them per batch
            batch_rows = min(batch_rows, max(1, md.row_group(i).num_rows * BATCH_TEXT_BYTES // size))
    first_row = 0
    for batch in iter_file_batches(path, cols, batch_rows):
        table = pa.Table.from_arrays([as_text(batch.column(c)).cast(pa.string()) for c in (prompt_col, response_col)],
                                     schema=OUTPUT_SCHEMA)
        _check_row_bytes(path, table, first_row, limit)
        first_row += table.num_rows
        yield table


def _check_row_bytes(path: str, table: pa.Table, first_row: int, limit: int, what: str = 'row') -> None:
    import pyarrow.compute as pc

    sizes = pc.add(*(pc.fill_null(pc.binary_length(table.column(c)), 0) for c in ('prompt', 'response')))
    if table.num_rows and pc.max(sizes).as_py() > limit:
        row = first_row + int(pc.index(pc.greater(sizes, limit), True).as_py())
        raise too_long(path, f'{what} {row + 1}', 'MAX_RECORD_BYTES', RECORD_FIX)
