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
import re
import shlex
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

import pyarrow as pa

from model.errors import UserError
from model.data.files import KINDS, PAIR_COLUMNS, TEXT_COLUMN, show_names

from model.prep.output import BATCH_ROWS, OUTPUT_SCHEMAS

READ_CHUNK_BYTES = 1 << 20  # read size of the JSON parser and the UTF-8 scanner
BATCH_TEXT_BYTES = 16 << 20  # a batch of records is handed on at this much text, even if short of BATCH_ROWS
RECORD_FIX = 'no training row is that long: split or drop such records before converting'
BOM = codecs.BOM_UTF8


# --------------------------------------------------------------------------- UTF-8


class BadUtf8(NamedTuple):
    """The first bytes of a file that are not UTF-8, and the text before them."""

    line: int  # 1-based
    offset: int  # of the bad bytes
    bad: bytes
    line_start: int  # offset of that line's first byte
    wide_before: int  # UTF-8 characters beyond ASCII in the lines before it (a byte-order mark not counted)


_UTF8_LEADS = bytes(range(0xc2, 0xf5))  # the first byte of each UTF-8 character beyond ASCII
_UTF8_LEADS_3 = bytes(range(0xe0, 0xf5))  # ... of three or four bytes (every Chinese one)


def _count(data: bytes, byte_set: bytes) -> int:
    """How many bytes of data are in byte_set (e.g. _UTF8_LEADS: UTF-8 characters beyond ASCII)."""
    return len(data) - len(data.translate(None, byte_set))


def find_bad_utf8(path: str) -> BadUtf8 | None:
    """The first invalid UTF-8 in a file, or None."""
    line, offset, pending, line_start, wide, wide_lines, bom = 1, 0, b'', 0, 0, 0, None
    with open(path, 'rb') as f:
        while True:
            chunk = f.read(READ_CHUNK_BYTES)
            data = pending + chunk
            bom = data.startswith(BOM) if bom is None else bom
            try:
                # final=False leaves a character cut by the chunk boundary for the next read
                _, used = codecs.utf_8_decode(data, 'strict', not chunk)
                bad = None
            except UnicodeDecodeError as e:
                used, bad = e.start, data[e.start:e.end]
            newline = data.rfind(b'\n', 0, used)
            if newline >= 0:  # the complete lines so far: a character of another encoding may read as UTF-8
                line_start, wide_lines = offset + newline + 1, wide + _count(data[:newline + 1], _UTF8_LEADS)  # in its own line
            line += data.count(b'\n', 0, used)
            wide += _count(data[:used], _UTF8_LEADS)
            if bad is not None:
                return BadUtf8(line, offset + used, bad, line_start, wide_lines - (bom and line_start > 0))
            offset += used
            pending = data[used:]
            if not chunk:
                return None


GUESS_BYTES = 1 << 20  # what the encoding hint reads of the bad line, from near the bad byte on
LINE_BACK = 4096  # of the bad line's text before the bad byte, what is read
LINES_BYTES = 256 << 10  # of the lines after it, what is judged line by line
SCAN_BYTES = 64 << 20  # how far "UTF-8 again?" is looked for past those, before two files are said


def build_utf8_error(path: str) -> UserError:
    """The one line that says why a file is not UTF-8 and how to convert it: the whole file in
    another encoding (the one it reads best in, with the iconv command); one line of another
    encoding, or a stray byte, among UTF-8 text; UTF-8 up to a line and another encoding from
    there; lines of two encodings mixed; a file cut short; or not text at all. UTF-8 text = lines
    beyond ASCII that read as UTF-8, before the bad line or after it."""
    found = find_bad_utf8(path)
    size = os.path.getsize(path)
    stem, ext = os.path.splitext(path)
    quoted, converted = shlex.quote(path), shlex.quote(stem + '.utf8' + ext)
    if found is None:  # changed since the reader met it
        return UserError(f'{path}: not UTF-8; convert it to UTF-8 first (iconv -l lists encodings)')
    where = f'line {found.line}: byte 0x{found.bad.hex()} at offset {found.offset}'
    if found.offset + len(found.bad) == size and _char_begun(found.bad):
        return UserError(f'{path}: line {found.line}: the file ends inside a character (byte 0x{found.bad.hex()}): '
                         f'it was cut short; copy or write it again')
    with open(path, 'rb') as f:
        bom = f.read(len(BOM)) == BOM  # a UTF-8 mark on the file, whatever its text
        start = max(found.line_start, found.offset - LINE_BACK, len(BOM) if bom else 0)
        f.seek(start)
        part = f.read(GUESS_BYTES)  # the bad line, from near the bad byte
        at = found.offset - start
        end = part.find(b'\n', at)
        line = part[:end] if end >= 0 else part
        f.seek(start + end + 1)
        after = f.read(LINES_BYTES) if end >= 0 else b''  # the lines after it
    window = part[at:at + 4096]
    controls = _count(window, _CONTROL_BYTES)
    if controls > len(window) // 20:  # text holds few: a binary file
        return UserError(f'{path}: not a text file ({controls} control bytes in the {len(window)} from offset '
                         f'{found.offset}); give a text file')
    later = after.split(b'\n')
    # the last piece: a line cut by the window (judged from the next offset on), or the empty one after a final
    # newline; a last line without one is whole
    later = later if len(after) < LINES_BYTES and not after.endswith(b'\n') else later[:-1]
    kinds = [_line_kind(x) for x in later]
    utf8_after = 'utf8' in kinds
    others = [found.line + 1 + i for i, k in enumerate(kinds) if k == 'other']
    long_line = found.offset - found.line_start > LINE_BACK or end < 0 and len(part) == GUESS_BYTES
    see = (f'tail -c +{found.offset + 1} {quoted} | head -c 300' if long_line else  # the line is too long to show
           f'tail -c +4 {quoted} | sed -n \'1p\'' if bom and found.line == 1 else f'sed -n \'{found.line}p\' {quoted}')
    # UTF-8 text before the bad byte: in the lines before it, or Chinese UTF-8 (three-byte characters, which a
    # character or two of GBK seldom read as) in its own line before it
    utf8_before = found.wide_before or _count(part[:at], _UTF8_LEADS_3) >= 4
    if not utf8_before and not utf8_after:  # no UTF-8 beyond ASCII: the whole file is in another encoding
        guess = _guess(part[at:] if end < 0 else part[at:end] + b'\n' + after)

        def command(encoding: str) -> str:
            skip = ' -c' if guess.unread else ''  # iconv stops at the first byte it cannot read; -c leaves it out
            return (f'tail -c +4 {quoted} | iconv{skip} -f {encoding} -t UTF-8 > {converted}' if bom else
                    f'iconv{skip} -f {encoding} -t UTF-8 {quoted} > {converted}')

        if guess:  # GB18030 is GBK's superset (four-byte characters: rare names, emoji): it converts both
            article = 'an' if guess.label[0] in 'AEIOU' else 'a'
            return UserError(f'{path}: {where} is not UTF-8 ({article} {guess.label} file' +
                             (' behind a UTF-8 byte-order mark' if bom else '') + '?)' +
                             (f', with damaged bytes that read in no encoding ({guess.unread} in the part read: '
                              f'iconv -c leaves them out)' if guess.unread else '') +
                             f'; convert it first, e.g. {command(guess.iconv)}' +
                             (f'; if that reads wrong: {command(guess.other)}' if guess.other else ''))
        if others or not _decodes(line[at + len(found.bad):], 'utf-8'):
            return UserError(f'{path}: {where} is not UTF-8, nor {_NAMED}; convert it to UTF-8 from its encoding '
                             f'first: iconv -f <ENCODING> -t UTF-8 {quoted} > {converted} (iconv -l lists encodings)')
    if not others:  # this line only
        if _decodes(line[at + len(found.bad):], 'utf-8', final=end >= 0):  # UTF-8 again right after it, to the line's end
            return UserError(f'{path}: {where} is not UTF-8, while the rest of that line is: a stray byte or a '
                             f'damaged (cut) character; fix or remove it or that line (see it: {see} | od -c | head)')
        # the line from where UTF-8 reads wrong on (a character or two of another encoding may read as
        # UTF-8 before it: the few starts that could be its character's first byte), over a few lengths
        # (UTF-8 may come back later in the line)
        guess = max((_guess(line[first:first + length]) for first in range(max(0, at - 3), at + 1)
                     for length in (4096, 512, 128, 32)), key=lambda g: g.share if g else -1.0)
        cut = ' -c' if long_line else ''  # head -c may cut the last character shown
        if guess:
            return UserError(f'{path}: {where} is not UTF-8, though the text around it is: that line is in another '
                             f'encoding ({guess.label}?) or damaged; fix or remove it (see it: {see} | iconv{cut} -f '
                             f'{guess.iconv} -t UTF-8' + (f', or {see} | iconv{cut} -f {guess.other} -t UTF-8'
                                                          if guess.other else '') + ')')
        return UserError(f'{path}: {where} is not UTF-8, though the text around it is: that line holds bytes of '
                         f'another encoding (e.g. Windows quotes 0x93 0x94) or damage; fix or remove it (see it: '
                         f'{see} | od -c | head)')
    guess = _guess(b'\n'.join([line[at:]] + [x for x, k in zip(later, kinds) if k == 'other']))
    named = f' ({guess.label}?)' if guess else ''
    judged = sum(len(x) + 1 for x in later)  # the bytes of the lines judged, each with its newline
    again = None if utf8_after else _utf8_line_after(path, start + end + 1 + judged, found.line + 1 + len(later))
    if not utf8_after and again is None:  # UTF-8 up to this line, another encoding from it on (two files put together?)
        # where the second part begins: its line's start, or, where the UTF-8 is only before it in its own line (a
        # first file without a final newline), the bad byte
        split = found.line_start if found.wide_before else found.offset
        skip = ' -c' if guess and guess.unread else ''
        convert = (f'{{ head -c {split} {quoted}; tail -c +{split + 1} {quoted} | iconv{skip} -f {guess.iconv} '
                   f'-t UTF-8; }} > {converted}' if guess else '')
        before = 'the lines before it are UTF-8' if found.wide_before else 'the text before it in its line is UTF-8'
        return UserError(f'{path}: {where}: {before}, the text from it on is not{named}: two files put together?; '
                         f'convert the part from offset {split} on' +
                         (f', e.g. {convert}' if convert else ' from its encoding (iconv -l lists encodings)'))
    shown = ', '.join(map(str, [found.line, *others][:5]))
    return UserError(f'{path}: {where}: lines of UTF-8 (e.g. line {again or found.line + 1 + kinds.index("utf8")}) and '
                     f'lines of another encoding{named} are mixed ({1 + len(others)} of the {1 + len(later)} lines from '
                     f'line {found.line} are not UTF-8, e.g. lines {shown}); fix or remove those lines (list them: '
                     f'LC_ALL=C.UTF-8 grep -naxv \'.*\' {quoted} | head)')


def _utf8_line_after(path: str, offset: int, line: int) -> int | None:
    """The number of the first line beyond ASCII that reads as UTF-8 from offset (line ``line``
    starts there) on, looked for over SCAN_BYTES; None if none."""
    with open(path, 'rb') as f:
        f.seek(offset)
        pending, scanned = b'', 0
        while scanned < SCAN_BYTES:
            chunk = f.read(READ_CHUNK_BYTES)
            scanned += len(chunk)
            lines = (pending + chunk).split(b'\n')
            pending = lines.pop() if chunk else b''
            for i, text in enumerate(lines if chunk else [*lines, pending]):
                if _line_kind(text) == 'utf8':
                    return line + i
            line += len(lines)
            if not chunk:
                return None
    return None


def _char_begun(data: bytes) -> bool:
    """data is the start of a UTF-8 character of several bytes, cut short."""
    need = 2 if 0xc2 <= data[0] <= 0xdf else 3 if 0xe0 <= data[0] <= 0xef else 4 if 0xf0 <= data[0] <= 0xf4 else 0
    return len(data) < need and all(0x80 <= b <= 0xbf for b in data[1:])


def _line_kind(line: bytes) -> str:
    """'ascii', 'utf8' (UTF-8 beyond ASCII) or 'other' (not UTF-8)."""
    if line.isascii():
        return 'ascii'
    return 'utf8' if _decodes(line, 'utf-8', final=True) else 'other'


GUESS_CHARS = 20_000  # the characters beyond ASCII it judges a reading by
_CONTROL_BYTES = bytes([*range(0, 9), *range(14, 27), *range(28, 32)])  # not tab, line ends, form feed, ESC


def _chinese(ch: str) -> bool:
    """A character of everyday Chinese text: GB2312's punctuation and 6,763 simplified characters,
    or Big5's punctuation and 5,401 frequent (traditional) characters -- not kana, which GB2312 also
    holds (Big5 text read as GBK turns into kana)."""
    if _kana(ch):
        return False
    with contextlib.suppress(UnicodeEncodeError):
        lead = ch.encode('gb2312')[0]
        if 0xa1 <= lead <= 0xa3 or 0xb0 <= lead <= 0xf7:
            return True
    with contextlib.suppress(UnicodeEncodeError):
        return 0xa1 <= ch.encode('big5')[0] <= 0xc6
    return False


def _japanese(ch: str) -> bool:
    """Kana, kanji, CJK and full-width punctuation: not the half-width kana Shift-JIS reads most of
    GBK's bytes as."""
    return '\u3000' <= ch <= '\u30ff' or '\u4e00' <= ch <= '\u9fff' or '\uff01' <= ch <= '\uff5e'


def _kana(ch: str) -> bool:
    return '\u3041' <= ch <= '\u30ff'


@dataclass(frozen=True)
class _Encoding:
    label: str  # as a user names it
    iconv: str  # as iconv (and `iconv -l`) names it
    codec: str  # as Python names it
    errors: str  # Python's error handler when decoding it
    family: str  # readings of one family are one guess (GB18030 holds CP936; CP932 Shift-JIS)
    everyday: Any  # str -> bool: a character of everyday text in it (text decoded wrongly holds few)


# in order of preference where readings tie; Windows' code pages where the standard one fails on
# their extra characters (CP936's euro sign, CP932's circled numbers)
def _cp936_euro(error: UnicodeDecodeError) -> tuple[str, int]:
    """CP936's one byte GBK lacks: 0x80 alone is the euro sign (Python's cp936 is its gbk); any
    other byte it cannot read is replaced, as the other readings' are."""
    if error.object[error.start:error.end] == b'\x80':
        return '\u20ac', error.end
    return '\ufffd', error.end


codecs.register_error('chat_small_t5.cp936', _cp936_euro)

_ENCODINGS = (_Encoding('GBK / GB18030', 'GB18030', 'gb18030', 'replace', 'GBK', _chinese),
              _Encoding('GBK (Windows CP936)', 'CP936', 'gbk', 'chat_small_t5.cp936', 'GBK', _chinese),
              _Encoding('Big5', 'BIG5', 'big5', 'replace', 'Big5', _chinese),
              _Encoding('Big5-HKSCS', 'BIG5-HKSCS', 'big5hkscs', 'replace', 'Big5', _chinese),  # Hong Kong's Big5+
              _Encoding('Shift-JIS', 'SHIFT_JIS', 'shift_jis', 'replace', 'Japanese', _japanese),
              _Encoding('Shift-JIS (Windows CP932)', 'CP932', 'cp932', 'replace', 'Japanese', _japanese),
              _Encoding('EUC-JP', 'EUC-JP', 'euc_jp', 'replace', 'Japanese', _japanese))
_NAMED = 'GBK / GB18030, Big5 or Shift-JIS / EUC-JP'


def _neutral(ch: str) -> bool:
    """Emoji, symbols and marks: everyday in no encoding, nor a sign of a wrong reading."""
    return ch >= '\U00010000' or '\u2000' <= ch <= '\u2bff' or '\ufe00' <= ch <= '\ufe0f'


class _Reading(NamedTuple):
    share: float  # of everyday characters among those judged
    rank: int  # the encoding's place in _ENCODINGS (lower: preferred where readings tie)
    encoding: _Encoding
    unread: int  # bytes it could not decode (damage)


def _readings(data: bytes) -> list[_Reading]:
    """How data (a file's part, perhaps cut inside a character at its end) reads in each encoding
    it reads in, best first. A reading may meet a byte it cannot decode once in a hundred
    characters (a damaged byte, a field cut inside a character); emoji and symbols count for no
    reading; one that decodes into nothing else counts for GB18030 (only it decodes four-byte
    emoji). Japanese text holds kana: a Japanese reading without them is no reading."""
    out = []
    for rank, enc in enumerate(_ENCODINGS):
        text = codecs.getincrementaldecoder(enc.codec)(enc.errors).decode(data, final=False)
        wide = [ch for ch in text if ch > '\x7f'][:GUESS_CHARS]
        unread = wide.count('\ufffd')
        if unread > len(wide) // 100:
            continue
        judged = [ch for ch in wide if ch != '\ufffd' and not _neutral(ch)]
        if not judged:
            if wide and enc.codec == 'gb18030':
                out.append(_Reading(1.0, rank, enc, unread))
            continue
        if enc.family == 'Japanese' and sum(map(_kana, judged)) < len(judged) / 10:
            continue
        out.append(_Reading(sum(map(enc.everyday, judged)) / len(judged), rank, enc, unread))
    return sorted(out, key=lambda r: (-round(r.share, 2), r.rank))  # near ties: the preferred one


class _Guess(NamedTuple):
    label: str  # e.g. 'GBK / GB18030', or two families' 'GBK / GB18030 or Big5'
    iconv: str  # iconv's name of the best reading's encoding
    other: str  # iconv's name of another family's nearly as good reading, or ''
    share: float
    unread: int  # bytes the best reading could not decode


def _guess(data: bytes) -> _Guess | None:
    """The encoding data reads best in, or None: of the encodings it reads in, the one whose
    reading holds the largest share of everyday characters (at least half) -- most bytes decode
    in several (Big5 text reads as GBK, GBK as Shift-JIS's half-width kana), only the right one
    reads into common characters; within a family (GB18030 and CP936) the preferred one unless it
    reads clearly worse. Where another family's reading is nearly as good (a few characters), both
    are named. A GBK file may hold private-use characters (GBK's user-defined area): they count
    against it, never rule it out."""
    good = [r for r in _readings(data) if r.share >= 0.5]
    if not good:
        return None
    best = min((r for r in good if r.encoding.family == good[0].encoding.family and r.share >= good[0].share - 0.05),
               key=lambda r: r.rank)
    rival = next((r.encoding for r in good if r.encoding.family != best.encoding.family
                  and r.share >= best.share - 0.1), None)
    label = f'{best.encoding.label} or {rival.label}' if rival else best.encoding.label
    return _Guess(label, best.encoding.iconv, rival.iconv if rival else '', best.share, best.unread)


_UNPACK = 'unpack it first and give the file inside it'
_PACKED = ((rb'\x1f\x8b', 'gzip-compressed', _UNPACK), (rb'BZh[1-9]1AY&SY', 'bzip2-compressed', _UNPACK),
           (rb'\xfd7zXZ\x00', 'xz-compressed', _UNPACK), (rb'\x28\xb5\x2f\xfd', 'zstd-compressed', _UNPACK),
           (rb'PK\x03\x04', 'a zip archive (an .xlsx or .docx is one)',
            'unpack it first and give the file inside it; a spreadsheet: save it as CSV UTF-8'),
           (rb'\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1', 'an Office document (.xls / .doc)',
            'save it as CSV UTF-8 (or text) first'),
           (rb'7z\xbc\xaf\x27\x1c', 'a 7z archive', _UNPACK), (rb'Rar!\x1a\x07', 'a RAR archive', _UNPACK),
           (rb'\x89PNG\r\n\x1a\n', 'a PNG image', 'give a text file'),
           (rb'\xff\xd8\xff', 'a JPEG image', 'give a text file'),
           (rb'GIF8[79]a', 'a GIF image', 'give a text file'), (rb'\x7fELF', 'a program (ELF)', 'give a text file'),
           (rb'%PDF-\d', 'a PDF', 'extract its text first (e.g. pdftotext)'))  # whole signatures: text may begin "BZh"


def _packed(path: str, head: bytes) -> tuple[str, str] | None:
    """(what the file is, the fix) where its first bytes (and a Parquet file's last ones) say it is
    not text, else None."""
    for magic, name, fix in _PACKED:
        if re.match(magic, head):
            return name, fix
    if head.startswith(b'PAR1') and os.path.getsize(path) >= 8:
        with open(path, 'rb') as f:
            f.seek(-4, os.SEEK_END)
            if f.read(4) == b'PAR1':
                return 'Parquet', 'give it a name ending in .parquet'
    return None


def _decodes(data: bytes, encoding: str, final: bool = False) -> bool:
    """data is text in encoding (final=False: a file's part, perhaps cut inside a character at its end)."""
    try:
        codecs.getincrementaldecoder(encoding)().decode(data, final=final)
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
    packed = _packed(path, head)
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
                # the records before it had the field: this one lacks it (not a column named wrong)
                fix = ('give this record the field too (a null value is kept, and prepare_data.py clean drops the row), '
                       'or remove it' if self.keys else self.cols.fix)
                raise UserError(f'{self.path}: {place(where)}: record has no field {key!r} '
                                f'(has: {show_names(record)}){" while the records before it have it" if self.keys else ""}; {fix}')
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
