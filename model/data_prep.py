"""Data preparation: convert, split, check, clean, and a built-in demo corpus.

Every command streams (pyarrow batches in, row groups out), so a file larger
than RAM works; only ``split`` below ``max_in_memory_rows`` holds a table, to
use sklearn's ``train_test_split`` as the guide does. Outputs have exactly the
string columns ``prompt`` and ``response`` in row groups of ``ROW_GROUP_ROWS``
rows, and are written to a temporary file that is renamed into place, so a
failed run leaves no partial file behind.

``prepare_data.py`` exposes these functions as commands: it parses the flags and prints.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import random
import re
import zlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from config import PRESETS, TrainConfigPretrainLarge, UserError
from model import ownership
from model.files import (TEXT_COLUMNS, as_text, blank_mask, count_rows, is_text_type, iter_text_tables,
                         open_parquet, resolve_parquet_files)
from model.ownership import DATA

ROW_GROUP_ROWS = 65536  # rows per output row group: the training streamer shuffles at this grain
BATCH_ROWS = 8192  # rows per read batch: bounds memory per step, big enough for vectorised work
IN_MEMORY_ROWS = 2_000_000  # split with sklearn up to this many rows, stream beyond
TOKEN_SAMPLE_ROWS = 100_000  # rows tokenized by `check` (tokenizing is ~100x slower than counting)
TEXT_CHUNK_BYTES = 1 << 20  # read size of the JSON list parser and the UTF-8 scanner

OUTPUT_SCHEMA = pa.schema([('prompt', pa.string()), ('response', pa.string())])
FORMATS = ('csv', 'json', 'jsonl', 'parquet')
_EXTENSIONS = {'.csv': 'csv', '.json': 'json', '.jsonl': 'jsonl', '.ndjson': 'jsonl',
               '.parquet': 'parquet', '.pq': 'parquet'}


# --- writing ----------------------------------------------------------------


class RowGroupWriter:
    """Buffers incoming tables so every row group but the last has ROW_GROUP_ROWS rows."""

    def __init__(self, writer: pq.ParquetWriter):
        self._writer = writer
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self.rows_written = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._pending.append(build_output_table(table))
        self._pending_rows += table.num_rows
        if self._pending_rows >= ROW_GROUP_ROWS:
            self._flush(final=False)

    def close(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        table = pa.concat_tables(self._pending) if self._pending else None
        self._pending, self._pending_rows = [], 0
        if table is None:
            return
        full = table.num_rows if final else table.num_rows - table.num_rows % ROW_GROUP_ROWS
        if full:
            self._writer.write_table(table.slice(0, full), row_group_size=ROW_GROUP_ROWS)
            self.rows_written += full
        if full < table.num_rows:
            self._pending, self._pending_rows = [table.slice(full)], table.num_rows - full


def build_output_table(table: pa.Table | pa.RecordBatch) -> pa.Table:
    """The prompt/response columns as plain `string` (inputs may hold large_string)."""
    arrays = [table.column(name).cast(pa.string()) for name in TEXT_COLUMNS]
    return pa.Table.from_arrays(arrays, schema=OUTPUT_SCHEMA)


def check_outputs(outputs: dict[str, str], inputs=()) -> None:
    """Before any work: each output is a new path or a Parquet file this toolkit wrote, in a
    writable place, distinct from the others, and never an input (or where a later read of
    the input folder or pattern would pick it up)."""
    specs = [os.fspath(x) for x in (inputs if isinstance(inputs, (list, tuple)) else [inputs]) if x]
    files = []
    for spec in specs:
        try:
            files += resolve_parquet_files(spec) if not os.path.isfile(spec) else [spec]
        except UserError:
            pass  # a missing input is reported by its reader
    seen: dict[str, str] = {}
    for what, path in outputs.items():
        real = os.path.realpath(path)
        if real in seen:
            raise UserError(f'--{what} and --{seen[real]} are the same file: {path}')
        seen[real] = what
        ownership.check_not_an_input(path, files, f'--{what}', specs)
        ownership.check_replaceable(path, DATA, f'--{what}', folder=False)
        ownership.check_writable(path, f'--{what}')


@contextlib.contextmanager
def open_parquet_output(path: str, command: str = '') -> Iterator[RowGroupWriter]:
    """A RowGroupWriter on a temporary file next to ``path``, renamed into place on success.

    The footer carries the toolkit's marker, so a later command may replace this file; any
    other file at ``path`` is refused before anything is written.
    """
    ownership.check_replaceable(path, DATA, 'output', folder=False)
    target = os.path.abspath(path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = ownership.temp_path(target)
    writer = None
    try:
        with ownership.disk_errors('the output', path):
            writer = pq.ParquetWriter(tmp, OUTPUT_SCHEMA.with_metadata(
                ownership.parquet_metadata(DATA, command=command)))
            rows = RowGroupWriter(writer)
            yield rows
            rows.close()
            writer.close()
            writer = None
        os.replace(tmp, target)
    finally:
        if writer is not None:
            writer.close()
        if os.path.exists(tmp):
            os.unlink(tmp)


# --- reading: format detection and UTF-8 errors -----------------------------


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


def find_bad_utf8(path: str) -> tuple[int, int, bytes] | None:
    """(line, byte offset, bad bytes) of the first invalid UTF-8 in a file, or None."""
    line, offset, pending = 1, 0, b''
    with open(path, 'rb') as f:
        while True:
            chunk = f.read(TEXT_CHUNK_BYTES)
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


def _to_text(value: Any, path: str, line: int, key: str) -> str | None:
    """A JSON value as text: numbers become str, null stays null (clean drops it)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, (int, float)):
        return str(value)
    kind = 'a list' if isinstance(value, list) else 'an object'
    raise UserError(f'{path}: line {line}: field {key!r} is {kind}, expected text')


class _RecordBatcher:
    """Collects (prompt, response) of JSON records into tables of BATCH_ROWS rows."""

    def __init__(self, path: str, prompt_col: str, response_col: str):
        self.path, self.keys = path, (prompt_col, response_col)
        self.prompts: list[str | None] = []
        self.responses: list[str | None] = []

    def add(self, record: Any, line: int) -> pa.Table | None:
        if not isinstance(record, dict):
            raise UserError(f'{self.path}: line {line}: expected a JSON object, '
                            f'got {type(record).__name__}')
        for key in self.keys:
            if key not in record:
                names = ', '.join(map(str, record)) or 'none'
                raise UserError(f'{self.path}: line {line}: record has no field {key!r} (has: {names}); '
                                f'pass --prompt_col=... --response_col=...')
        self.prompts.append(_to_text(record[self.keys[0]], self.path, line, self.keys[0]))
        self.responses.append(_to_text(record[self.keys[1]], self.path, line, self.keys[1]))
        return self.take() if len(self.prompts) >= BATCH_ROWS else None

    def take(self) -> pa.Table:
        table = pa.Table.from_arrays([pa.array(self.prompts, pa.string()),
                                      pa.array(self.responses, pa.string())], schema=OUTPUT_SCHEMA)
        self.prompts, self.responses = [], []
        return table


# --- reading: one iterator per format, each yielding prompt/response tables --


def iter_jsonl(path: str, prompt_col: str, response_col: str, hint: str = '') -> Iterator[pa.Table]:
    batcher = _RecordBatcher(path, prompt_col, response_col)
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
            table = batcher.add(record, line_no)
            if table is not None:
                yield table
    yield batcher.take()


def iter_text_chunks(path: str) -> Iterator[str]:
    """Decoded text of a UTF-8 file in TEXT_CHUNK_BYTES pieces (a leading BOM dropped)."""
    decoder = codecs.getincrementaldecoder('utf-8-sig')()
    with open(path, 'rb') as f:
        while True:
            chunk = f.read(TEXT_CHUNK_BYTES)
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError:
                raise build_utf8_error(path) from None
            if text:
                yield text
            if not chunk:
                return


class JsonListScanner:
    """Reads ``[{...}, {...}, ...]`` one element at a time with raw_decode over a window.

    The window holds the unread tail of the file up to about TEXT_CHUNK_BYTES
    characters; a record longer than that grows it (doubling) until it decodes.
    """

    _SPACE = re.compile(r'[ \t\r\n]*')

    def __init__(self, path: str):
        self.path = path
        self._chunks = iter_text_chunks(path)
        self._decoder = json.JSONDecoder(strict=False)
        self.buf, self.pos, self.eof = '', 0, False
        self._line_of_buf_start = 1
        self._mark = (0, 1)  # (position in buf, its line number): counting resumes from here

    def line_at(self, pos: int) -> int:
        # incremental, because counting from the window's start for every record was quadratic
        # (1M records: 6 minutes instead of seconds)
        start, line = self._mark if pos >= self._mark[0] else (0, self._line_of_buf_start)
        line += self.buf.count('\n', start, pos)
        self._mark = (pos, line)
        return line

    def fill(self, min_chars: int) -> None:
        """Drop what was consumed and read until min_chars are unread (or the file ends)."""
        if self.pos:
            self._line_of_buf_start = self.line_at(self.pos)
            self._mark = (0, self._line_of_buf_start)
            self.buf, self.pos = self.buf[self.pos:], 0
        parts, have = [self.buf], len(self.buf)
        while have < min_chars and not self.eof:
            chunk = next(self._chunks, None)
            if chunk is None:
                self.eof = True
                break
            parts.append(chunk)
            have += len(chunk)
        self.buf = ''.join(parts)

    def peek(self) -> str:
        """The next non-space character ('' at the end of the file), not consumed."""
        while True:
            self.pos = self._SPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf) or self.eof:
                return self.buf[self.pos:self.pos + 1]
            self.fill(TEXT_CHUNK_BYTES)

    def expect(self, allowed: str, what: str) -> str:
        char = self.peek()
        if char == '' or char not in allowed:
            found = 'the end of the file' if char == '' else repr(char)
            raise UserError(f'{self.path}: line {self.line_at(self.pos)}: expected {what}, '
                            f'found {found}')
        self.pos += 1
        return char

    def decode_value(self) -> tuple[Any, int]:
        self.peek()  # raw_decode does not skip leading whitespace
        if len(self.buf) - self.pos < TEXT_CHUNK_BYTES // 2:
            self.fill(TEXT_CHUNK_BYTES)
        while True:
            try:
                value, end = self._decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                if self.eof or not self._may_be_cut(e):
                    raise UserError(f'{self.path}: line {self.line_at(e.pos)}: malformed JSON '
                                    f'({e.msg})') from None
                self.fill(2 * (len(self.buf) - self.pos) + TEXT_CHUNK_BYTES)
                continue
            line = self.line_at(self.pos)
            self.pos = end
            return value, line

    def _may_be_cut(self, e: json.JSONDecodeError) -> bool:
        # A valid record cut by the window fails at the window's end, except an unfinished
        # string, which json reports at its start; anything else is a real syntax error.
        return e.pos >= len(self.buf) - 16 or e.msg.startswith('Unterminated string')


def iter_json_list(path: str, prompt_col: str, response_col: str) -> Iterator[pa.Table]:
    scan = JsonListScanner(path)
    batcher = _RecordBatcher(path, prompt_col, response_col)
    scan.expect('[', 'a JSON list of objects ("[{...}, ...]")')
    if scan.peek() == ']':
        scan.pos += 1
    else:
        while True:
            record, line = scan.decode_value()
            table = batcher.add(record, line)
            if table is not None:
                yield table
            if scan.expect(',]', "',' or ']' after a list element") == ']':
                break
    if scan.peek() != '':
        raise UserError(f'{path}: line {scan.line_at(scan.pos)}: unexpected data after the '
                        f'end of the JSON list')
    yield batcher.take()


def iter_json(path: str, prompt_col: str, response_col: str) -> Iterator[pa.Table]:
    """A JSON list of objects, or JSONL saved as .json (told apart by the first character)."""
    first = JsonListScanner(path).peek()
    if first == '{':
        hint = ('; a .json file must hold a list of objects ("[{...}, ...]") '
                'or one object per line (JSONL)')
        return iter_jsonl(path, prompt_col, response_col, hint=hint)
    if first != '[':
        found = 'an empty file' if first == '' else f'{first!r}'
        raise UserError(f'{path}: line 1: expected a JSON list of objects ("[{{...}}, ...]"), '
                        f'found {found}')
    return iter_json_list(path, prompt_col, response_col)


def iter_csv(path: str, prompt_col: str, response_col: str) -> Iterator[pa.Table]:
    import pyarrow.csv as pcsv

    parse = pcsv.ParseOptions(newlines_in_values=True)  # multi-line answers are common
    read = pcsv.ReadOptions(block_size=4 << 20)
    try:
        names = pcsv.open_csv(path, read_options=read, parse_options=parse).schema.names
        _check_columns(path, names, prompt_col, response_col)
        cols = list(dict.fromkeys([prompt_col, response_col]))
        convert = pcsv.ConvertOptions(include_columns=cols,
                                      column_types={c: pa.string() for c in cols})
        reader = pcsv.open_csv(path, read_options=read, parse_options=parse,
                               convert_options=convert)
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
    try:
        pf = open_parquet(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f'{path}: not a readable Parquet file ({e})') from None
    schema = pf.schema_arrow
    _check_columns(path, schema.names, prompt_col, response_col)
    for col in (prompt_col, response_col):
        typ = schema.field(col).type
        if not is_text_type(typ):
            raise UserError(f'{path}: column {col!r} is {typ}, expected string; '
                            f'cast it to string first')
    cols = list(dict.fromkeys([prompt_col, response_col]))
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=cols):
        arrays = [as_text(batch.column(prompt_col)).cast(pa.string()),
                  as_text(batch.column(response_col)).cast(pa.string())]
        yield pa.Table.from_arrays(arrays, schema=OUTPUT_SCHEMA)


def iter_input_tables(path: str, prompt_col: str = 'prompt', response_col: str = 'response',
                      input_format: str | None = None) -> Iterator[pa.Table]:
    """prompt/response tables of any supported file, streamed."""
    if not os.path.isfile(path):
        raise UserError(f'{path}: no such file')
    readers = {'csv': iter_csv, 'json': iter_json, 'jsonl': iter_jsonl,
               'parquet': iter_parquet_columns}
    return readers[infer_format(path, input_format)](path, prompt_col, response_col)


def iter_parquet_tables(spec, columns=TEXT_COLUMNS) -> Iterator[pa.Table]:
    """Batches of one or more prompt/response Parquet files (file, folder or glob)."""
    return iter_text_tables(spec, columns, batch_rows=BATCH_ROWS)


# --- convert ----------------------------------------------------------------


def convert_to_parquet(input_path: str, output_path: str, prompt_col: str = 'prompt',
                       response_col: str = 'response', input_format: str | None = None) -> int:
    """CSV / JSON / JSONL / Parquet -> Parquet with string columns prompt, response; rows written."""
    tables = iter_input_tables(input_path, prompt_col, response_col, input_format)
    check_outputs({'output': output_path}, [input_path])
    with open_parquet_output(output_path, 'convert') as out:
        for table in tables:
            out.write(table)
    return out.rows_written


# --- split ------------------------------------------------------------------


@dataclass(frozen=True)
class SplitResult:
    train_rows: int
    valid_rows: int
    method: str  # 'sklearn' (shuffled, exact ratio) or 'streaming' (file order, ratio on average)


def split_parquet(input_spec, train_out: str, valid_out: str, valid_ratio: float = 0.1,
                  seed: int = 42, max_in_memory_rows: int = IN_MEMORY_ROWS) -> SplitResult:
    """Split rows into a train and a validation file; both appear only if both succeed."""
    if not 0 < valid_ratio < 1:
        raise UserError(f'valid_ratio must be between 0 and 1 (exclusive), got {valid_ratio}')
    total = count_rows(input_spec)
    if total < 2:
        raise UserError(f'{input_spec}: {total} row(s); a split needs at least 2')
    check_outputs({'train_out': train_out, 'valid_out': valid_out}, [input_spec])
    with open_parquet_output(train_out, 'split') as train, open_parquet_output(valid_out, 'split') as valid:
        if total <= max_in_memory_rows:
            _split_in_memory(input_spec, train, valid, valid_ratio, seed)
            method = 'sklearn'
        else:
            _split_streaming(input_spec, train, valid, valid_ratio, seed)
            method = 'streaming'
    return SplitResult(train.rows_written, valid.rows_written, method)


def _split_in_memory(input_spec, train: RowGroupWriter, valid: RowGroupWriter,
                     valid_ratio: float, seed: int) -> None:
    from sklearn.model_selection import train_test_split

    batches = list(iter_parquet_tables(input_spec))
    offsets = np.cumsum([0] + [b.num_rows for b in batches])
    train_idx, valid_idx = train_test_split(np.arange(offsets[-1]), test_size=valid_ratio,
                                            random_state=seed)
    for out, indices in ((train, train_idx), (valid, valid_idx)):
        for start in range(0, len(indices), ROW_GROUP_ROWS):
            out.write(take_rows(batches, offsets, indices[start:start + ROW_GROUP_ROWS]))


def take_rows(batches: list[pa.Table], offsets: np.ndarray, indices: np.ndarray) -> pa.Table:
    """Rows ``indices`` (global, in that order) of consecutive tables starting at ``offsets``.

    Gathers per source table: Table.take on many chunks concatenates all of them on every
    call (measured: 2x the data in memory, 2x the time).
    """
    order = np.argsort(indices, kind='stable')
    ordered = indices[order]
    source = np.searchsorted(offsets, ordered, side='right') - 1
    starts = np.flatnonzero(np.diff(source, prepend=-1))  # where each source's run begins
    ends = np.append(starts[1:], len(ordered))
    pieces = [batches[source[i]].take(ordered[i:j] - offsets[source[i]]) for i, j in zip(starts, ends)]
    return pa.concat_tables(pieces).take(np.argsort(order))


def _split_streaming(input_spec, train: RowGroupWriter, valid: RowGroupWriter,
                     valid_ratio: float, seed: int) -> None:
    # One generator for the whole file: PCG64 draws one number per row, so the split
    # does not depend on the batch size.
    rng = np.random.default_rng(seed)
    for table in iter_parquet_tables(input_spec):
        to_valid = pa.array(rng.random(table.num_rows) < valid_ratio)
        valid.write(table.filter(to_valid))
        train.write(table.filter(pc.invert(to_valid)))


# --- row statistics shared by check and clean --------------------------------


def build_row_masks(table: pa.Table, max_chars: int = 0) -> dict[str, np.ndarray]:
    """Per-row booleans: null (either field), blank (either empty/whitespace), too_long."""
    prompt, response = table.column('prompt'), table.column('response')
    null = _np(pc.or_(pc.is_null(prompt), pc.is_null(response)))
    blank = (blank_mask(prompt) | blank_mask(response)) & ~null
    too_long = np.zeros(table.num_rows, dtype=bool)
    if max_chars > 0:
        longer = pc.or_(pc.greater(pc.utf8_length(prompt), max_chars),
                        pc.greater(pc.utf8_length(response), max_chars))
        too_long = _np(longer) & ~null
    return {'null': null, 'blank': blank, 'too_long': too_long}


def _np(mask) -> np.ndarray:
    """A boolean Arrow array as numpy, null counted as False."""
    return np.asarray(pc.fill_null(mask, False).to_numpy(), dtype=bool)


def row_digest(prompt: str, response: str) -> bytes:
    """16 bytes naming a prompt/response pair (the length prefix keeps the fields apart)."""
    data = f'{len(prompt)}:{prompt}{response}'.encode('utf-8', 'surrogatepass')
    return hashlib.blake2b(data, digest_size=16).digest()


def should_keep_new(table: pa.Table, candidates: np.ndarray, seen: set[bytes]) -> np.ndarray:
    """candidates minus rows whose pair is in ``seen`` (earlier or in this batch); updates seen."""
    keep = candidates.copy()
    prompts = table.column('prompt').to_pylist()
    responses = table.column('response').to_pylist()
    for i in np.flatnonzero(candidates):
        digest = row_digest(prompts[i], responses[i])
        if digest in seen:
            keep[i] = False
        else:
            seen.add(digest)
    return keep


# --- check ------------------------------------------------------------------


def build_report(input_spec, tokenizer_dir: str | None = None,
                 max_seq_len: int = TrainConfigPretrainLarge.max_seq_len,
                 token_sample_rows: int = TOKEN_SAMPLE_ROWS, seed: int = 0) -> dict[str, Any]:
    """The guide's quality figures plus blanks, duplicates and (with a tokenizer) token lengths."""
    files = resolve_parquet_files(input_spec)
    total = count_rows(files)
    first = open_parquet(files[0])
    columns = first.schema_arrow.names
    head = next(first.iter_batches(batch_size=5), None)
    tokens = _TokenStats(tokenizer_dir, max_seq_len, token_sample_rows, total, seed) \
        if tokenizer_dir else None
    counts = {'null_prompt': 0, 'null_response': 0, 'null_rows': 0, 'blank_rows': 0,
              'duplicate_rows': 0}
    lengths: dict[str, list[np.ndarray]] = {'prompt': [], 'response': []}
    seen: set[bytes] = set()
    for table in iter_parquet_tables(files):
        masks = build_row_masks(table)
        counts['null_prompt'] += table.column('prompt').null_count
        counts['null_response'] += table.column('response').null_count
        counts['null_rows'] += int(masks['null'].sum())
        counts['blank_rows'] += int(masks['blank'].sum())
        usable = ~masks['null']
        counts['duplicate_rows'] += int(usable.sum() - should_keep_new(table, usable, seen).sum())
        for name in TEXT_COLUMNS:
            # int32 per row: 10M rows cost 40 MB; null rows are left out, as describe() would
            length = pc.drop_null(pc.utf8_length(table.column(name)))
            lengths[name].append(length.to_numpy().astype(np.int32))
        if tokens is not None:
            tokens.add(table)
    return {
        'files': files, 'rows': total, 'columns': columns, 'shape': (total, len(columns)),
        'head': head.to_pylist() if head is not None else [],
        'nulls': {'prompt': counts['null_prompt'], 'response': counts['null_response']},
        'null_rows': counts['null_rows'], 'blank_rows': counts['blank_rows'],
        'duplicate_rows': counts['duplicate_rows'],
        'prompt_chars': _describe(lengths['prompt']), 'response_chars': _describe(lengths['response']),
        'tokens': tokens.summary() if tokens is not None else None,
    }


def _describe(parts: list[np.ndarray]) -> dict[str, float]:
    import pandas as pd

    values = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return {k: float(v) for k, v in pd.Series(values, dtype='int64').describe().items()}


class _TokenStats:
    """Token lengths (eos included) of a seeded sample of at most ``sample_rows`` rows."""

    def __init__(self, tokenizer_dir: str, max_seq_len: int, sample_rows: int, total: int, seed: int):
        from model.tokenizer import load_tokenizer

        self.tok = load_tokenizer(tokenizer_dir)
        self.max_seq_len = max_seq_len
        self.keep = 1.0 if total <= sample_rows else sample_rows / total
        self.rng = np.random.default_rng(seed)
        self.lengths: dict[str, list[np.ndarray]] = {'prompt': [], 'response': []}

    def add(self, table: pa.Table) -> None:
        masks = build_row_masks(table)
        chosen = ~masks['null']
        if self.keep < 1.0:
            chosen &= self.rng.random(table.num_rows) < self.keep
        rows = table.filter(pa.array(chosen))
        for name in TEXT_COLUMNS:
            texts = rows.column(name).to_pylist()
            ids = self.tok(texts, add_special_tokens=True)['input_ids'] if texts else []
            self.lengths[name].append(np.array([len(x) for x in ids], dtype=np.int32))

    def summary(self) -> dict[str, Any]:
        prompt, response = (np.concatenate(self.lengths[name] or [np.zeros(0, np.int32)])
                            for name in TEXT_COLUMNS)
        over_p, over_r = prompt > self.max_seq_len, response > self.max_seq_len
        sampled = len(prompt)
        return {
            'sample_rows': sampled, 'sampled_all': self.keep >= 1.0, 'max_seq_len': self.max_seq_len,
            'prompt': _percentiles(prompt), 'response': _percentiles(response),
            'truncated_prompts': int(over_p.sum()), 'truncated_responses': int(over_r.sum()),
            'truncated_rows': int((over_p | over_r).sum()),
            'truncated_share': float((over_p | over_r).mean()) if sampled else 0.0,
        }


def _percentiles(values: np.ndarray) -> dict[str, int]:
    if values.size == 0:
        return {k: 0 for k in ('p50', 'p90', 'p95', 'p99', 'max')}
    p50, p90, p95, p99 = np.percentile(values, [50, 90, 95, 99])
    return {'p50': int(p50), 'p90': int(p90), 'p95': int(p95), 'p99': int(p99),
            'max': int(values.max())}


def format_report(report: dict[str, Any]) -> str:
    import pandas as pd

    lines = [f'files: {", ".join(report["files"])}',
             f'shape: {report["shape"]}', f'columns: {report["columns"]}', '', 'first 5 rows:']
    with pd.option_context('display.max_colwidth', 30, 'display.width', 160):
        lines.append(pd.DataFrame(report['head']).to_string() if report['head'] else '  (none)')
    lines += ['', 'nulls per column:'] + [f'  {k:<10} {v}' for k, v in report['nulls'].items()]
    lines += [f'rows with a null field:                 {report["null_rows"]}',
              f'rows with an empty/whitespace field:    {report["blank_rows"]}',
              f'duplicate rows (same prompt+response):  {report["duplicate_rows"]}']
    for name in TEXT_COLUMNS:
        stats = pd.Series(report[f'{name}_chars']).to_string(float_format=lambda v: f'{v:.1f}')
        lines += ['', f'{name} length (characters):', stats]
    tokens = report['tokens']
    if tokens is not None:
        sample = 'all rows' if tokens['sampled_all'] else f'a random sample of {tokens["sample_rows"]} rows'
        lines += ['', f'token lengths, eos included ({sample}):']
        for name in TEXT_COLUMNS:
            lines.append(f'  {name:<9} ' + '  '.join(f'{k} {v}' for k, v in tokens[name].items()))
        lines.append(f'rows max_seq_len={tokens["max_seq_len"]} would truncate: {tokens["truncated_rows"]} '
                     f'({100 * tokens["truncated_share"]:.2f}%; prompts {tokens["truncated_prompts"]}, '
                     f'responses {tokens["truncated_responses"]})')
    return '\n'.join(lines)


# --- clean ------------------------------------------------------------------

DROP_REASONS = ('null', 'blank', 'too_long', 'duplicate')


def clean_parquet(input_spec, output_path: str, max_chars: int = 0,
                  dedup: bool = True) -> dict[str, int]:
    """Drop null, blank, over-long (> max_chars, 0 = no limit) and repeated rows.

    Each dropped row counts under the first reason that applies, in DROP_REASONS
    order. The duplicate set costs ~100 bytes per kept row (~1 GB per 10M rows).
    """
    if max_chars < 0:
        raise UserError(f'max_chars must be >= 0 (0 = no limit), got {max_chars}')
    count_rows(input_spec)  # the inputs exist and have the columns, before anything is written
    counts = dict.fromkeys(('rows', *DROP_REASONS, 'kept'), 0)
    seen: set[bytes] = set()
    tables = iter_parquet_tables(input_spec)
    check_outputs({'output': output_path}, [input_spec])
    with open_parquet_output(output_path, 'clean') as out:
        for table in tables:
            masks = build_row_masks(table, max_chars)
            keep = np.ones(table.num_rows, dtype=bool)
            for reason in DROP_REASONS[:3]:
                counts[reason] += int((masks[reason] & keep).sum())
                keep &= ~masks[reason]
            if dedup:
                unique = should_keep_new(table, keep, seen)
                counts['duplicate'] += int(keep.sum() - unique.sum())
                keep = unique
            counts['rows'] += table.num_rows
            out.write(table.filter(pa.array(keep)))
    counts['kept'] = out.rows_written
    return counts


# --- demo corpus ------------------------------------------------------------

# Answers are a deterministic function of the prompt, so a tiny model can learn them; a few
# wordings per task make it learn the task rather than one string.
_CAPITALS = {
    '中国': '北京', '日本': '东京', '韩国': '首尔', '法国': '巴黎', '英国': '伦敦', '德国': '柏林',
    '意大利': '罗马', '俄罗斯': '莫斯科', '美国': '华盛顿', '加拿大': '渥太华', '澳大利亚': '堪培拉',
    '埃及': '开罗', '印度': '新德里', '泰国': '曼谷', '西班牙': '马德里', '希腊': '雅典',
    '葡萄牙': '里斯本', '荷兰': '阿姆斯特丹', '瑞典': '斯德哥尔摩', '挪威': '奥斯陆', '芬兰': '赫尔辛基',
    '越南': '河内', '土耳其': '安卡拉', '古巴': '哈瓦那', '秘鲁': '利马', '肯尼亚': '内罗毕',
}
_SOUNDS = {
    '狗': '汪汪', '小狗': '汪汪', '猫': '喵喵', '小猫': '喵喵', '牛': '哞哞', '羊': '咩咩',
    '鸭子': '嘎嘎', '青蛙': '呱呱', '公鸡': '喔喔', '小鸡': '叽叽', '老鼠': '吱吱', '猪': '哼哼',
    '蜜蜂': '嗡嗡', '鸽子': '咕咕', '布谷鸟': '布谷',
}
_COLOURS = {
    '苹果': '红色', '番茄': '红色', '香蕉': '黄色', '柠檬': '黄色', '玉米': '黄色', '天空': '蓝色',
    '大海': '蓝色', '草': '绿色', '树叶': '绿色', '西瓜': '绿色', '雪': '白色', '牛奶': '白色',
    '云': '白色', '煤': '黑色', '乌鸦': '黑色', '橙子': '橙色', '胡萝卜': '橙色', '茄子': '紫色',
    '葡萄': '紫色',
}
_ANTONYM_PAIRS = ('大小', '多少', '高低', '长短', '上下', '左右', '前后', '快慢', '好坏', '冷热',
                  '黑白', '开关', '早晚', '新旧', '胖瘦', '强弱', '远近', '深浅', '轻重', '真假',
                  '买卖', '进出', '来去', '东西', '南北', '难易', '宽窄', '厚薄', '软硬', '对错')
_ANTONYMS = {**{p[0]: p[1] for p in _ANTONYM_PAIRS}, **{p[1]: p[0] for p in _ANTONYM_PAIRS}}
_FACT_TABLES = {'capital': _CAPITALS, 'sound': _SOUNDS, 'colour': _COLOURS, 'antonym': _ANTONYMS}
_FACT_KEYS = {task: sorted(table) for task, table in _FACT_TABLES.items()}
_WORDS = ('cat', 'dog', 'sun', 'red', 'blue', 'book', 'milk', 'fish', 'bird', 'tree', 'apple',
          'hello', 'world', 'happy', 'green', 'water', 'good', 'day', 'night', 'star', 'moon',
          'rain', 'snow', 'king', 'love', 'home', 'time', 'china', 'music', 'game', 'code', 'data')
_SUBJECTS = ('我', '你', '他', '她', '我们', '小明', '小红', '老师', '妈妈', '爸爸', '哥哥', '妹妹')
_TIMES = ('今天', '明天', '昨天', '早上', '晚上', '周末', '现在')
_ACTIVITIES = ('去学校', '看书', '吃饭', '喝水', '跑步', '唱歌', '写字', '买菜', '看电影', '打球',
               '学习中文', '画画', '回家', '睡觉', '做作业', '听音乐', '去公园', '洗衣服')
_WEATHER = ('很好', '不好', '很热', '很冷', '晴朗', '多云')
_REVERSE_CHARS = '春夏秋冬东南西北山水日月天地人口手花草鱼鸟风雨云星0123456789'

_TEMPLATES = {
    'add': ('计算：{a}+{b}=', '{a}加{b}等于多少？', '{a}+{b}等于几？', '请算：{a}加上{b}'),
    'sub': ('计算：{a}-{b}=', '{a}减{b}等于多少？', '{a}-{b}等于几？', '请算：{a}减去{b}'),
    'max': ('{a}和{b}哪个大？', '{a}与{b}相比哪个更大？', '{a}和{b}中较大的是？', '比较{a}和{b}，哪个大？'),
    'capital': ('{x}的首都是哪里？', '{x}的首都是？', '请问{x}的首都在哪个城市？', '说出{x}的首都。'),
    'sound': ('{x}怎么叫？', '{x}是怎么叫的？', '{x}的叫声是什么？', '{x}会发出什么声音？'),
    'colour': ('{x}是什么颜色的？', '{x}是什么颜色？', '请问{x}的颜色是？', '说出{x}的颜色。'),
    'antonym': ('{x}的反义词是什么？', '{x}的反义词是？', '请说出{x}的反义词。', '和{x}意思相反的字是？'),
    'copy': ('请重复：{x}', '重复一遍：{x}', '照抄这句话：{x}', '跟我说：{x}'),
    'reverse': ('倒序输出：{x}', '把“{x}”倒过来写', '请把{x}反过来', '{x}倒过来是什么？'),
    'upper': ('把{x}变成大写', '{x}的大写是什么？', '请写出{x}的大写字母', '大写：{x}'),
}
_TASK_WEIGHTS = {'add': 12, 'sub': 8, 'max': 8, 'capital': 12, 'sound': 10, 'colour': 10,
                 'antonym': 12, 'copy': 12, 'reverse': 10, 'upper': 6}

DEMO_EXAMPLES = (  # (prompt, expected answer), one per task; asked at the end of the demo run
    ('计算：23+45=', '68'),
    ('法国的首都是哪里？', '巴黎'),
    ('小狗怎么叫？', '汪汪'),
    ('香蕉是什么颜色的？', '黄色'),
    ('大的反义词是什么？', '小'),
    ('请重复：今天天气很好', '今天天气很好'),
    ('倒序输出：春夏秋冬', '冬秋夏春'),
    ('把cat变成大写', 'CAT'),
)


def demo_prompts() -> list[str]:
    """Fixed prompts, one per demo task, for the trainer to answer at the end of the demo."""
    return [prompt for prompt, _ in DEMO_EXAMPLES]


def build_demo_sample(rng: random.Random) -> tuple[str, str]:
    """One (prompt, response) of a randomly chosen task and wording."""
    task = rng.choices(list(_TASK_WEIGHTS), weights=list(_TASK_WEIGHTS.values()))[0]
    template = rng.choice(_TEMPLATES[task])
    if task in ('add', 'sub', 'max'):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        if task == 'sub':
            a, b = max(a, b), min(a, b)
        if task == 'max' and a == b:
            b = (a + 1) % 50
        answer = {'add': a + b, 'sub': a - b, 'max': max(a, b)}[task]
        return template.format(a=a, b=b), str(answer)
    if task in _FACT_TABLES:
        key = rng.choice(_FACT_KEYS[task])
        return template.format(x=key), _FACT_TABLES[task][key]
    if task == 'copy':
        text = _build_demo_sentence(rng)
        return template.format(x=text), text
    if task == 'reverse':
        text = ''.join(rng.choice(_REVERSE_CHARS) for _ in range(rng.randint(3, 6)))
        return template.format(x=text), text[::-1]
    word = rng.choice(_WORDS)
    return template.format(x=word), word.upper()


def _build_demo_sentence(rng: random.Random) -> str:
    when = rng.choice(_TIMES)
    if rng.random() < 0.25:
        return f'{when}天气{rng.choice(_WEATHER)}'
    return f'{rng.choice(_SUBJECTS)}{when}{rng.choice(_ACTIVITIES)}'


def should_go_to_valid(prompt: str) -> bool:
    # By prompt, not by draw: a prompt lives in one split only, so validation rows are
    # unseen prompts (another wording of a known fact, new numbers or sentences).
    return zlib.crc32(prompt.encode('utf-8')) % 10 == 0


Pairs = list[tuple[str, str]]


def iter_demo_rows(rows: int = 20000, seed: int = 42) -> Iterator[tuple[bool, str, str]]:
    """(goes to validation, prompt, response) until ~10% validation and the rest train are
    drawn: disjoint prompts, same task mix, nothing held in memory."""
    if rows < 10:
        raise UserError(f'--rows must be at least 10, got {rows}')
    n_valid = max(1, round(rows * 0.1))
    want = {False: rows - n_valid, True: n_valid}
    have = {False: 0, True: 0}
    rng = random.Random(seed)
    for _ in range(100 * rows):  # ~10 draws per valid row are needed; the bound only guards a bug
        prompt, response = build_demo_sample(rng)
        side = should_go_to_valid(prompt)
        if have[side] < want[side]:
            have[side] += 1
            yield side, prompt, response
        if have == want:
            return
    raise AssertionError('demo generator could not fill the validation split')


def build_demo_rows(rows: int = 20000, seed: int = 42) -> tuple[Pairs, Pairs]:
    """(train, valid) pairs of :func:`iter_demo_rows`, in memory (for small corpora and tests)."""
    out: dict[bool, Pairs] = {False: [], True: []}
    for side, prompt, response in iter_demo_rows(rows, seed):
        out[side].append((prompt, response))
    return out[False], out[True]


def write_demo(out_dir: str | None = None, rows: int = 20000, seed: int = 42) -> dict[str, int]:
    """Write train.parquet and valid.parquet to out_dir, streamed; returns {path: rows}."""
    out_dir = out_dir or os.path.dirname(PRESETS['demo']['train_file'])
    paths = {False: os.path.join(out_dir, 'train.parquet'), True: os.path.join(out_dir, 'valid.parquet')}
    if rows < 10:
        raise UserError(f'--rows must be at least 10, got {rows}')
    check_outputs({'out_dir (train.parquet)': paths[False], 'out_dir (valid.parquet)': paths[True]})
    pending: dict[bool, Pairs] = {False: [], True: []}

    def flush(side: bool, out: RowGroupWriter) -> None:
        pairs, pending[side] = pending[side], []
        out.write(pa.Table.from_arrays([pa.array([p for p, _ in pairs], pa.string()),
                                        pa.array([r for _, r in pairs], pa.string())], schema=OUTPUT_SCHEMA))

    with open_parquet_output(paths[False], 'demo') as train, open_parquet_output(paths[True], 'demo') as valid:
        writers = {False: train, True: valid}
        for side, prompt, response in iter_demo_rows(rows, seed):
            pending[side].append((prompt, response))
            if len(pending[side]) >= BATCH_ROWS:
                flush(side, writers[side])
        for side, out in writers.items():
            flush(side, out)
    return {paths[False]: train.rows_written, paths[True]: valid.rows_written}
