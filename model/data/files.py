"""Parquet inputs: finding the files, the accepted text types, the blank-row rule, reading.

Each rule lives here once and everything else calls it: which column types count as text
(:func:`is_text_type`), how they are read (:func:`as_text`), what a blank row is
(:func:`blank_mask`), how a Parquet file is opened for streaming (:func:`open_parquet`) and
how rows are counted (:func:`count_rows`). Every read goes through model/data/read_guard.py: a
damaged file is one line naming it (and the row group), and a row longer than the record limit
is refused from the footer (and a large row group's page headers) before it is read.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from model.cli import refuse_control_char
from model.errors import UserError
from model.data import read_guard
from model.data.read_guard import ReadGuard, human_size

PAIR_COLUMNS = ('prompt', 'response')  # the guide's data: a prompt and its response per row
TEXT_COLUMN = 'text'  # raw text (encyclopedias, news, books): one document per row
KINDS = {'pairs': PAIR_COLUMNS, 'text': (TEXT_COLUMN,)}  # a file's kind, from the columns it holds
READ_BATCH_ROWS = 8192  # rows per streamed batch: bounded memory, big enough for vectorised work


def _only_files(found: list[str], how: str, rule: str) -> list[str]:
    """found, when every entry is a readable file; else one line naming the first that is not:
    a FIFO would block the reader, a folder is not one file, a dangling link is not skipped."""
    for path in found:
        refuse_control_char(path, 'a data file ')
        if not os.path.isfile(path):
            what = ('a link to nothing, or in a loop' if os.path.islink(path) and not os.path.exists(path)
                    else 'not a regular file')
            raise UserError(f'{path}: {how}{what}; {rule}')
    return found


def resolve_parquet_files(spec: str | os.PathLike | list | tuple) -> list[str]:
    """A file, a folder (its *.parquet), a glob, or a list of those -> sorted file list."""
    if isinstance(spec, (list, tuple)):
        out: list[str] = []
        for s in spec:
            out.extend(resolve_parquet_files(s))
        return out
    spec = os.fspath(spec)
    if os.path.isdir(spec):
        found = sorted(glob.glob(os.path.join(spec, '*.parquet')))
        if not found:
            raise UserError(f'{spec}: folder holds no *.parquet files')
        return _only_files(found, '', 'a folder given as input must hold only Parquet files named *.parquet '
                                      '(move it away, or give the files)')
    if any(ch in spec for ch in '*?['):
        found = sorted(glob.glob(spec))
        if not found:
            raise UserError(f'{spec}: no file matches this pattern')
        return _only_files(found, f'matches {spec} but is ', 'a pattern given as input must match only Parquet '
                                                             'files (remove it, or narrow the pattern)')
    if not os.path.exists(spec):
        raise UserError(f'{spec}: no such file')
    if not os.path.isfile(spec):
        raise UserError(f'{spec}: not a regular file')
    return [spec]


# --------------------------------------------------------------------------- text types


def is_text_type(typ: pa.DataType) -> bool:
    """Column types read as text: every way pandas or pyarrow writes a string column
    (string, large_string, string_view, dictionary-encoded 'category', all-null)."""
    if pa.types.is_dictionary(typ):
        return is_text_type(typ.value_type)
    return (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_null(typ)
            or typ == pa.string_view())


def as_text(array: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """An accepted text column as plain string (large_string stays: int32 offsets end at 2 GiB)."""
    typ = array.type
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return array
    if pa.types.is_dictionary(typ) and pa.types.is_large_string(typ.value_type):
        return array.cast(pa.large_string())
    return array.cast(pa.string())


def blank_mask(texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """True where a text is null, empty or whitespace only (Unicode White_Space, full-width
    spaces included): the one definition of a row the toolkit cannot train on."""
    texts = as_text(texts)
    # utf8_is_space is False for '' and null, hence the other two tests
    blank = pc.or_(pc.utf8_is_space(texts), pc.equal(pc.binary_length(texts), 0))
    return np.asarray(pc.fill_null(blank, True).to_numpy(zero_copy_only=False), dtype=bool)


def usable_mask(table: pa.Table | pa.RecordBatch) -> np.ndarray:
    """Rows none of whose columns of its kind (prompt and response, or text) is blank."""
    mask = np.ones(table.num_rows, dtype=bool)
    for name in KINDS[kind_of(table.schema.names)]:
        mask &= ~blank_mask(table.column(name))
    return mask


def kind_of(names) -> str | None:
    """'pairs' when the columns hold prompt and response, else 'text' when they hold text, else
    None. Pairs win: a file holding both is the guide's data with an extra column."""
    for kind, columns in KINDS.items():
        if all(c in names for c in columns):
            return kind
    return None


def kind_missing_error(path: str, names) -> UserError:
    return UserError(f'{path}: no prompt and response columns, and no text column (has: {show_names(names)}); '
                     f'make one with: python prepare_data.py convert {path} OUT.parquet '
                     f'--prompt_col=... --response_col=... (pairs), or --text_col=... (raw text)')


# --------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class ParquetInfo:
    path: str
    num_rows: int
    row_group_rows: tuple[int, ...]  # rows of each row group, in file order
    size_bytes: int
    columns: tuple[str, ...] = PAIR_COLUMNS  # the text columns read (those of its kind, or those asked for)

    @property
    def kind(self) -> str | None:
        return kind_of(self.columns)


SOURCE_SUFFIXES = ('.txt', '.jsonl', '.ndjson', '.json', '.csv', '.tsv', '.tab')  # what prepare_data.py convert reads


def _column_flags(path: str) -> str:
    """The column flags convert needs for a source file: none where its first record already
    names prompt and response, or text (read from its first line only); else the placeholders."""
    import json

    ask = ' --prompt_col=... --response_col=... (or --text_col=...)'
    try:
        with open(path, encoding='utf-8-sig', errors='replace') as f:
            first = f.readline(1 << 16).strip()
    except OSError:
        return ask
    from model.prep.readers import DELIMITERS, infer_format  # convert's own reading of the name

    fmt = infer_format(path)
    if fmt in DELIMITERS:
        names = {n.strip().strip('"') for n in first.split(DELIMITERS[fmt])}
    elif fmt == 'jsonl':
        try:
            record = json.loads(first)
        except ValueError:
            return ask
        names = set(record) if isinstance(record, dict) else set()
    else:
        return ask
    return '' if {'prompt', 'response'} <= names or 'text' in names else ask


def inspect_parquet(path: str, columns=None) -> ParquetInfo:
    """Row counts and a column check from the footer alone (no data is read). columns: those
    that must be there; None: those of the file's kind (prompt and response, or text)."""
    if path.lower().endswith(SOURCE_SUFFIXES):
        raise UserError(f'{path}: training reads Parquet; convert it first: python prepare_data.py convert {path} '
                        f'{os.path.splitext(path)[0]}.parquet' + (' (one document a line)' if path.lower().endswith('.txt')
                                                                   else _column_flags(path)))
    with ReadGuard(path):
        pf = pq.ParquetFile(path)
        if columns is None:
            names = pf.schema_arrow.names
            kind = kind_of(names) or ('pairs' if any(c in names for c in PAIR_COLUMNS) else None)
            if kind is None:  # one of prompt and response there: the check below names the other
                raise kind_missing_error(path, names)
            columns = KINDS[kind]
        columns = tuple(columns)
        check_text_columns(path, pf.schema_arrow, columns, 'cast it to string before writing the file')
        md = pf.metadata
        rg = tuple(md.row_group(i).num_rows for i in range(md.num_row_groups))
        check_row_group_sizes(path, pf, columns, f'rewrite it with: python prepare_data.py convert {path} OUT.parquet')
        return ParquetInfo(path=path, num_rows=md.num_rows, row_group_rows=rg,
                           size_bytes=os.path.getsize(path), columns=columns)


def row_group_table(files: list[str], columns=None) -> tuple[list[tuple[int, int, int, int]], int]:
    """(file, row group, rows, global first row) of every non-empty row group, files in list
    order (checked by their footers), and the rows of all: what an epoch's order is made from."""
    table, first = [], 0
    for fi, f in enumerate(files):
        for rg, n in enumerate(inspect_parquet(f, columns).row_group_rows):
            if n:
                table.append((fi, rg, n, first))
            first += n
    return table, first


def files_kind(files: list[str], what: str) -> str:
    """The one kind of all the files (pairs or text); mixed kinds are one line naming two files."""
    kinds = {}
    for f in files:
        kinds.setdefault(inspect_parquet(f).kind, f)
    if len(kinds) > 1:
        (k1, f1), (k2, f2) = list(kinds.items())[:2]
        raise UserError(f'{what}: {f1} holds {describe_kind(k1)} but {f2} holds {describe_kind(k2)}; '
                        f'give files of one kind')
    return next(iter(kinds))


def describe_kind(kind: str) -> str:
    return 'prompt/response pairs' if kind == 'pairs' else 'raw text (a text column)'


def check_text_columns(path: str, schema: pa.Schema, columns, cast_fix: str, rename_fix: str = '') -> None:
    """Each column there once, and text."""
    rename_fix = rename_fix or (f'rename it with: python prepare_data.py convert {path} OUT.parquet '
                                f'--prompt_col=... --response_col=...')
    for col in columns:
        found = schema.names.count(col)
        if found == 0:
            raise UserError(f'{path}: missing column {col!r} (has: {show_names(schema.names)}); {rename_fix}')
        if found > 1:
            raise UserError(f'{path}: column {col!r} appears {found} times; write the file again with '
                            f'one column of each name')
        typ = schema.field(col).type
        if not is_text_type(typ):
            raise UserError(f'{path}: column {col!r} is {typ}, expected text (string); {cast_fix}')


def show_names(names) -> str:
    """Column or field names for a message, each quoted: where one name ends shows (a header
    read as one column by the wrong delimiter: 'prompt;response'), and a tab, a NUL or other
    invisible characters show as escapes."""
    return ', '.join(repr(str(n)) for n in names) or 'none'


def row_group_text_bytes(pf: pq.ParquetFile, columns=PAIR_COLUMNS) -> list[int]:
    """Uncompressed bytes of the columns in each row group, from the footer."""
    md = pf.metadata
    names = set(columns)
    sizes = []
    for i in range(md.num_row_groups):
        group = md.row_group(i)
        sizes.append(sum(group.column(j).total_uncompressed_size for j in range(group.num_columns)
                         if group.column(j).path_in_schema in names))  # text columns are flat
    return sizes


def check_row_group_sizes(path: str, pf: pq.ParquetFile, columns, fix: str) -> list[int]:
    """Every row of every row group fits the record limit, from the footer and, for a row group
    over MAX_ROW_GROUP_TEXT_BYTES, its page headers (a page holds whole values; no page is
    read): a big row group of ordinary rows is fine (readers stream it in slices), one huge value
    is not. Returns the row groups' text bytes."""
    limit = read_guard.MAX_RECORD_BYTES
    md = pf.metadata
    sizes = row_group_text_bytes(pf, columns)
    for i, size in enumerate(sizes):
        rows = md.row_group(i).num_rows
        if rows and size > rows * limit:
            raise UserError(f'{path}: row group {i} holds {human_size(size)} of text in {rows} row(s), more than '
                            f'{human_size(limit)} a row (read_guard.MAX_RECORD_BYTES); {fix}')
        page = largest_page_bytes(path, i, columns) if size > read_guard.MAX_ROW_GROUP_TEXT_BYTES else None
        if page and page > read_guard.MAX_ROW_GROUP_TEXT_BYTES:
            raise UserError(f'{path}: row group {i} holds a page of {human_size(page)}, more than the '
                            f'{human_size(read_guard.MAX_ROW_GROUP_TEXT_BYTES)} one read may hold '
                            f'(read_guard.MAX_ROW_GROUP_TEXT_BYTES): a value that long, or a writer\'s page size; '
                            f'write the file again with pages of ~1 MB (pyarrow\'s default), without such values')
    return sizes


def largest_page_bytes(path: str, row_group: int, columns=PAIR_COLUMNS) -> int | None:
    """The largest uncompressed page of the columns in a row group, from the page headers
    (a few bytes each, no page is read); None when they cannot be walked (then nothing is
    known). A page holds whole values: one huge value is one huge page, whatever the row group."""
    try:
        md = pq.ParquetFile(path).metadata.row_group(row_group)
        chunks = [md.column(j) for j in range(md.num_columns) if md.column(j).path_in_schema in set(columns)]
        largest = 0
        with open(path, 'rb') as f:
            for chunk in chunks:
                start = chunk.data_page_offset
                if chunk.has_dictionary_page and 0 < chunk.dictionary_page_offset < start:
                    start = chunk.dictionary_page_offset
                pos, end = start, start + chunk.total_compressed_size
                while pos < end:
                    f.seek(pos)
                    header = _ThriftCompact(f)
                    fields = header.struct_fields()
                    largest = max(largest, fields[2])
                    pos += header.consumed + fields[3]
        return largest
    except Exception:  # noqa: BLE001 - an unusual or damaged file: the real read decides
        return None


class _ThriftCompact:
    """Just enough of Thrift's compact protocol to read a Parquet PageHeader's sizes (fields 2
    and 3, i32) and skip the rest of it; a long binary (statistics) is skipped, not read."""

    def __init__(self, f):
        self.f, self.consumed = f, 0

    def byte(self) -> int:
        b = self.f.read(1)
        if not b:
            raise EOFError('page header cut short')
        self.consumed += 1
        return b[0]

    def varint(self) -> int:
        shift = value = 0
        while True:
            b = self.byte()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def struct_fields(self) -> dict[int, int]:
        """The integer fields of a struct by id (other fields skipped)."""
        out, field = {}, 0
        while True:
            head = self.byte()
            kind = head & 0x0F
            if kind == 0:
                return out
            field = field + (head >> 4) if head >> 4 else self.zigzag()
            if kind in (4, 5, 6):
                out[field] = self.zigzag()
            else:
                self.skip(kind)

    def skip(self, kind: int) -> None:
        if kind in (1, 2):  # booleans live in the type
            return
        if kind == 3:
            self.byte()
        elif kind in (4, 5, 6):
            self.varint()
        elif kind == 7:
            self.f.seek(8, 1)
            self.consumed += 8
        elif kind == 8:
            n = self.varint()
            self.f.seek(n, 1)
            self.consumed += n
        elif kind in (9, 10):
            head = self.byte()
            size = head >> 4 if head >> 4 != 15 else self.varint()
            for _ in range(size):
                self.byte() if head & 0x0F in (1, 2) else self.skip(head & 0x0F)
        elif kind == 11:
            size = self.varint()
            types = self.byte() if size else 0
            for _ in range(size):
                self.skip(types >> 4)
                self.skip(types & 0x0F)
        elif kind == 12:
            self.struct_fields()
        else:
            raise ValueError(f'thrift type {kind}')


def count_rows(spec) -> int:
    """Rows of every file of spec, from the footers."""
    return sum(inspect_parquet(p).num_rows for p in resolve_parquet_files(spec))


# --------------------------------------------------------------------------- reading


def open_parquet(path: str, buffer_size: int = 1 << 20) -> pq.ParquetFile:
    """A reader whose memory stays at one batch while iterating.

    With pyarrow's default pre_buffer=True, iter_batches kept every row group it had read
    (an 860 MB file: 832 MB of Arrow memory at the end) and fetched a whole column chunk
    before the first batch; buffered page reads hold ~14 MB instead, at the same speed.
    """
    with ReadGuard(path):
        return pq.ParquetFile(path, pre_buffer=False, buffer_size=buffer_size)


def iter_text_tables(spec, columns=None, batch_rows: int = READ_BATCH_ROWS):
    """Tables of at most batch_rows rows of the columns (as text), streamed from every file;
    columns None: each file's kind's (prompt and response, or text)."""
    for path in resolve_parquet_files(spec):
        names = inspect_parquet(path, columns).columns
        yield from iter_file_batches(path, names, batch_rows, lambda batch, names=names: pa.Table.from_arrays(
            [as_text(batch.column(c)) for c in names], names=list(names)))


def iter_file_batches(path: str, columns, batch_rows: int, convert=lambda batch: batch):
    """convert(batch) of the record batches of one file, row group by row group, a failure
    naming the row group."""
    pf = open_parquet(path)
    with ReadGuard(path) as guard:
        for i in range(pf.metadata.num_row_groups):
            guard.at(f'row group {i}')
            rows = 0
            for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[i], columns=list(columns)):
                check_utf8(batch)
                rows += batch.num_rows
                yield convert(batch)
            if rows != pf.metadata.row_group(i).num_rows:
                raise short_read_error(path, i, rows, pf.metadata.row_group(i).num_rows)


def short_read_error(path: str, row_group: int, rows: int, expected: int) -> UserError:
    """pyarrow reads a row group whose pages lie past the end of the file as empty, silently."""
    return UserError(f'{path}: row group {row_group}: {rows} of its {expected} rows could be read: the file was '
                     f'cut short or changed while it was read; write or copy it again')


def check_utf8(batch: pa.RecordBatch) -> None:
    """ArrowInvalid unless every string is UTF-8: Parquet readers take the bytes as they are,
    and Python would fail on them later, far from the file (Arrow's check runs at GB/s)."""
    for column in batch.columns:
        column.validate(full=True)


def iter_usable_rows(spec, limit: int):
    """(prompt, response) -- or (text,) for raw text -- of the first `limit` usable rows, in file order."""
    found = 0
    for table in iter_text_tables(spec, batch_rows=max(64, min(limit, READ_BATCH_ROWS))):
        table = table.filter(pa.array(usable_mask(table)))
        for pair in zip(*(table.column(c).to_pylist() for c in table.column_names)):
            yield pair
            found += 1
            if found >= limit:
                return


def check_usable_rows(spec, what: str, shown=None) -> None:
    """UserError unless some row has a non-blank prompt and response, or text (stops at the first)."""
    if next(iter_usable_rows(spec, 1), None) is None:
        shown = shown or (spec if isinstance(spec, str) else ' '.join(map(str, spec)))
        raise UserError(f'{what}: {shown}: no usable row (every row has a null, empty or '
                        f'whitespace-only prompt or response, or text); check it with: '
                        f'python prepare_data.py check {shown}')
