"""Reading what users give: one guard at every reader boundary, and the per-record limits.

:class:`ReadGuard` turns whatever a reader or its codec raises on malformed content (pyarrow,
ijson, json, csv, codecs, the OS when a file vanishes mid-read) into one ``UserError`` naming
the file and, where the reader knows it, the place (row group, line, element). A
``UserError`` passes as it is; ``MemoryError`` and every ``BaseException`` (Ctrl-C, a stop
signal) are never caught, nor are the errors only a bug makes (``NameError``,
``AttributeError``, ``AssertionError``, ``ImportError``).

The limits bound the memory one record may take, checked as data streams: a line is read with
a bounded ``readline``, a JSON record through :class:`ReadBudget`, a Parquet row group from its
footer before it is read. No heavy imports: chat and plot use this too.
"""

from __future__ import annotations

from typing import Callable, Iterator

from model.errors import UserError

MAX_RECORD_BYTES = 16 << 20  # one JSONL line, JSON record, CSV row, converted Parquet row, chat line
MAX_ROW_GROUP_TEXT_BYTES = 128 << 20  # prompt + response bytes of one Parquet row group (footer)
MAX_LOG_LINE_BYTES = 64 << 10  # `plot` skips longer log lines (the trainer's are under 1 KiB)

_BUGS = (AssertionError, AttributeError, NameError, ImportError)
DAMAGED_FIX = 'the file is damaged or not in the format its name says; write it again from the source'


def human_size(n: int) -> str:
    for unit, shift in (('GiB', 30), ('MiB', 20), ('KiB', 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f'{value:.0f} {unit}' if value == int(value) else f'{value:.1f} {unit}'
    return f'{n} bytes'


def describe_error(e: BaseException, path: str = '') -> str:
    """The first line of an exception's message (the path, which readers repeat, left out)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ''
    if path:
        text = text.replace(f"'{path}'", 'it').replace(path, 'it')
    text = text if len(text) <= 200 else text[:200] + '...'
    return f'{type(e).__name__}: {text}' if text else type(e).__name__


class ReadGuard:
    """``with ReadGuard(path) as guard:`` reading; ``guard.at('row group 3')`` as it moves on.

    Raising from ``__exit__`` replaces the reader's exception with the one line.
    """

    def __init__(self, path: str, fix: str = DAMAGED_FIX):
        self.path, self.fix, self.where = str(path), fix, ''

    def at(self, where: str) -> ReadGuard:
        self.where = where
        return self

    def __enter__(self) -> ReadGuard:
        return self

    def __exit__(self, typ, exc, tb) -> bool:
        if typ is None or not issubclass(typ, Exception) or issubclass(typ, (UserError, MemoryError, *_BUGS)):
            return False
        where = f'{self.where}: ' if self.where else ''
        fix = self.fix
        if isinstance(exc, PermissionError):
            fix = 'this user may not read it: check its permissions (ls -l)'
        elif isinstance(exc, FileNotFoundError):
            fix = 'it was moved or deleted while it was read'
        raise UserError(f'{self.path}: {where}cannot be read ({describe_error(exc, self.path)}); {fix}') from None


def guarded(path: str, make: Callable[[], Iterator], fix: str = DAMAGED_FIX) -> Iterator:
    """The items of ``make()`` (called lazily), its failures as one line about ``path``."""
    with ReadGuard(path, fix):
        yield from make()


# --------------------------------------------------------------------------- bounded reads


def iter_bounded_lines(f, limit: int) -> Iterator[tuple[bytes | str, bool]]:
    """(line, whole) of a stream opened in binary or text mode. A line longer than ``limit``
    comes as its first ``limit`` bytes (characters) with whole=False; the rest of it is read
    in pieces of ``limit`` and dropped, never held."""
    while True:
        line, whole = read_bounded_line(f, limit)
        if not line:
            return
        if whole:
            yield line, True
            continue
        while True:
            rest = f.readline(limit)
            if not rest or rest[-1:] in (b'\n', '\n'):
                break
        yield line[:limit], False


def read_bounded_line(f, limit: int) -> tuple[bytes | str, bool]:
    """(line, whole): the next line of at most ``limit`` bytes (characters), its newline
    included; whole=False when it is longer (its first limit + 1 read, the rest left unread)."""
    line = f.readline(limit + 1)
    return line, len(line) <= limit or line[-1:] in (b'\n', '\n')


def find_long_line(f, limit: int) -> int | None:
    """The offset of the first line (ended by LF, CR or CRLF) of a binary stream longer than
    ``limit`` bytes, its end left out; None if none. Read in pieces of ``limit`` bytes, held one
    at a time: a line between two line ends in one piece is shorter, so only the lines across
    pieces are measured."""
    start = pos = 0  # the current line's start; the piece's
    while piece := f.read(limit):
        ends = [i for i in (piece.find(b'\n'), piece.find(b'\r')) if i >= 0]
        if pos + (min(ends) if ends else len(piece)) - start > limit:
            return start
        if ends:
            start = pos + max(piece.rfind(b'\n'), piece.rfind(b'\r')) + 1
        pos += len(piece)
    return None


def too_long(path: str, where: str, limit_name: str, fix: str) -> UserError:
    limit = globals()[limit_name]  # looked up now: tests lower the limits
    return UserError(f'{path}: {where} is longer than {human_size(limit)} (read_guard.{limit_name}); {fix}')


class ReadBudget:
    """A binary file whose reads count the bytes since the last record was taken; past
    ``limit`` the read raises instead of handing the parser more of the same record.

    ijson holds a value until it is complete: this is what bounds it. The count includes the
    parser's read-ahead, so a record is refused at most one read size earlier.
    """

    def __init__(self, f, limit: int, refuse: Callable[[], Exception]):
        self.f, self.limit, self.refuse = f, limit, refuse
        self.since = 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n if n >= 0 else self.limit + 1)
        self.since += len(data)
        if self.since > self.limit:
            raise self.refuse()
        return data

    def took_record(self) -> None:
        self.since = 0
