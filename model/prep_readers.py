"""Readers of the formats `prepare_data.py convert` takes, each yielding prompt/response tables.

CSV (pyarrow), JSONL (one object per line, Python's json: NaN and Infinity accepted), JSON
(streamed with ijson: a list of objects, and every layout pandas' ``to_json`` writes:
records, index, columns, split, table) and Parquet. Everything streams: memory holds one
batch of rows, whatever the file size. Errors name the file and the line (JSON lists: the
element and its line, found by a second, error-only pass). Every reader runs under
model/read_guard.py's guard (whatever a parser raises on malformed content is one line naming
the file), and a record over ``MAX_RECORD_BYTES`` is refused as it streams, before it is whole.
"""

from __future__ import annotations

import codecs
import itertools
import json
import math
import os
import re
from typing import Any, Iterator

import pyarrow as pa

from config import UserError
from model import read_guard
from model.files import as_text, check_text_columns, iter_file_batches, open_parquet, row_group_text_bytes, show_names
from model.prep_output import BATCH_ROWS, OUTPUT_SCHEMA
from model.read_guard import ReadBudget, guarded, human_size, iter_bounded_lines, too_long

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
                raise UserError(f'{self.path}: {_where(where)}: record has no field {key!r} (has: {show_names(record)}); '
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


# --------------------------------------------------------------------------- JSONL


def iter_jsonl(path: str, prompt_col: str, response_col: str, hint: str = '') -> Iterator[pa.Table]:
    return _tables(path, prompt_col, response_col, _jsonl_records(path, hint))


def _jsonl_records(path: str, hint: str = ''):
    decoder = json.JSONDecoder(strict=False)  # tolerate raw tabs/newlines inside strings
    with open(path, 'rb') as f:
        for line_no, (raw, whole) in enumerate(iter_bounded_lines(f, read_guard.MAX_RECORD_BYTES), start=1):
            if not whole:
                raise too_long(path, f'line {line_no}', 'MAX_RECORD_BYTES', RECORD_FIX)
            try:
                text = raw.decode('utf-8-sig' if line_no == 1 else 'utf-8')
            except UnicodeDecodeError:
                raise build_utf8_error(path) from None
            if not text.strip():
                continue
            try:
                record = decoder.decode(text)
            except json.JSONDecodeError as e:
                raise UserError(f'{path}: line {line_no}: malformed JSON ({e.msg} at column '
                                f'{e.colno}){hint}') from None
            yield record, f'line {line_no}'


# --------------------------------------------------------------------------- JSON


def _open_json(path: str):
    """The file, positioned after a UTF-8 BOM (yajl refuses one)."""
    f = open(path, 'rb')
    if f.read(3) != _BOM:
        f.seek(0)
    return f


def _first_char(path: str) -> str:
    with _open_json(path) as f:
        while True:
            chunk = f.read(4096)
            if not chunk:
                return ''
            stripped = chunk.lstrip()
            if stripped:
                return stripped[:1].decode('latin-1')


def iter_json(path: str, prompt_col: str, response_col: str) -> Iterator[pa.Table]:
    """A JSON list of objects, any layout pandas' to_json writes, or JSONL saved as .json."""
    first = _first_char(path)
    if first == '[':
        return _tables(path, prompt_col, response_col, _list_records(path, 'item'))
    if first == '{':
        if _is_jsonl(path):
            hint = '; a .json file must hold one JSON value, or one object per line (JSONL)'
            return iter_jsonl(path, prompt_col, response_col, hint=hint)
        return _tables(path, prompt_col, response_col, _object_records(path, prompt_col, response_col))
    found = 'an empty file' if first == '' else f'{first!r}'
    raise UserError(f'{path}: line 1: expected a JSON list of objects ("[{{...}}, ...]") or an object, '
                    f'found {found}')


def _is_jsonl(path: str) -> bool:
    """The first line is a whole JSON object and another value follows it."""
    with _open_json(path) as f:
        first, whole = next(iter_bounded_lines(f, read_guard.MAX_RECORD_BYTES), (b'', True))
        try:
            json.loads(first)
        except ValueError:
            return False
        return whole and any(line.strip() for line, _ in itertools.islice(iter_bounded_lines(f, READ_CHUNK_BYTES), 1000))


def _ijson_events(path: str, items, describe, locate=None):
    """Iterate an ijson generator, turning its errors into one line with the line number
    (locate(): where the item being parsed starts, for errors the offset pass does not see)."""
    import ijson

    try:
        yield from items
    except ijson.JSONError as e:
        if 'UTF8' in describe(e) or 'UTF-8' in describe(e):  # yajl checks the encoding itself
            raise build_utf8_error(path) from None
        where = _syntax_error_where(path) or (locate() if locate else None)
        where = where or f'line {_line_at(path, -1)[0]} (the end of the file)'
        raise UserError(f'{path}: {where}: malformed JSON ({describe(e)})') from None
    except UnicodeDecodeError:
        raise build_utf8_error(path) from None


def _records(path: str, parse, where, locate=None):
    """The items ijson's parse(file) yields, each refused while it streams once it passes
    MAX_RECORD_BYTES (ijson holds a value until it is whole); where(i) names item i, and
    locate(i), if given, finds its line (a second pass, for a syntax error in it)."""
    taken = 0

    def refuse() -> UserError:
        return too_long(path, where(taken), 'MAX_RECORD_BYTES', RECORD_FIX)

    with _open_json(path) as f:
        budget = ReadBudget(f, read_guard.MAX_RECORD_BYTES, refuse)
        found = (lambda: f'{where(taken)} ({locate(taken)})') if locate else None
        for item in _ijson_events(path, parse(budget), _short, found):
            budget.took_record()
            taken += 1
            yield item


def _list_records(path: str, prefix: str):
    import ijson

    def where(i):
        return f'element {i + 1} of the list'

    items = _records(path, lambda f: ijson.items(f, prefix, buf_size=READ_CHUNK_BYTES, use_float=True), where,
                     lambda i: _element_line(path, i))
    for i, record in enumerate(items):
        yield record, lambda i=i: f'{where(i)} ({_element_line(path, i)})'
def _object_records(path: str, prompt_col: str, response_col: str):
    """The layouts of a top-level object, told apart by its first keys and their values."""
    import ijson

    keys: dict[str, str] = {}  # top-level key -> the event its value starts with
    pending = None
    for prefix, event, value in _records(path, lambda f: ijson.parse(f, buf_size=READ_CHUNK_BYTES),
                                         lambda i: 'the top-level object'):
        if prefix == '' and event == 'map_key':
            pending = value
        elif pending is not None and prefix == pending:
            keys[pending] = event
            # a list that is not a split's column names or index decides the layout: stop before
            # reading through it
            if len(keys) >= 3 or keys.keys() >= {prompt_col, response_col} or (
                    event == 'start_array' and pending not in ('columns', 'index')):
                break
            pending = None
    if keys.get('columns') == 'start_array' and 'data' in keys:  # orient='split'
        yield from _split_records(path)
    elif keys.get(prompt_col) == 'start_map':  # orient='columns' (pandas' default)
        yield from _column_records(path, prompt_col, response_col)
    elif keys and all(event == 'start_map' for event in keys.values()):  # orient='index'
        items = _records(path, lambda f: ijson.kvitems(f, '', buf_size=READ_CHUNK_BYTES, use_float=True),
                         lambda i: f'record {i + 1} of the object')
        for key, record in items:
            yield record, f'record {key!r}'
    elif any(event == 'start_array' for event in keys.values()):  # {"data": [...]}, orient='table'
        key = next(k for k, event in keys.items() if event == 'start_array')
        yield from _list_records(path, f'{key}.item')
    else:  # one record
        items = _records(path, lambda f: ijson.items(f, '', buf_size=READ_CHUNK_BYTES, use_float=True),
                         lambda i: 'the object')
        # the second take lets the parser see what follows: another value is an error, not dropped
        for record in itertools.islice(items, 2):
            yield record, 'the object'


def _column_records(path: str, prompt_col: str, response_col: str):
    """{"prompt": {"0": ..}, "response": {"0": ..}}: two streamed passes, zipped by index."""
    import ijson

    def column(name):
        return _records(path, lambda f: ijson.kvitems(f, name, buf_size=READ_CHUNK_BYTES, use_float=True),
                        lambda i: f'row {i + 1} of column {name!r}')

    for (kp, p), (kr, r) in itertools.zip_longest(column(prompt_col), column(response_col),
                                                  fillvalue=(None, None)):
        if kp != kr:
            raise UserError(f'{path}: the columns {prompt_col!r} and {response_col!r} hold different '
                            f'row indices ({kp!r} and {kr!r})')
        yield {prompt_col: p, response_col: r}, f'row {kp!r}'


def _split_records(path: str):
    """{"columns": [...], "index": [...], "data": [[...], ...]} (orient='split')."""
    import ijson

    columns = next(iter(_records(path, lambda f: ijson.items(f, 'columns', buf_size=READ_CHUNK_BYTES),
                                 lambda i: 'the list of columns')))
    rows = _records(path, lambda f: ijson.items(f, 'data.item', buf_size=READ_CHUNK_BYTES, use_float=True),
                    lambda i: f'data row {i + 1}')
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            raise UserError(f'{path}: data row {i + 1}: expected a list of values (orient=\'split\'), '
                            f'got {type(row).__name__}')
        yield dict(zip(columns, row)), f'data row {i + 1}'


def _short(e: Exception) -> str:
    text = e.args[0] if e.args and isinstance(e.args[0], bytes) else str(e)  # yajl's messages are bytes
    if isinstance(text, bytes):
        text = text.decode('utf-8', 'replace')
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


class _GiveUp(Exception):
    """An error-only pass met a lexeme too long to hold: no position to report."""


def _lexeme_budget(f) -> ReadBudget:
    return ReadBudget(f, read_guard.MAX_RECORD_BYTES, _GiveUp)


def _syntax_error_where(path: str) -> str | None:
    """'line N' of the first syntax error: ijson's pure-Python parser reports its offset
    (None: it found none, being laxer than yajl about escapes and control characters)."""
    from ijson.backends import python as slow

    try:
        with _open_json(path) as f:
            budget = _lexeme_budget(f)
            for _ in slow.basic_parse(budget, buf_size=READ_CHUNK_BYTES):
                budget.took_record()
    except _GiveUp:
        return None
    except Exception as e:  # noqa: BLE001 - the error we came for
        m = re.search(r' at (\d+)', str(e))
        if m:
            line, token = _line_at(path, int(m.group(1)))
            if token.startswith(('NaN', 'Infinity', '-Infinity')):
                word = re.match(r'-?\w+', token).group()
                return (f'line {line}: {word} is not JSON (json.dump writes it for a missing float; '
                        f'write null instead, e.g. with pandas to_json, or save as JSONL)')
            return f'line {line}'
    return None


def _line_at(path: str, offset: int) -> tuple[int, str]:
    """(line number, the next few characters) at a character offset of the text (-1: the end),
    streamed."""
    decoder = codecs.getincrementaldecoder('utf-8')('replace')
    seen, line = 0, 1
    with _open_json(path) as f:
        for chunk in iter(lambda: f.read(READ_CHUNK_BYTES), b''):
            text = decoder.decode(chunk)
            if 0 <= offset < seen + len(text):
                k = offset - seen
                return line + text.count('\n', 0, k), text[k:k + 12]
            line += text.count('\n')
            seen += len(text)
    return line, ''


class _Found(Exception):
    pass


def _element_line(path: str, index: int) -> str:
    """'line N' where element `index` of the top-level list starts (an error-only second pass
    with ijson's pure-Python lexer, which reports offsets)."""
    from ijson import utils
    from ijson.backends import python as slow

    unread = [0]  # bytes sent to the lexer since its last lexeme

    @utils.coroutine
    def sink():
        depth, count, expect = 0, -1, False
        while True:
            pos, lexeme = yield
            unread[0] = 0
            if lexeme is None:
                return
            if depth == 1 and expect and lexeme not in (',', ']'):
                count, expect = count + 1, False
                if count == index:
                    raise _Found(pos)
            if lexeme in ('[', '{'):
                depth += 1
                expect = expect or (depth == 1 and lexeme == '[')
            elif lexeme in (']', '}'):
                depth -= 1
            elif lexeme == ',' and depth == 1:
                expect = True

    try:
        lexer = slow.utf8_encoder(slow.Lexer(sink()))
        with _open_json(path) as f:
            for chunk in iter(lambda: f.read(READ_CHUNK_BYTES), b''):
                unread[0] += len(chunk)
                if unread[0] > read_guard.MAX_RECORD_BYTES:  # the lexer would hold a huge string
                    break
                lexer.send(chunk)
    except _Found as found:
        return f'line {_line_at(path, found.args[0])[0]}'
    except Exception:  # noqa: BLE001 - no position to report
        pass
    return 'line unknown'


# --------------------------------------------------------------------------- CSV, Parquet


def iter_csv(path: str, prompt_col: str, response_col: str) -> Iterator[pa.Table]:
    import pyarrow.csv as pcsv

    parse = pcsv.ParseOptions(newlines_in_values=True)  # multi-line answers are common
    # a row may not straddle two blocks: the block size is the longest row, and bounds memory
    read = pcsv.ReadOptions(block_size=read_guard.MAX_RECORD_BYTES)
    try:
        names = pcsv.open_csv(path, read_options=read, parse_options=parse).schema.names
        _check_columns(path, names, prompt_col, response_col)
        cols = list(dict.fromkeys([prompt_col, response_col]))
        convert = pcsv.ConvertOptions(include_columns=cols, column_types={c: pa.string() for c in cols})
        reader = pcsv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert)
        for batch in reader:
            yield pa.Table.from_arrays([batch.column(prompt_col), batch.column(response_col)],
                                       schema=OUTPUT_SCHEMA)
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
    read in batches (this is how a file with too large row groups gets smaller ones); a row
    over MAX_RECORD_BYTES is refused -- from the footer when the row group's average says so,
    before its pages are read, else once its batch is read."""
    pf = open_parquet(path)
    cols = list(dict.fromkeys([prompt_col, response_col]))
    check_text_columns(path, pf.schema_arrow, cols, 'cast it to string first', 'pass --prompt_col=... --response_col=...')
    limit = read_guard.MAX_RECORD_BYTES
    md = pf.metadata
    batch_rows = BATCH_ROWS
    for i, size in enumerate(row_group_text_bytes(pf, cols)):
        rows = md.row_group(i).num_rows
        if rows and size > rows * limit:
            raise UserError(f'{path}: row group {i} holds {human_size(size)} of text in {rows} row(s), more than '
                            f'{human_size(limit)} a row (read_guard.MAX_RECORD_BYTES); {RECORD_FIX}')
        if size:  # long rows: fewer of them per batch
            batch_rows = min(batch_rows, max(1, rows * BATCH_TEXT_BYTES // size))
    first_row = 0
    for batch in iter_file_batches(path, cols, batch_rows):
        table = pa.Table.from_arrays([as_text(batch.column(c)).cast(pa.string()) for c in (prompt_col, response_col)],
                                     schema=OUTPUT_SCHEMA)
        _check_row_bytes(path, table, first_row, limit)
        first_row += table.num_rows
        yield table


def _check_row_bytes(path: str, table: pa.Table, first_row: int, limit: int) -> None:
    import pyarrow.compute as pc

    sizes = pc.add(*(pc.fill_null(pc.binary_length(table.column(c)), 0) for c in ('prompt', 'response')))
    if table.num_rows and pc.max(sizes).as_py() > limit:
        row = first_row + int(pc.index(pc.greater(sizes, limit), True).as_py())
        raise too_long(path, f'row {row + 1}', 'MAX_RECORD_BYTES', RECORD_FIX)
