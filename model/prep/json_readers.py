"""The JSON readers of `prepare_data.py convert`: JSONL (one object per line, Python's json: NaN
and Infinity accepted) and JSON streamed with ijson (a list of objects, and every layout
pandas' ``to_json`` writes: records, index, columns, split, table).

A record over ``MAX_RECORD_BYTES`` is refused while it streams: a JSONL line is read with a
bounded readline, ijson reads through :class:`read_guard.ReadBudget`, which counts the bytes
since the last record was taken. Errors name the line (JSON lists: the element and its line,
found by a second, error-only pass with ijson's pure-Python lexer, itself bounded).
"""

from __future__ import annotations

import codecs
import itertools
import json
import re
from typing import Iterator

import pyarrow as pa

from model.errors import UserError
from model.prep import records
from model.data import read_guard
from model.prep.records import BOM, RECORD_FIX, Columns, build_utf8_error, tables
from model.data.read_guard import ReadBudget, iter_bounded_lines, too_long


# --------------------------------------------------------------------------- JSONL


def iter_jsonl(path: str, cols: Columns, hint: str = '', stats=None) -> Iterator[pa.Table]:
    """One JSON object a line; blank lines are skipped (counted in stats.blank_lines when given)."""
    return tables(path, cols, _jsonl_records(path, hint, stats))


def _jsonl_records(path: str, hint: str = '', stats=None):
    decoder = json.JSONDecoder(strict=False)  # tolerate raw tabs/newlines inside strings
    for line_no, text, _ in records.decoded_lines(path):
        if not text.strip():
            if stats is not None:
                stats.blank_lines += 1
            continue
        line = text.rstrip('\r\n')  # its end is no part of the JSON: an error there is at the line's last column
        try:
            record = decoder.decode(line)
        except json.JSONDecodeError as e:
            where = (f'the line ends before its JSON does: {e.msg} after column {len(line)}' if e.pos >= len(line)
                     else f'{e.msg} at column {e.colno}')
            raise UserError(f'{path}: line {line_no}: malformed JSON ({where}){hint}') from None
        yield record, f'line {line_no}'


# --------------------------------------------------------------------------- JSON


def _open_json(path: str):
    """The file, positioned after a UTF-8 BOM (yajl refuses one)."""
    f = open(path, 'rb')
    if f.read(3) != BOM:
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


def iter_json(path: str, cols: Columns) -> Iterator[pa.Table]:
    """A JSON list of objects, any layout pandas' to_json writes, or JSONL saved as .json."""
    first = _first_char(path)
    if first == '[':
        return tables(path, cols, _list_records(path, 'item'))
    if first == '{':
        if _is_jsonl(path):
            hint = '; a .json file must hold one JSON value, or one object per line (JSONL)'
            return iter_jsonl(path, cols, hint=hint)
        return tables(path, cols, _object_records(path, cols))
    if first == '':  # empty, or only whitespace: no rows (convert says so)
        return iter(())
    found = f'{first!r}'
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
        following = itertools.islice(iter_bounded_lines(f, records.READ_CHUNK_BYTES), 1000)
        return whole and any(line.strip() for line, _ in following)


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

    items = _records(path, lambda f: ijson.items(f, prefix, buf_size=records.READ_CHUNK_BYTES, use_float=True),
                     where, lambda i: _element_line(path, i))
    for i, record in enumerate(items):
        yield record, lambda i=i: f'{where(i)} ({_element_line(path, i)})'


def _object_records(path: str, cols: Columns):
    """The layouts of a top-level object, told apart by its first keys and their values.
    Columns of kind 'auto' are resolved from the keys when they are the column names."""
    import ijson

    keys: dict[str, str] = {}  # top-level key -> the event its value starts with
    pending = None
    for prefix, event, value in _records(path, lambda f: ijson.parse(f, buf_size=records.READ_CHUNK_BYTES),
                                         lambda i: 'the top-level object'):
        if prefix == '' and event == 'map_key':
            pending = value
        elif pending is not None and prefix == pending:
            keys[pending] = event
            # a list that is not a split's column names or index decides the layout: stop before
            # reading through it
            if len(keys) >= 3 or keys.keys() >= set(cols.source) or (
                    event == 'start_array' and pending not in ('columns', 'index')):
                break
            pending = None
    if keys.get('columns') == 'start_array' and 'data' in keys:  # orient='split'
        yield from _split_records(path)
    elif keys.get(cols.resolve(keys).source[0]) == 'start_map':  # orient='columns' (pandas' default)
        yield from _column_records(path, cols.resolve(keys).source)
    elif keys and all(event == 'start_map' for event in keys.values()):  # orient='index'
        items = _records(path, lambda f: ijson.kvitems(f, '', buf_size=records.READ_CHUNK_BYTES, use_float=True),
                         lambda i: f'record {i + 1} of the object')
        for key, record in items:
            yield record, f'record {key!r}'
    elif any(event == 'start_array' for event in keys.values()):  # {"data": [...]}, orient='table'
        key = next(k for k, event in keys.items() if event == 'start_array')
        yield from _list_records(path, f'{key}.item')
    else:  # one record
        items = _records(path, lambda f: ijson.items(f, '', buf_size=records.READ_CHUNK_BYTES, use_float=True),
                         lambda i: 'the object')
        # the second take lets the parser see what follows: another value is an error, not dropped
        for record in itertools.islice(items, 2):
            yield record, 'the object'


def _column_records(path: str, names: tuple[str, ...]):
    """{"prompt": {"0": ..}, "response": {"0": ..}}: a streamed pass a column, zipped by index."""
    import ijson

    def column(name):
        return _records(path, lambda f: ijson.kvitems(f, name, buf_size=records.READ_CHUNK_BYTES, use_float=True),
                        lambda i: f'row {i + 1} of column {name!r}')

    for row in itertools.zip_longest(*(column(name) for name in names), fillvalue=(None, None)):
        indices = [index for index, _ in row]
        if len(set(indices)) > 1:
            raise UserError(f'{path}: the columns {names[0]!r} and {names[1]!r} hold different '
                            f'row indices ({indices[0]!r} and {indices[1]!r})')
        yield {name: value for name, (_, value) in zip(names, row)}, f'row {indices[0]!r}'


def _split_records(path: str):
    """{"columns": [...], "index": [...], "data": [[...], ...]} (orient='split')."""
    import ijson

    columns = next(iter(_records(path, lambda f: ijson.items(f, 'columns', buf_size=records.READ_CHUNK_BYTES),
                                 lambda i: 'the list of columns')))
    rows = _records(path, lambda f: ijson.items(f, 'data.item', buf_size=records.READ_CHUNK_BYTES, use_float=True),
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


def _syntax_error_where(path: str) -> str | None:
    """'line N' of the first syntax error: ijson's pure-Python parser reports its offset
    (None: it found none, being laxer than yajl about escapes and control characters)."""
    from ijson.backends import python as slow

    try:
        with _open_json(path) as f:
            budget = ReadBudget(f, read_guard.MAX_RECORD_BYTES, _GiveUp)
            for _ in slow.basic_parse(budget, buf_size=records.READ_CHUNK_BYTES):
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
        for chunk in iter(lambda: f.read(records.READ_CHUNK_BYTES), b''):
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
            for chunk in iter(lambda: f.read(records.READ_CHUNK_BYTES), b''):
                unread[0] += len(chunk)
                if unread[0] > read_guard.MAX_RECORD_BYTES:  # the lexer would hold a huge string
                    break
                lexer.send(chunk)
    except _Found as found:
        return f'line {_line_at(path, found.args[0])[0]}'
    except Exception:  # noqa: BLE001 - no position to report
        pass
    return 'line unknown'
