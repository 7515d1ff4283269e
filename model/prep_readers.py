"""Readers of the formats `prepare_data.py convert` takes, each yielding prompt/response tables.

CSV (pyarrow), JSONL (one object per line, Python's json: NaN and Infinity accepted), JSON
(streamed with ijson: a list of objects, and every layout pandas' ``to_json`` writes:
records, index, columns, split, table) and Parquet. Everything streams: memory holds one
batch of rows, whatever the file size. Errors name the file and the line (JSON lists: the
element and its line, found by a second, error-only pass).
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
from model.files import as_text, is_text_type, open_parquet
from model.prep_output import BATCH_ROWS, OUTPUT_SCHEMA

READ_CHUNK_BYTES = 1 << 20  # read size of the JSON parser and the UTF-8 scanner
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
        raise UserError(f'{path}: not a file')
    readers = {'csv': iter_csv, 'json': iter_json, 'jsonl': iter_jsonl, 'parquet': iter_parquet_columns}
    return readers[infer_format(path, input_format)](path, prompt_col, response_col)


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
    where = f'line {found[0]}: byte 0x{found[2].hex()} at offset {found[1]}' if found else 'somewhere'
    stem, ext = os.path.splitext(path)
    return UserError(f'{path}: {where} is not UTF-8 (a GBK file?); convert it first, e.g. '
                     f'iconv -f GBK -t UTF-8 {path} > {stem}.utf8{ext}')


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
                names = ', '.join(map(str, record)) or 'none'
                raise UserError(f'{self.path}: {_where(where)}: record has no field {key!r} (has: {names}); '
                                f'pass --prompt_col=... --response_col=...')
        values = []
        for key in keys:
            try:
                values.append(_to_text(record[key]))
            except TypeError as kind:
                raise UserError(f'{self.path}: {_where(where)}: field {key!r} is {kind}, expected text') from None
        self.prompts.append(values[0])
        self.responses.append(values[1])
        return self.take() if len(self.prompts) >= BATCH_ROWS else None

    def take(self) -> pa.Table:
        table = pa.Table.from_arrays([pa.array(self.prompts, pa.string()),
                                      pa.array(self.responses, pa.string())], schema=OUTPUT_SCHEMA)
        self.prompts, self.responses = [], []
        return table


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
        for line_no, raw in enumerate(f, start=1):
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
        first = f.readline(READ_CHUNK_BYTES)
        try:
            json.loads(first)
        except ValueError:
            return False
        return any(line.strip() for line in itertools.islice(f, 1000))


def _ijson_events(path: str, items, describe):
    """Iterate an ijson generator, turning its errors into one line with the line number."""
    import ijson

    try:
        yield from items
    except ijson.JSONError as e:
        raise UserError(f'{path}: {_syntax_error_where(path)}: malformed JSON ({describe(e)})') from None
    except UnicodeDecodeError:
        raise build_utf8_error(path) from None


def _list_records(path: str, prefix: str):
    import ijson

    with _open_json(path) as f:
        items = ijson.items(f, prefix, buf_size=READ_CHUNK_BYTES, use_float=True)
        for i, record in enumerate(_ijson_events(path, items, _short)):
            yield record, lambda i=i: f'element {i + 1} of the list ({_element_line(path, i)})'


def _object_records(path: str, prompt_col: str, response_col: str):
    """The layouts of a top-level object, told apart by its first keys and their values."""
    import ijson

    keys: dict[str, str] = {}  # top-level key -> the event its value starts with
    with _open_json(path) as f:
        events = _ijson_events(path, ijson.parse(f, buf_size=READ_CHUNK_BYTES), _short)
        pending = None
        for prefix, event, value in events:
            if prefix == '' and event == 'map_key':
                pending = value
            elif pending is not None and prefix == pending:
                keys[pending] = event
                pending = None
                if len(keys) >= 3 or (keys.keys() >= {prompt_col, response_col}):
                    break
    if keys.get('columns') == 'start_array' and 'data' in keys:  # orient='split'
        yield from _split_records(path)
    elif keys.get(prompt_col) == 'start_map':  # orient='columns' (pandas' default)
        yield from _column_records(path, prompt_col, response_col)
    elif keys and all(event == 'start_map' for event in keys.values()):  # orient='index'
        with _open_json(path) as f:
            for key, record in _ijson_events(path, ijson.kvitems(f, '', buf_size=READ_CHUNK_BYTES,
                                                                 use_float=True), _short):
                yield record, f'record {key!r}'
    elif any(event == 'start_array' for event in keys.values()):  # {"data": [...]}, orient='table'
        key = next(k for k, event in keys.items() if event == 'start_array')
        yield from _list_records(path, f'{key}.item')
    else:  # one record
        with _open_json(path) as f:
            yield next(iter(_ijson_events(path, ijson.items(f, '', use_float=True), _short))), 'the object'


def _column_records(path: str, prompt_col: str, response_col: str):
    """{"prompt": {"0": ..}, "response": {"0": ..}}: two streamed passes, zipped by index."""
    import ijson

    with _open_json(path) as fp, _open_json(path) as fr:
        prompts = _ijson_events(path, ijson.kvitems(fp, prompt_col, use_float=True), _short)
        responses = _ijson_events(path, ijson.kvitems(fr, response_col, use_float=True), _short)
        for (kp, p), (kr, r) in itertools.zip_longest(prompts, responses, fillvalue=(None, None)):
            if kp != kr:
                raise UserError(f'{path}: the columns {prompt_col!r} and {response_col!r} hold different '
                                f'row indices ({kp!r} and {kr!r})')
            yield {prompt_col: p, response_col: r}, f'row {kp!r}'


def _split_records(path: str):
    """{"columns": [...], "index": [...], "data": [[...], ...]} (orient='split')."""
    import ijson

    with _open_json(path) as f:
        columns = next(iter(_ijson_events(path, ijson.items(f, 'columns'), _short)))
    with _open_json(path) as f:
        rows = _ijson_events(path, ijson.items(f, 'data.item', buf_size=READ_CHUNK_BYTES, use_float=True),
                             _short)
        for i, row in enumerate(rows):
            yield dict(zip(columns, row)), f'data row {i + 1}'


def _short(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _syntax_error_where(path: str) -> str:
    """'line N' of the first syntax error: ijson's pure-Python parser reports its offset."""
    from ijson.backends import python as slow

    try:
        with _open_json(path) as f:
            for _ in slow.basic_parse(f, buf_size=READ_CHUNK_BYTES):
                pass
    except Exception as e:  # noqa: BLE001 - the error we came for
        m = re.search(r' at (\d+)', str(e))
        if m:
            line, token = _line_at(path, int(m.group(1)))
            if token.startswith(('NaN', 'Infinity', '-Infinity')):
                word = re.match(r'-?\w+', token).group()
                return (f'line {line}: {word} is not JSON (json.dump writes it for a missing float; '
                        f'write null instead, e.g. with pandas to_json, or save as JSONL)')
            return f'line {line}'
    line, _ = _line_at(path, -1)
    return f'line {line} (the end of the file)'


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

    @utils.coroutine
    def sink():
        depth, count, expect = 0, -1, False
        while True:
            pos, lexeme = yield
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
    read = pcsv.ReadOptions(block_size=4 << 20)
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
        raise UserError(f'{path}: not a readable CSV file ({e})') from None


def _check_columns(path: str, names: list[str], prompt_col: str, response_col: str) -> None:
    for col in (prompt_col, response_col):
        if col not in names:
            raise UserError(f'{path}: missing column {col!r} (has: {", ".join(names)}); '
                            f'pass --prompt_col=... --response_col=...')


def iter_parquet_columns(path: str, prompt_col: str, response_col: str) -> Iterator[pa.Table]:
    pf = open_parquet(path)
    schema = pf.schema_arrow
    _check_columns(path, schema.names, prompt_col, response_col)
    for col in (prompt_col, response_col):
        typ = schema.field(col).type
        if not is_text_type(typ):
            raise UserError(f'{path}: column {col!r} is {typ}, expected text (string); '
                            f'cast it to string first')
    cols = list(dict.fromkeys([prompt_col, response_col]))
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=cols):
        arrays = [as_text(batch.column(c)).cast(pa.string()) for c in (prompt_col, response_col)]
        yield pa.Table.from_arrays(arrays, schema=OUTPUT_SCHEMA)
