"""What every reader of prepare_data.py builds on: the encoding checks (UTF-8, no UTF-16/32, no
packed file), which source columns become the output's (:class:`Columns`: prompt/response pairs or
one text column), and records -> tables of ``BATCH_ROWS`` rows (:class:`RecordBatcher`), each record's
text bounded as it comes.
"""

from __future__ import annotations

import codecs
import contextlib
import math
import os
import shlex
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa

from model.errors import UserError
from model.data.files import KINDS, PAIR_COLUMNS, TEXT_COLUMN, show_names

from model.prep.output import BATCH_ROWS, OUTPUT_SCHEMAS

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
    quoted = shlex.quote(path)
    with open(path, 'rb') as f:
        head = f.read(GUESS_BYTES)
    before = head[:found[1]] if found else b''
    after = head[found[1] + len(found[2]):] if found else b''
    if found and after and _decodes(after, 'utf-8'):  # UTF-8 again right after it: a stray byte, not an encoding
        return UserError(f'{path}: {where} is not UTF-8, while the text after it is: a stray byte in a UTF-8 file; '
                         f'remove it or that line (see it: sed -n \'{found[0]}p\' {quoted} | od -c | head)')
    if any(b >= 0x80 for b in before):  # UTF-8 text (not only ASCII) before it: one line is not, not the file
        line_end = head.find(b'\n', found[1])
        guess = _guess_encoding(head[found[1]:line_end if line_end >= 0 else None]) or _GUESSES[0]
        return UserError(f'{path}: {where} is not UTF-8, though the text before it is: that line is in another '
                         f'encoding ({guess.label}?) or damaged; fix or remove it (see it: sed -n \'{found[0]}p\' '
                         f'{quoted} | iconv -f {guess.iconv} -t UTF-8)')
    guess = _guess_encoding(head)
    if guess:  # GB18030 is GBK's superset (four-byte characters: rare names, emoji): it converts both
        return UserError(f'{path}: {where} is not UTF-8 (a {guess.label} file?); convert it first, e.g. '
                         f'iconv -f {guess.iconv} -t UTF-8 {quoted} > {shlex.quote(stem + ".utf8" + ext)}')
    return UserError(f'{path}: {where} is not UTF-8, nor GBK / GB18030, Big5 or Shift-JIS; convert it to UTF-8 from '
                     f'its encoding first: iconv -f <ENCODING> -t UTF-8 {quoted} > {shlex.quote(stem + ".utf8" + ext)} '
                     f'(iconv -l lists encodings)')


GUESS_BYTES = 1 << 20  # what the encoding hint reads from the file's start
GUESS_CHARS = 20_000  # the non-ASCII characters it judges the text by


@dataclass(frozen=True)
class _Guess:
    label: str  # as a user names it
    iconv: str  # as iconv (and `iconv -l`) names it
    codec: str  # as Python names it
    common: Any  # str -> bool: a character of everyday text in it (text decoded wrongly holds few)


def _in_gb2312(ch: str) -> bool:  # GB2312: the 6,763 everyday simplified characters, punctuation, kana
    return _encodes(ch, 'gb2312')


def _in_big5_common(ch: str) -> bool:  # Big5's symbols and its 5,401 frequent characters (lead bytes 0xA1-0xC6)
    return _encodes(ch, 'big5') and 0xa1 <= ch.encode('big5')[0] <= 0xc6


def _japanese(ch: str) -> bool:  # kana, kanji, CJK and full-width punctuation: not the half-width kana that
    # Shift-JIS reads most GBK bytes as
    return '\u3000' <= ch <= '\u30ff' or '\u4e00' <= ch <= '\u9fff' or '\uff01' <= ch <= '\uff5e'


_GUESSES = (_Guess('GBK / GB18030', 'GB18030', 'gb18030', _in_gb2312),
            _Guess('Big5', 'BIG5', 'big5', _in_big5_common),
            _Guess('Big5-HKSCS', 'BIG5-HKSCS', 'big5hkscs', _in_big5_common),  # Hong Kong's Big5 and more
            _Guess('Shift-JIS', 'SHIFT_JIS', 'shift_jis', _japanese))

_UNPACK = 'unpack it first and give the file inside it'
_PACKED = ((b'\x1f\x8b', 'gzip-compressed', _UNPACK), (b'BZh', 'bzip2-compressed', _UNPACK),
           (b'\xfd7zXZ\x00', 'xz-compressed', _UNPACK), (b'\x28\xb5\x2f\xfd', 'zstd-compressed', _UNPACK),
           (b'PK\x03\x04', 'a zip archive', _UNPACK), (b"7z\xbc\xaf\x27\x1c", 'a 7z archive', _UNPACK),
           (b'\x89PNG', 'a PNG image', 'give a text file'), (b'%PDF', 'a PDF', 'extract its text first (e.g. pdftotext)'),
           (b'PAR1', 'Parquet', 'give it a name ending in .parquet'))


def _guess_encoding(data: bytes) -> _Guess | None:
    """The encoding data (not UTF-8) reads best in, or None. Each candidate must decode it (a
    file's start, perhaps cut inside a character); of those, the one whose reading holds the
    largest share of everyday characters wins: most bytes decode in several of these encodings
    (Big5 text reads as GB18030, GBK as Shift-JIS's half-width kana), but only the right one reads
    into common characters. A GBK file may hold private-use characters (GBK's user-defined area)."""
    best, best_share = None, 0.5  # under half everyday characters: none of these
    for guess in _GUESSES:
        try:
            text = codecs.getincrementaldecoder(guess.codec)().decode(data, final=False)
        except UnicodeDecodeError:
            continue
        wide = [ch for ch in text if ch > '\x7f'][:GUESS_CHARS]
        share = sum(map(guess.common, wide)) / len(wide) if wide else 0.0
        if share > best_share:
            best, best_share = guess, share
    return best


def _encodes(ch: str, encoding: str) -> bool:
    try:
        ch.encode(encoding)
    except UnicodeEncodeError:
        return False
    return True


def _decodes(data: bytes, encoding: str) -> bool:
    """data (a file's start, perhaps cut inside a character) is text in encoding."""
    try:
        codecs.getincrementaldecoder(encoding)().decode(data, final=False)
    except UnicodeDecodeError:
        return False
    return True


_WIDE_BOMS = ((codecs.BOM_UTF32_LE, 'UTF-32'), (codecs.BOM_UTF32_BE, 'UTF-32'),
              (codecs.BOM_UTF16_LE, 'UTF-16'), (codecs.BOM_UTF16_BE, 'UTF-16'))


def check_plain_text(path: str) -> None:
    """Refuse a source that is not text in one line: a packed file (gzip, zip, ...) or Parquet by
    its first bytes; a text file saved as UTF-16 or UTF-32 (Windows' "Unicode") by its byte-order
    mark, or without one, by NUL bytes where its start reads as plain text in UTF-16 or UTF-32 (as
    UTF-8, Latin text would read with NULs between its characters)."""
    with open(path, 'rb') as f:
        head = f.read(4096)
    packed = next(((name, fix) for magic, name, fix in _PACKED if head.startswith(magic)), None)
    if packed:
        raise UserError(f'{path}: the file is {packed[0]}, not text', packed[1])
    stem, ext = os.path.splitext(path)
    convert = f'{shlex.quote(path)} > {shlex.quote(stem + ".utf8" + ext)}'
    for bom, name in _WIDE_BOMS:
        if head.startswith(bom):
            raise UserError(f'{path}: the file is {name} (it starts with a {name} byte-order mark), not UTF-8; '
                            f'convert it first, e.g. iconv -f {name} -t UTF-8 {convert}')
    if b'\0' not in head:  # UTF-16 text holds NULs: beside each ASCII character (a newline), in 一 (U+4E00) ...
        return
    if _decodes(head, 'utf-8') and head.count(0) < len(head) // 4:  # UTF-8 with a few NULs: Latin UTF-16 has one a pair
        return
    plain = {}
    for name, width in (('UTF-16LE', 2), ('UTF-16BE', 2), ('UTF-32LE', 4), ('UTF-32BE', 4)):
        with contextlib.suppress(UnicodeDecodeError):
            text = head[:len(head) // width * width].decode(name.lower())
            plain[name] = sum(map(_plain, text)) / max(len(text), 1)
    name = max(plain, key=plain.get, default=None)  # the byte order it reads best in (ASCII read the other way is CJK)
    if name and plain[name] >= 0.9:  # reads as text that way: never a few stray NULs in a UTF-8 file
        raise UserError(f'{path}: the file is {name} without a byte-order mark, not UTF-8; convert it first, '
                        f'e.g. iconv -f {name} -t UTF-8 {convert}')


def _plain(ch: str) -> bool:
    """A character of plain Chinese or English text: printable ASCII, a line break or tab, a CJK
    character, CJK or full-width punctuation."""
    return (' ' <= ch <= '~' or ch in '\n\r\t' or '\u4e00' <= ch <= '\u9fff' or '\u3400' <= ch <= '\u4dbf'
            or '\u3000' <= ch <= '\u303f' or '\uff00' <= ch <= '\uffef')


# --------------------------------------------------------------------------- columns


@dataclass(frozen=True)
class Columns:
    """The source's columns (or JSON keys, or list positions) that become the output's, in
    output order. kind 'auto' (no column flag given): pairs when the source has a prompt or a
    response column, else raw text when it has a text column; :meth:`resolve` decides it from
    the source's names."""

    kind: str  # 'pairs', 'text' or 'auto'
    source: tuple[str, ...]  # pairs and auto: (prompt, response); text: (text,)
    guessed: bool = False  # resolved from 'auto': no column flag was given

    @classmethod
    def of(cls, prompt_col: str | None = None, response_col: str | None = None,
           text_col: str | None = None) -> Columns:
        """From the flags given (None: not given)."""
        if text_col is not None and (prompt_col is not None or response_col is not None):
            given = ' and '.join(f for f, v in (('--prompt_col', prompt_col), ('--response_col', response_col))
                                 if v is not None)
            raise UserError(f'--text_col and {given} are both given: give --text_col=... for raw text, or '
                            f'--prompt_col=... --response_col=... for prompt/response pairs, not both')
        for flag, value in (('--prompt_col', prompt_col), ('--response_col', response_col), ('--text_col', text_col)):
            if value is not None and not str(value):
                raise UserError(f'{flag} is empty: give the name of a column of the input')
        if text_col is not None:
            return cls('text', (str(text_col),))
        kind = 'auto' if prompt_col is None and response_col is None else 'pairs'
        return cls(kind, (str(PAIR_COLUMNS[0] if prompt_col is None else prompt_col),
                          str(PAIR_COLUMNS[1] if response_col is None else response_col)))

    @property
    def names(self) -> tuple[str, ...]:
        """The output's columns."""
        return KINDS['pairs' if self.kind == 'auto' else self.kind]

    def resolve(self, names) -> Columns:
        """The kind decided from the source's column names (auto only: pairs unless the source
        has no prompt and no response column but a text column)."""
        names = list(names)
        if self.kind != 'auto':
            return self
        if not any(c in names for c in self.source) and TEXT_COLUMN in names:
            return Columns('text', (TEXT_COLUMN,), guessed=True)
        return Columns('pairs', self.source, guessed=True)

    @property
    def fix(self) -> str:
        if self.guessed or self.kind == 'auto':
            return 'pass --prompt_col=... --response_col=... (pairs), or --text_col=... (raw text)'
        if self.kind == 'text':
            return 'pass --text_col=... (the column holding the text)'
        return 'pass --prompt_col=... --response_col=...'


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
    """Collects the columns' values of JSON records into tables of BATCH_ROWS rows. A record is
    an object, or a list when the columns are given as positions (--prompt_col=0). Columns of
    kind 'auto' are resolved from the first record's keys."""

    def __init__(self, path: str, cols: Columns):
        self.path, self.cols = path, cols
        self.values: list[list[str | None]] = [[] for _ in cols.names]
        self.wheres: list = []  # to name a record Arrow refuses (a lone surrogate)
        self.chars = 0
        self.first = True  # the first batch: a text field of no text at all in it is a column named wrong
        self.texts = 0  # values of the text field that were JSON strings (first batch)
        self.non_texts: list = []  # ... and that were numbers or booleans (made text), a few kept to show
        self.keys: list = []  # the first record's keys, to name the others

    def add(self, record: Any, where) -> pa.Table | None:
        """where: a string, or a function giving one (called only to report an error)."""
        if self.cols.kind == 'auto' and isinstance(record, dict):
            self.cols = self.cols.resolve(record.keys())
            self.values = [[] for _ in self.cols.names]
        source = self.cols.source
        if isinstance(record, list) and all(k.isdigit() for k in source):
            record = dict(enumerate(record))
            keys = tuple(int(k) for k in source)
        elif isinstance(record, list):
            example = {'text': '--text_col=0', 'pairs': '--prompt_col=0 --response_col=1'}.get(
                self.cols.kind, '--prompt_col=0 --response_col=1 (pairs), or --text_col=0 (raw text)')
            raise UserError(f'{self.path}: {place(where)}: a row is a list, which has no column names; pass the '
                            f'positions of the columns, e.g. {example}')
        elif not isinstance(record, dict):
            raise UserError(f'{self.path}: {place(where)}: expected a JSON object, got {type(record).__name__}')
        else:
            keys = source
        for key in keys:
            if key not in record:
                raise UserError(f'{self.path}: {place(where)}: record has no field {key!r} '
                                f'(has: {show_names(record)}); {self.cols.fix}')
        if self.first and not self.keys:
            self.keys = list(record)
        for key, column in zip(keys, self.values):
            raw = record[key]
            try:
                value = _to_text(raw)
            except TypeError as kind:
                raise UserError(f'{self.path}: {place(where)}: field {key!r} is {kind}, expected text') from None
            if self.first and self.kind == 'text':
                if isinstance(raw, str):
                    self.texts += 1
                elif value is not None:
                    self.non_texts.append(value)
            column.append(value)
            self.chars += len(value) if value is not None else 0
        self.wheres.append(where)
        # characters, not bytes (no encoding pass): a batch holds at most ~4x BATCH_TEXT_BYTES
        return self.take() if len(self.wheres) >= BATCH_ROWS or self.chars >= BATCH_TEXT_BYTES else None

    def take(self) -> pa.Table:
        if self.first and self.kind == 'text' and self.non_texts and not self.texts:
            shown = ', '.join(self.non_texts[:3])
            others = [str(k) for k in self.keys if str(k) != self.cols.source[0]]
            raise UserError(f'{self.path}: field {self.cols.source[0]!r} holds numbers or true/false, not text '
                            f'({shown}, ...: every one of the first {len(self.non_texts):,} records); is it the field '
                            f'you meant?' + (f' the records also have: {", ".join(others[:8])}' if others else ''),
                            'pass --text_col=... (the field holding the text)')
        self.first = False
        try:
            table = pa.Table.from_arrays([pa.array(v, pa.string()) for v in self.values],
                                         schema=OUTPUT_SCHEMAS[self.kind])
        except UnicodeEncodeError:
            raise self._not_unicode() from None
        self.values, self.wheres, self.chars = [[] for _ in self.values], [], 0
        return table

    @property
    def kind(self) -> str:
        return 'pairs' if self.cols.kind == 'auto' else self.cols.kind

    def _not_unicode(self) -> UserError:
        """JSON may escape half of a UTF-16 pair alone (\\ud800): valid JSON, not text."""
        for i, where in enumerate(self.wheres):
            for key, column in zip(self.cols.source, self.values):
                value = column[i]
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


def tables(path: str, cols: Columns, records) -> Iterator[pa.Table]:
    """records: (record, where) pairs -> tables of BATCH_ROWS rows (and a last, shorter one)."""
    batcher = RecordBatcher(path, cols)
    for record, where in records:
        table = batcher.add(record, where)
        if table is not None:
            yield table
    yield batcher.take()


def decoded_lines(path: str) -> Iterator[tuple[int, str, int]]:
    """(line number, text with its end, raw byte length) of each line of a UTF-8 text file, read
    bounded: a line over MAX_RECORD_BYTES is refused by its number, unheld; a BOM on the first
    line dropped; bytes that are not UTF-8 are one line naming where (JSONL and .txt read this)."""
    from model.data import read_guard
    from model.data.read_guard import iter_bounded_lines, too_long

    with open(path, 'rb') as f:
        for line_no, (raw, whole) in enumerate(iter_bounded_lines(f, read_guard.MAX_RECORD_BYTES), start=1):
            if not whole:
                raise too_long(path, f'line {line_no}', 'MAX_RECORD_BYTES', RECORD_FIX)
            try:
                yield line_no, raw.decode('utf-8-sig' if line_no == 1 else 'utf-8'), len(raw)
            except UnicodeDecodeError:
                raise build_utf8_error(path) from None
