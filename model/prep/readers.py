"""Readers of the formats `prepare_data.py convert` takes, each yielding prompt/response tables.

CSV (pyarrow) and Parquet here, JSONL and JSON in model/prep/json_readers.py, all on
model/prep/records.py (the encoding checks and the record batcher). Everything streams: memory
holds one batch of rows, whatever the file size. Every reader runs under model/data/read_guard.py's
guard (whatever a parser raises on malformed content is one line naming the file), and a record
over ``MAX_RECORD_BYTES`` is refused as it streams, before it is whole.
"""

from __future__ import annotations

import os
from typing import Iterator

import pyarrow as pa

from model.errors import UserError
from model.data import read_guard
from model.data.files import as_text, check_row_group_sizes, check_text_columns, iter_file_batches, open_parquet, show_names
from model.prep import records
from model.prep.output import BATCH_ROWS, OUTPUT_SCHEMA
from model.prep.json_readers import iter_json, iter_jsonl
from model.prep.records import RECORD_FIX, build_utf8_error, check_not_wide_unicode
from model.data.read_guard import guarded, human_size, too_long

FORMATS = ('csv', 'json', 'jsonl', 'parquet')
_EXTENSIONS = {'.csv': 'csv', '.json': 'json', '.jsonl': 'jsonl', '.ndjson': 'jsonl',
               '.parquet': 'parquet', '.pq': 'parquet'}


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
    readers = {'csv': iter_csv, 'json': iter_json, 'jsonl': iter_jsonl, 'parquet': iter_parquet_columns}
    fmt = infer_format(path, input_format)

    def tables():
        if fmt != 'parquet':
            check_not_wide_unicode(path)
        return readers[fmt](path, prompt_col, response_col)

    return guarded(path, tables)


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
            batch_rows = min(batch_rows, max(1, md.row_group(i).num_rows * records.BATCH_TEXT_BYTES // size))
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
