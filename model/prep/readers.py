"""Readers of the formats `prepare_data.py convert` takes, each yielding tables of the output's
columns: prompt/response pairs, or one text column (raw text).

CSV (pyarrow; TSV and other one-character delimiters too), Parquet and plain text (.txt: one
document a line) here, JSONL and JSON in model/prep/json_readers.py, all on model/prep/records.py
(the encoding checks, the columns, the record batcher). Everything streams: memory
holds one batch of rows, whatever the file size. Every reader runs under model/data/read_guard.py's
guard (whatever a parser raises on malformed content is one line naming the file), and a record
over ``MAX_RECORD_BYTES`` is refused as it streams, before it is whole.
"""

from __future__ import annotations

import os
import re
import shlex
from typing import Iterator

import pyarrow as pa

from model.errors import UserError
from model.data import read_guard
from model.data.files import as_text, check_row_group_sizes, check_text_columns, iter_file_batches, open_parquet, show_names
from model.prep import records
from model.prep.output import BATCH_ROWS, OUTPUT_SCHEMAS
from model.prep.json_readers import iter_json, iter_jsonl
from model.prep.records import RECORD_FIX, Columns, build_utf8_error, check_plain_text
from model.data.read_guard import guarded, human_size, too_long

FORMATS = ('csv', 'tsv', 'json', 'jsonl', 'parquet', 'txt')
_EXTENSIONS = {'.csv': 'csv', '.tsv': 'tsv', '.tab': 'tsv', '.json': 'json', '.jsonl': 'jsonl', '.ndjson': 'jsonl',
               '.parquet': 'parquet', '.pq': 'parquet', '.txt': 'txt'}
# the delimited formats, each with its default delimiter: both are read by iter_csv
DELIMITERS = {'csv': ',', 'tsv': '\t'}
# what --delimiter reads as escapes, as a shell passes them ('\t' is the two characters \ and t): \t \n \r \\,
# \xHH, \uHHHH and \NNN (octal: Hive's exports separate by \001); the word tab is a tab too
_ESCAPE = r'\\(?:[tnr\\]|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|[0-7]{1,3})'
_NAMED_ESCAPES = {'t': '\t', 'n': '\n', 'r': '\r', '\\': '\\'}
_ESCAPES_READ = "\\t or tab, \\\\ (a backslash), \\xHH, \\uHHHH, \\NNN (octal, e.g. Hive's \\001)"


def _unescape(value: str) -> str:
    """--delimiter's value as the character(s) it names (see _ESCAPE); a backslash that starts
    no escape read here is refused, naming those that are."""
    if value.lower() == 'tab':
        return '\t'
    if len(value) < 2 or not value.startswith('\\'):
        return value
    if not re.fullmatch(f'(?:{_ESCAPE})+', value):
        raise UserError(f'--delimiter={_as_typed(value)}: not an escape this reads; give the character itself, '
                        f'or one of {_ESCAPES_READ}')

    def one(m: re.Match) -> str:
        body = m.group()[1:]
        if body in _NAMED_ESCAPES:
            return _NAMED_ESCAPES[body]
        return chr(int(body[1:], 16)) if body[0] in 'xu' else chr(int(body, 8))

    return re.sub(_ESCAPE, one, value)


def _lost_backslash(value: str) -> str | None:
    """The escape a value reads as once a backslash is put before it (t -> '\\t', 001 -> '\\001'), as
    typed in quotes, where that names one character: what a shell leaves of an unquoted escape."""
    if value != 't' and (len(value) < 3 or '\\' in value or value.lower() == 'tab' or not value.isascii()):
        return None  # t, or an escape of a number (\001, \x01, \u0001)
    try:
        named = _unescape('\\' + value)
    except UserError:
        return None
    return f"'\\{value}'" if len(named) == 1 else None


def _as_typed(value: str) -> str:
    """A flag's value as the user typed it, quoted; a real tab or line break as its escape."""
    if not value.isprintable():
        return repr(value)
    return f"'{value}'" if "'" not in value else f'"{value}"'


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


def resolve_delimiter(fmt: str, delimiter: str | None) -> str | None:
    """The one character between values of a delimited format (csv, tsv), from --delimiter
    (None: not given, the format's default); None for the other formats, which refuse one."""
    if delimiter is None:
        return DELIMITERS.get(fmt)
    shown = f'--delimiter={_as_typed(str(delimiter))}'
    if fmt not in DELIMITERS:
        raise UserError(f'{shown} is for CSV and TSV files, and this input is read as {fmt}; leave out '
                        f'--delimiter, or pass --format=csv if the file is delimited text')
    value = _unescape(str(delimiter))
    one = "give the one character between values, e.g. --delimiter=';' or --delimiter='|' or --delimiter=tab"
    lost = _lost_backslash(value)
    if lost:  # `--delimiter=\t` unquoted: the shell passes t
        raise UserError(f'{shown}: letters and digits are text, not a separator; was it {lost}? A shell drops a '
                        f'backslash that is not quoted: write --delimiter={lost}, quoted'
                        + (', or --delimiter=tab' if value == 't' else ''))
    if len(value) == 1 and value.isascii() and value.isalnum():
        raise UserError(f'{shown}: letters and digits are text, not a separator; {one}')
    if value and not value.strip('\r\n'):
        raise UserError(f'{shown}: a line break separates rows, not values; {one}')
    if len(value) != 1:
        what = 'is empty' if not value else f'is {len(value)} characters'
        raise UserError(f'{shown} {what}: {one}; escapes read: {_ESCAPES_READ}')
    if value == '\0':
        raise UserError(f'{shown}: a NUL byte cannot separate values; {one}')
    if value == '"':
        raise UserError(f'{shown}: a quote (") quotes values, it cannot separate them; {one}')
    if not value.isascii():
        raise UserError(f'{shown} is not an ASCII character, and the reader splits only at one of those; '
                        f'{_not_ascii_fix(value)}')
    return value


QUOTINGS = ('csv', 'none')


def resolve_quoting(fmt: str, quoting: str | None) -> bool | None:
    """Whether a delimited file's values may be quoted, from --quoting (None: not given, 'csv');
    None for the other formats, which refuse it."""
    if quoting is None:
        return True if fmt in DELIMITERS else None
    if fmt not in DELIMITERS:
        raise UserError(f'--quoting={quoting} is for CSV and TSV files, and this input is read as {fmt}; leave out '
                        f'--quoting')
    if str(quoting).lower() not in QUOTINGS:
        raise UserError(f'--quoting={quoting}: choose csv (a value may be "quoted") or none (a quote is text)')
    return str(quoting).lower() == 'csv'


class ReadStats:
    """What a reader skipped (the blank lines of a .txt or JSONL file) or found worth a look (a
    CSV value holding whole rows of its file), for convert's report."""

    def __init__(self):
        self.blank_lines = 0
        self.rows_in_values: list[tuple[int, str, int]] = []  # (data row, column, row-like lines), the first few
        self.values_with_rows = 0  # how many values in all


def iter_input_tables(path: str, cols: Columns, input_format: str | None = None,
                      stats: ReadStats | None = None, delimiter: str | None = None,
                      quoting: str | None = None) -> Iterator[pa.Table]:
    """Tables of the columns' output names of any supported file, streamed (the first table
    tells the kind: 'auto' columns are resolved from the source's names). delimiter, quoting: as
    --delimiter and --quoting give them (None: the format's own: a comma or a tab, quotes read)."""
    if not os.path.exists(path):
        if os.path.islink(path):
            raise UserError(f'{path}: a link to nothing ({os.readlink(path)}), or in a loop; give the file itself')
        raise UserError(f'{path}: no such file')
    if not os.path.isfile(path):
        raise UserError(f'{path}: not a regular file (a folder, a FIFO or a device); give a file')
    fmt = infer_format(path, input_format)
    delimiter, quoted = resolve_delimiter(fmt, delimiter), resolve_quoting(fmt, quoting)
    if fmt == 'txt' and cols.kind != 'auto':
        flags = '--text_col' if cols.kind == 'text' else '--prompt_col/--response_col'
        raise UserError(f'{path}: a .txt file has no columns (each line is one document, written to the text '
                        f'column); leave out {flags}, or pass --format=jsonl|csv|json if it is one of those')
    stats = stats if stats is not None else ReadStats()
    readers = {**{delimited: lambda p, c: iter_csv(p, c, delimiter, stats, quoted) for delimited in DELIMITERS},
               'json': iter_json, 'jsonl': lambda p, c: iter_jsonl(p, c, stats=stats),
               'parquet': iter_parquet_columns,
               'txt': lambda p, c: iter_txt(p, stats, guess=input_format is None)}

    def tables():
        if fmt != 'parquet':
            check_plain_text(path)
        return readers[fmt](path, cols)

    return guarded(path, tables)


# --------------------------------------------------------------------------- CSV, Parquet


def iter_csv(path: str, cols: Columns, delimiter: str, stats: ReadStats | None = None,
             quoted: bool = True) -> Iterator[pa.Table]:
    """A delimited file (CSV, TSV, ...): delimiter is the one character between values, and every
    helper that reads the file again to name a fault reads it with the same one. quoted: a value
    may be quoted (CSV's "...", "" a quote inside, line breaks too); False: a quote is text, a
    line one row (TSV exports of databases). Values that hold whole rows of the file are counted
    in stats (:func:`rows_in_value`)."""
    import pyarrow.csv as pcsv

    _refuse_long_line(path)  # before pyarrow, which would hold the line (and read ahead) to find its end
    header = _header_alone(path, delimiter, quoted)
    if header is not None:  # no rows (convert says so); a header's columns are still checked
        if header and quoted:  # a quote it opens and never closes (Python's csv closes it at the line's end)
            _refuse_quote_fault(path, delimiter)
        if header:
            cols = cols.resolve(header)
            _check_columns(path, header, cols, delimiter)
            yield OUTPUT_SCHEMAS[cols.kind].empty_table()
        return

    # multi-line answers are common, in quoted values
    parse = pcsv.ParseOptions(delimiter=delimiter, quote_char='"' if quoted else False, newlines_in_values=quoted)
    # a row may span one block boundary, not two: the block size bounds a row (and the ~10 blocks
    # pyarrow reads ahead); a row between one and two blocks is refused once read
    limit = read_guard.MAX_RECORD_BYTES
    read = pcsv.ReadOptions(block_size=limit)
    try:
        names = pcsv.open_csv(path, read_options=read, parse_options=parse).schema.names
        cols = cols.resolve(names)
        _check_columns(path, names, cols, delimiter)
        source = list(dict.fromkeys(cols.source))
        convert = pcsv.ConvertOptions(include_columns=source, column_types={c: pa.string() for c in source})
        reader = pcsv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert)
        first_row = 0
        if quoted:  # before any row is given out: a stop leaves nothing written
            _refuse_quote_fault(path, delimiter)
        for batch in reader:
            table = pa.Table.from_arrays([batch.column(c) for c in cols.source], schema=OUTPUT_SCHEMAS[cols.kind])
            _check_row_bytes(path, table, first_row, limit, 'data row')
            if stats is not None and quoted:  # unquoted: one line, one row
                _count_rows_in_values(table, len(names), delimiter, first_row, stats,
                                      dict(zip(table.column_names, cols.source)))
            first_row += table.num_rows
            yield table
    except UnicodeDecodeError:  # pyarrow decodes the header names itself
        raise build_utf8_error(path) from None
    except pa.ArrowInvalid as e:
        # pyarrow names a bad byte only where it meets it in a field ("Empty CSV file" for one byte 0xff): a
        # file that is not UTF-8 is said so first, whatever pyarrow's own complaint
        if 'UTF8' in str(e) or 'UTF-8' in str(e) or records.find_bad_utf8(path) is not None:
            raise build_utf8_error(path) from None
        if quoted and ('straddl' in str(e) or 'CSV parse error' in str(e)):
            _refuse_quote_fault(path, delimiter)  # a quote never closed is what pyarrow met, if the file has one
        if 'straddling' in str(e) or 'straddles' in str(e):
            raise UserError(f'{path}: a row is longer than {human_size(read_guard.MAX_RECORD_BYTES)} '
                            f'(read_guard.MAX_RECORD_BYTES), or a quote (") is opened and never closed; close '
                            f'the quote, or split or drop such rows before converting') from None
        if 'CSV parse error' in str(e):  # pyarrow names neither the line nor a whole character
            bad = _csv_bad_row(path, delimiter, quoted)
            if bad:
                line, got, expected = bad
                why = (f'a {_delimiter_name(delimiter)} in a value that is not quoted, or a quote (") opened and '
                       f'never closed?' if quoted else f'a {_delimiter_name(delimiter)} in a value? --quoting=none '
                       f'reads no quotes')
                raise UserError(f'{path}: line {line}: a row of {got} field(s), where the header has {expected} '
                                f'({why}); fix that row') from None
            said = str(e).rstrip(chr(0xFFFD)).removeprefix('CSV parse error: ')
            raise UserError(f'{path}: not a readable {_read_as(delimiter)} ({said})') from None
        raise


def _refuse_quote_fault(path: str, delimiter: str) -> None:
    """A quoted value pyarrow would read other than as written (:func:`_quote_fault`) refused, by its line."""
    fault = _quote_fault(path, delimiter)
    if fault is not None and fault[1] is None:
        raise UserError(f'{path}: line {fault[0]}: a quote (") opened there is never closed, so the file\'s '
                        f'every line after it would be one value; close that quote (a quote inside a value '
                        f'is written twice: "") or remove it; if the file does not quote its values (a quote '
                        f'is text), pass --quoting=none')
    if fault is not None:
        raise UserError(f'{path}: line {fault[0]}: a value starts with a quote (") and goes on after its closing '
                        f'quote ({fault[1]}); read as CSV quoting its quotes would be dropped: if the file does '
                        f'not quote its values (a quote is text, as in most TSV exports), pass --quoting=none; '
                        f'else quote the whole value, its quotes doubled ("""a"" b")')


def _refuse_long_line(path: str) -> None:
    """A line over MAX_RECORD_BYTES is refused by its number, read in bounded pieces: pyarrow
    would read on to its end (a whole file of one line) and then call the file empty. A row of
    short lines, in a quoted value, is measured by pyarrow's block size instead."""
    import mmap

    with open(path, 'rb') as f:
        start = read_guard.find_long_line(f, read_guard.MAX_RECORD_BYTES)
        if start is None:
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            line = _lines_before(m, start) + 1
    raise too_long(path, f'line {line}' + (f' (from byte {start})' if start else ''), 'MAX_RECORD_BYTES', RECORD_FIX)


def _header_alone(path: str, delimiter: str, quoted: bool) -> list[str] | None:
    """The header's names when it is all the file holds (whitespace and empty lines aside: no
    rows), [] when the file holds no text at all (nothing, a BOM, whitespace, line breaks), None
    when rows follow the header (pyarrow reads the file). pyarrow refuses the first two as an
    "Empty CSV file" when the last line has no line end; Python's csv reads the records as
    pyarrow does (a quote opens a value only as its first character; a quoted value may span
    lines, a header's too), a value bounded by csv.field_size_limit (over it: left to pyarrow).
    A record is a row when its text holds more than whitespace: ``""``, and ``,`` (or a tab
    alone in a TSV) are rows. Only the header must be UTF-8 here: a byte of another encoding
    in a row is pyarrow's to meet, in a column it reads."""
    import csv
    import io

    blank = ''.join(c for c in ' \t\r\n\x0b\x0c' if c != delimiter)  # around a row, but not its delimiter
    read: list[str] = []  # the text of the lines the csv reader took for its record

    def lines(text):
        for line in text:
            read.append(line)
            yield line

    with open(path, 'rb') as raw:
        if raw.read(len(records.BOM)) != records.BOM:
            raw.seek(0)
        text = io.TextIOWrapper(raw, encoding='utf-8', errors='surrogateescape', newline='')
        reader = csv.reader(lines(text), delimiter=delimiter, **({} if quoted else {'quoting': csv.QUOTE_NONE}))

        def with_text():
            for record in reader:
                said = ''.join(read)
                read.clear()
                yield record, said

        try:
            # pyarrow skips empty lines before the header; one of only spaces is its header, unless nothing follows
            found = ((record, said) for record, said in with_text() if said.strip('\r\n'))
            first, said = next(found, (None, ''))
            if first is None:
                return []
            if any(rest.strip(blank) for _, rest in found):
                return None
        except csv.Error:  # left to pyarrow, and its errors
            return None
    if not said.strip(blank):
        return []
    if any('\udc80' <= ch <= '\udcff' for name in first for ch in name):  # a byte that is not UTF-8 in the header
        raise build_utf8_error(path)
    return first


ROW_LIKE_LINES = 2  # a value with at least this many lines that read as whole rows of its file is said


def rows_in_value(value: str, fields: int, delimiter: str) -> int:
    """Lines inside a multi-line value (after its first) that read as whole rows of a file of
    ``fields`` columns: exactly that many values between the delimiters, none quoted. What a quote
    opened by mistake and closed only by a stray quote rows later leaves: the rows between become
    one value (valid CSV, so neither pyarrow nor :func:`_quote_fault` can refuse it). A value
    that really holds such lines (a table in an answer) reads the same: a note, never a refusal."""
    if fields < 2:  # a one-column file's every line reads as a row
        return 0
    return sum(1 for line in value.split('\n')[1:]
               if line.count(delimiter) == fields - 1 and '"' not in line)


def _count_rows_in_values(table: pa.Table, fields: int, delimiter: str, first_row: int, stats: ReadStats,
                          source: dict[str, str]) -> None:
    """Counts in stats the values of table (columns named as written, source: each one's name in the
    file) that hold whole rows of the file (:func:`rows_in_value`)."""
    import pyarrow.compute as pc

    for name in dict.fromkeys(table.column_names):
        column = table.column(name)
        # only values with a line break and the delimiter (rare in Chinese text, which writes ，) are read in Python
        multi = pc.fill_null(pc.and_(pc.match_substring(column, '\n'), pc.match_substring(column, delimiter)), False)
        if not pc.any(multi).as_py():
            continue
        for i in pc.indices_nonzero(multi).to_pylist():
            found = rows_in_value(column[i].as_py(), fields, delimiter)
            if found >= ROW_LIKE_LINES:
                stats.values_with_rows += 1
                if len(stats.rows_in_values) < 3:
                    stats.rows_in_values.append((first_row + i + 1, source.get(name, name), found))


def _quote_fault(path: str, delimiter: str) -> tuple[int, str | None] | None:
    """The first quoted CSV value pyarrow would read other than as written, or None: (its line,
    None) where it opens and the file never closes it -- pyarrow (and Python's csv) take it to the
    end of the file without a word, one row swallowing every row after it --, or (its line, the
    value's start) where text follows its closing quote (``"好"的意思``: pyarrow drops the quotes
    without a word; a file that does not quote its values has such text). Read as pyarrow reads
    it: a quote opens a value only as a value's first character (after the delimiter, a line
    break or the file's start); inside, a doubled quote is a quote and a single one closes it; a
    quote inside an unquoted value is text. On a map of the file, from quote to quote: a quoted
    value is passed over whole by one match, a quote in text by one step, so the cost follows the
    quotes and nothing is read twice."""
    import mmap

    value_starts = delimiter.encode('ascii') + b'\r\n'  # a quote after one of these opens a value
    with open(path, 'rb') as f:
        if os.fstat(f.fileno()).st_size == 0:
            return None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            first = 3 if m[:3] == b'\xef\xbb\xbf' else 0
            pos, after, kept_from, size = first, None, 0, len(m)
            while True:
                q = m.find(b'"', pos, pos + _DROP_EVERY)  # the next quote within a window: one call a quote
                if q < 0 and pos + _DROP_EVERY < size:  # none there: on, window by window, each let go
                    q = _next_quote(m, pos + _DROP_EVERY)
                if q < 0:
                    break
                if q - kept_from >= _DROP_EVERY:
                    kept_from = _drop_mapped(m, kept_from, q)
                if q != first and m[q - 1] not in value_starts:  # a quote inside an unquoted value: text
                    pos = q + 1
                    continue
                value = _QUOTED_VALUE.match(m, q)  # the whole quoted value, in one step
                if not value.group(1):  # the file ended inside it: said first, whatever came before
                    return _lines_before(m, q) + 1, None
                pos = value.end()
                if after is None and pos < len(m) and m[pos] not in value_starts:  # text after the closing quote
                    after = (q, re.split(rb'[\r\n' + re.escape(delimiter.encode('ascii')) + rb']',
                                          m[q:min(pos + 60, len(m))])[0].decode('utf-8', 'ignore'))
            return (_lines_before(m, after[0]) + 1, after[1]) if after else None


# a quoted value from its opening quote: "" inside, then its closing quote (empty: the file ended first)
_QUOTED_VALUE = re.compile(rb'"[^"]*(?:""[^"]*)*("?)')


_DROP_EVERY = 1 << 26  # bytes of a map read past before its pages are let go


def _next_quote(m, pos: int) -> int:
    """m.find(b'"', pos), looked for a window of _DROP_EVERY bytes at a time, the pages of each
    window let go once passed: a file without quotes (or with none after some point) is otherwise
    read to its end in one call, every page held."""
    while pos < len(m):
        end = min(pos + _DROP_EVERY, len(m))
        q = m.find(b'"', pos, end)
        if q >= 0:
            return q
        _drop_mapped(m, pos, end)
        pos = end
    return -1


def _drop_mapped(m, kept_from: int, pos: int) -> int:
    """Lets go of a map's pages before ``pos`` (whole pages, once ``_DROP_EVERY`` bytes were read
    past ``kept_from``) and returns where the kept pages now start. A scan that touches every page
    of a map would otherwise hold the whole file as this process's resident memory (file pages,
    reclaimable, but what `time -v`, `ps` and a cluster's job accounting show); a page read again
    is read back from the page cache."""
    import mmap

    if pos - kept_from < _DROP_EVERY:
        return kept_from
    start, end = (at // mmap.PAGESIZE * mmap.PAGESIZE for at in (kept_from, pos))  # madvise takes whole pages
    m.madvise(mmap.MADV_DONTNEED, start, end - start)
    return end


def _lines_before(m, end: int, chunk: int = 1 << 24) -> int:
    """Line breaks before ``end``: LF, CRLF or a lone CR (pyarrow's three)."""
    count = kept_from = 0
    for i in range(0, end, chunk):
        kept_from = _drop_mapped(m, kept_from, i)
        part = m[i:min(i + chunk, end)]
        count += part.count(b'\n') + part.count(b'\r') - part.count(b'\r\n')
        if part.endswith(b'\r') and m[i + len(part):i + len(part) + 1] == b'\n' and i + len(part) < end:
            count -= 1  # a CRLF cut by the chunk: one break, not two
    return count


def _csv_bad_row(path: str, delimiter: str, quoted: bool = True) -> tuple[int, int, int] | None:
    """(line where it starts, its fields, the header's) of the first CSV record whose number of
    fields is not the header's, read as pyarrow reads it (quoted values may hold newlines); None
    if Python's reader finds none. Read only after pyarrow refused the file."""
    import csv

    try:
        with open(path, encoding='utf-8-sig', newline='') as f:
            reader = csv.reader(f, delimiter=delimiter, **({} if quoted else {'quoting': csv.QUOTE_NONE}))
            header = next(reader, None)
            if header is None:
                return None
            start = reader.line_num + 1
            for row in reader:
                if row and len(row) != len(header):
                    return start, len(row), len(header)
                start = reader.line_num + 1
    except (csv.Error, UnicodeDecodeError, OSError):
        return None
    return None


def _check_columns(path: str, names: list[str], cols: Columns, delimiter: str) -> None:
    for col in cols.source:
        if col not in names:
            raise UserError(f'{path}: missing column {col!r} (has: {show_names(names)}); '
                            f'{_other_delimiter_hint(names, delimiter) or cols.fix}')
        if names.count(col) > 1:  # the reader would take one of them silently
            raise UserError(f'{path}: column {col!r} appears {names.count(col)} times in the header; '
                            f'rename one of them')


# the delimiters a file read as one column most likely has instead, each with the fix it names (None: no flag
# can, the reader splits only at an ASCII character)
_OTHER_DELIMITERS = {'\t': ('tab', '--delimiter=tab (or --format=tsv, or name it .tsv)'),
                     ',': ('comma', '--delimiter=,'),
                     ';': ('semicolon', "--delimiter=';'"), '|': ("'|'", "--delimiter='|'"),
                     '\x01': ('\\001 (Hive)', "--delimiter='\\001'"),
                     '\uff0c': ('full-width comma', None), '\uff1b': ('full-width semicolon', None)}
# a file separated by a character beyond ASCII: pyarrow cannot split at it, and replacing it would split the text too
_FULL_WIDTH_FIX = ('replacing it (by a tab) would also split every value that holds it, as Chinese text nearly always '
                   'does: export the file again as CSV with its values quoted (e.g. pandas to_csv), or as TSV, and '
                   'convert that')


def _not_ascii_fix(delimiter: str) -> str:
    """The way on for a file separated by a character beyond ASCII: a full-width comma or semicolon
    is in the text too (the file must be written again); another one can be replaced by a tab."""
    if delimiter in '\uff0c\uff1b\u3001':
        return _FULL_WIDTH_FIX
    return (f'replace it by a tab first if no value holds a tab or {delimiter!r} itself (e.g. '
            f"sed $'s/{delimiter}/\\t/g'), then pass --delimiter=tab; else export the file again as quoted CSV or TSV")


def _delimiter_name(delimiter: str) -> str:
    return _OTHER_DELIMITERS[delimiter][0] if delimiter in _OTHER_DELIMITERS else repr(delimiter)


def _read_as(delimiter: str) -> str:
    """What a delimited file is read as, for a message: CSV, TSV, or a file separated by another."""
    return {',': 'CSV', '\t': 'TSV'}.get(delimiter) or f'{_delimiter_name(delimiter)}-separated file'


def _other_delimiter_hint(names: list[str], delimiter: str) -> str | None:
    """A header read as one column whose name holds another likely delimiter: the file is
    probably separated by that one (the most frequent in the name), and the fix says so -- or,
    for one beyond ASCII, that the file must be written again."""
    if len(names) != 1:
        return None
    counts = {d: str(names[0]).count(d) for d in _OTHER_DELIMITERS if d != delimiter}
    best = max(counts, key=counts.get, default=None)
    if best is None or not counts[best]:
        return None
    name, fix = _OTHER_DELIMITERS[best]
    seems = f'a {name}-separated file' if best.isascii() else f'a file separated by {name}s ({best})'
    how = f'read as {_read_as(delimiter)}' if delimiter in ',\t' else f'read with the delimiter {_delimiter_name(delimiter)}'
    read = f'{how}, the header is one column: {seems}?'
    if fix is None:
        return f'{read} the reader splits only at an ASCII character, and {_not_ascii_fix(best)}'
    return f'{read} pass {fix}'


def iter_parquet_columns(path: str, cols: Columns) -> Iterator[pa.Table]:
    """The columns of any Parquet file, row group by row group. A row group of any size is
    read in batches (this is how a file with too large row groups gets smaller ones), a page at a
    time; a row over MAX_RECORD_BYTES is refused -- from the footer and page headers
    (files.check_row_group_sizes) when they show it, else once read."""
    pf = open_parquet(path)
    columns = cols.resolve(pf.schema_arrow.names)
    cols = list(dict.fromkeys(columns.source))
    check_text_columns(path, pf.schema_arrow, cols, 'cast it to string first', columns.fix)
    limit = read_guard.MAX_RECORD_BYTES
    md = pf.metadata
    batch_rows = BATCH_ROWS
    for i, size in enumerate(check_row_group_sizes(path, pf, cols, RECORD_FIX)):
        if size:  # long rows: fewer of them per batch
            batch_rows = min(batch_rows, max(1, md.row_group(i).num_rows * records.BATCH_TEXT_BYTES // size))
    first_row = 0
    for batch in iter_file_batches(path, cols, batch_rows):
        table = pa.Table.from_arrays([as_text(batch.column(c)).cast(pa.string()) for c in columns.source],
                                     schema=OUTPUT_SCHEMAS[columns.kind])
        _check_row_bytes(path, table, first_row, limit)
        first_row += table.num_rows
        yield table
    if md.num_row_groups == 0:  # every reader yields a table: its columns tell convert the kind
        yield OUTPUT_SCHEMAS[columns.kind].empty_table()


def _check_row_bytes(path: str, table: pa.Table, first_row: int, limit: int, what: str = 'row') -> None:
    import pyarrow.compute as pc

    sizes = pc.fill_null(pc.binary_length(table.column(0)), 0)
    for c in range(1, table.num_columns):
        sizes = pc.add(sizes, pc.fill_null(pc.binary_length(table.column(c)), 0))
    if table.num_rows and pc.max(sizes).as_py() > limit:
        row = first_row + int(pc.index(pc.greater(sizes, limit), True).as_py())
        raise too_long(path, f'{what} {row + 1}', 'MAX_RECORD_BYTES', RECORD_FIX)


# --------------------------------------------------------------------------- plain text


def iter_txt(path: str, stats: ReadStats, guess: bool = False) -> Iterator[pa.Table]:
    """A .txt file, one document a line (the line end, LF or CRLF, left out; a UTF-8 BOM
    dropped), as text tables; blank or whitespace-only lines are skipped and counted in stats.
    Each line is read bounded: one over MAX_RECORD_BYTES is refused by its number, unheld.
    guess: the format came from the extension, so a JSONL file saved as .txt is refused (its
    lines would become text)."""
    texts: list[str] = []
    size = 0
    for line_no, text, raw_bytes in records.decoded_lines(path):
        text = text[:-2] if text.endswith('\r\n') else text[:-1] if text.endswith('\n') else text
        if not text.strip():
            stats.blank_lines += 1
            continue
        if guess:  # the first non-blank line only
            _refuse_jsonl_as_text(path, line_no, text)
            guess = False
        if '\r' in text.rstrip('\r'):  # CRs inside one line: lines ended by CR alone, read as one document
            q = shlex.quote(path)
            raise UserError(f'{path}: line {line_no} holds line breaks of a carriage return alone (CR, classic Mac '
                            f'OS), which would make its lines one document; convert them first, e.g. '
                            f'tr \'\\r\' \'\\n\' < {q} > {shlex.quote(os.path.splitext(path)[0] + ".lf.txt")}')
        texts.append(text)
        size += raw_bytes
        if len(texts) >= BATCH_ROWS or size >= records.BATCH_TEXT_BYTES:
            yield pa.table([pa.array(texts, pa.string())], schema=OUTPUT_SCHEMAS['text'])
            texts, size = [], 0
    yield pa.table([pa.array(texts, pa.string())], schema=OUTPUT_SCHEMAS['text'])


def _refuse_jsonl_as_text(path: str, line_no: int, text: str) -> None:
    """The first line a JSON object: JSONL saved as .txt (a common export), not raw text."""
    import json

    stripped = text.strip()
    if not (stripped.startswith('{') and stripped.endswith('}')):
        return
    try:
        value = json.loads(stripped)
    except ValueError:
        return
    if isinstance(value, dict):
        raise UserError(f'{path}: line {line_no} is a JSON object: a JSONL file saved as .txt? pass '
                        f'--format=jsonl (then --prompt_col/--response_col or --text_col as needed), or '
                        f'--format=txt to take each line as raw text')
