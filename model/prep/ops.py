"""convert, split, clean and check: the operations of `prepare_data.py`, all streamed, on either
kind of data (model/data/files.py ``KINDS``): prompt/response pairs, or raw text (a text column).
Clean, split and check take the kind from the input's columns, and write the same kind.

Only ``split`` below ``max_in_memory_rows`` holds a table, to use sklearn's
``train_test_split`` as the guide does; every other operation reads batches and writes
row groups, so a file larger than RAM works.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from config import TrainConfigPretrainLarge
from model.errors import UserError
from model.data.files import (KINDS, blank_mask, count_rows, describe_kind, files_kind, iter_text_tables, open_parquet,
                              resolve_parquet_files)
from model.prep.output import (BATCH_ROWS, ROW_GROUP_ROWS, RowGroupWriter, check_outputs, open_parquet_output,
                               open_parquet_outputs)
from model.prep.readers import ReadStats, iter_input_tables
from model.prep.records import Columns

IN_MEMORY_ROWS = 2_000_000  # split with sklearn up to this many rows, stream beyond
HEAD_CHARS = 200  # characters of a value `check` shows (the table cuts them to 30)
TOKEN_SAMPLE_ROWS = 100_000  # rows tokenized by `check` (tokenizing is ~100x slower than counting)


def n_rows(n: int) -> str:
    """'1 row', '2 rows': a count of rows as the commands print it."""
    return f'{n} row' if n == 1 else f'{n} rows'


def input_kind(spec, command: str) -> str:
    """The one kind of the Parquet files of spec (file, folder or glob): 'pairs' or 'text'."""
    return files_kind(resolve_parquet_files(spec), command)


def iter_parquet_tables(spec, kind: str = 'pairs'):
    """Batches of the kind's columns of one or more Parquet files (file, folder or glob)."""
    return iter_text_tables(spec, KINDS[kind], batch_rows=BATCH_ROWS)


# --- convert ----------------------------------------------------------------


@dataclass(frozen=True)
class ConvertResult:
    rows: int
    kind: str  # 'pairs' or 'text'
    blank_lines: int  # a .txt file's blank lines, skipped
    rows_in_values: tuple = ()  # a CSV's values holding whole rows of the file: (data row, column, lines), a few
    values_with_rows: int = 0  # how many such values in all

    def notes(self) -> list[str]:
        """What convert says beside its count: values that may be rows merged by a stray quote."""
        if not self.values_with_rows:
            return []
        row, column, lines = self.rows_in_values[0]
        more = f' (and {self.values_with_rows - 1} more value(s) like it)' if self.values_with_rows > 1 else ''
        return [f'data row {row}\'s {column!r} holds {lines} lines that read as whole rows of this file{more}: a quote '
                f'(") opened in that row and closed only rows later, by a stray quote, makes the rows between one '
                f'value; check that row (a value that really holds such lines is kept as it is)']


def convert_file(input_path: str, output_path: str, prompt_col: str | None = None, response_col: str | None = None,
                 input_format: str | None = None, text_col: str | None = None,
                 delimiter: str | None = None, quoting: str | None = None) -> ConvertResult:
    """CSV / TSV / JSON / JSONL / Parquet / .txt -> Parquet with string columns prompt, response
    (pairs) or text (raw text). The columns are those given (None: not given); with none given, the
    source's prompt and response, else its text column (a .txt file: each line). delimiter: a
    CSV's (None: a comma, a tab for TSV); quoting: csv or none (None: csv)."""
    stats = ReadStats()
    tables = iter_input_tables(input_path, Columns.of(prompt_col, response_col, text_col), input_format, stats,
                               delimiter, quoting)
    check_outputs({'output': output_path}, [input_path])
    first = next(tables, None)  # every reader yields at least one table: its columns tell the kind
    kind = 'text' if first is not None and first.column_names == list(KINDS['text']) else 'pairs'
    usable = 0  # rows with text in every column (what training reads), counted until there is one
    with open_parquet_output(output_path, 'convert', kind) as out:
        for table in itertools.chain([first] if first is not None else [], tables):
            if not usable:  # until the first usable row: no more work after it
                masks = build_row_masks(table)
                usable = table.num_rows - int((masks['null'] | masks['blank']).sum())
            out.write(table)
        # raised inside: no file is written (training on it would only fail later, far from here)
        if out.rows_total == 0:
            blank = f' ({stats.blank_lines} blank line(s) skipped)' if stats.blank_lines else ''
            raise UserError(f'{input_path}: no rows to convert{blank}; nothing written to {output_path}')
        if usable == 0:
            rows = ('its one row lacks text in a column (empty, whitespace or null)' if out.rows_total == 1 else
                    f'none of its {out.rows_total} rows has text in every column (each is empty, whitespace or null)')
            raise UserError(f'{input_path}: {rows}; nothing written to {output_path}')
    return ConvertResult(out.rows_written, kind, stats.blank_lines, tuple(stats.rows_in_values), stats.values_with_rows)


def convert_to_parquet(input_path: str, output_path: str, prompt_col: str | None = None,
                       response_col: str | None = None, input_format: str | None = None,
                       text_col: str | None = None) -> int:
    """convert_file's rows written."""
    return convert_file(input_path, output_path, prompt_col, response_col, input_format, text_col).rows


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
        raise UserError(f'{input_spec}: {n_rows(total)}; a split needs at least 2')
    if max_in_memory_rows < 0:
        raise UserError(f'max_in_memory_rows must be >= 0, got {max_in_memory_rows}')
    kind = input_kind(input_spec, 'split')
    in_memory = total <= max_in_memory_rows
    if in_memory and not 0 < math.ceil(valid_ratio * total) < total:
        raise UserError(f'valid_ratio={valid_ratio} of {total} rows leaves one side empty; choose a ratio '
                        f'between {1 / total:.2g} and {1 - 1 / total:.4g}')
    check_outputs({'train_out': train_out, 'valid_out': valid_out}, [input_spec])
    with open_parquet_outputs([train_out, valid_out], 'split', kind) as (train, valid):
        if in_memory:
            _split_in_memory(input_spec, kind, train, valid, valid_ratio, seed)
        else:
            _split_streaming(input_spec, kind, train, valid, valid_ratio, seed)
        for name, out in (('train', train), ('validation', valid)):
            if out.rows_total == 0:  # raised inside: neither file is written
                raise UserError(f'valid_ratio={valid_ratio}: the {name} side got no row of {total}; '
                                f'choose a ratio further from {0 if name == "validation" else 1}')
    return SplitResult(train.rows_written, valid.rows_written, 'sklearn' if in_memory else 'streaming')


def _split_in_memory(input_spec, kind: str, train: RowGroupWriter, valid: RowGroupWriter,
                     valid_ratio: float, seed: int) -> None:
    from sklearn.model_selection import train_test_split

    batches = list(iter_parquet_tables(input_spec, kind))
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


def _split_streaming(input_spec, kind: str, train: RowGroupWriter, valid: RowGroupWriter,
                     valid_ratio: float, seed: int) -> None:
    # One generator for the whole file: PCG64 draws one number per row, so the split
    # does not depend on the batch size.
    rng = np.random.default_rng(seed)
    for table in iter_parquet_tables(input_spec, kind):
        to_valid = pa.array(rng.random(table.num_rows) < valid_ratio)
        valid.write(table.filter(to_valid))
        train.write(table.filter(pc.invert(to_valid)))


# --- row statistics shared by check and clean --------------------------------


def build_row_masks(table: pa.Table, max_chars: int = 0) -> dict[str, np.ndarray]:
    """Per-row booleans over the table's columns (prompt and response, or text): null (any
    field), blank (any empty/whitespace), too_long (any over max_chars)."""
    null = np.zeros(table.num_rows, dtype=bool)
    blank = np.zeros(table.num_rows, dtype=bool)
    too_long = np.zeros(table.num_rows, dtype=bool)
    for column in table.columns:
        null |= _np(pc.is_null(column))
        blank |= blank_mask(column)
        if max_chars > 0:
            too_long |= _np(pc.greater(pc.utf8_length(column), max_chars))
    return {'null': null, 'blank': blank & ~null, 'too_long': too_long & ~null}


def _np(mask) -> np.ndarray:
    """A boolean Arrow array as numpy, null counted as False."""
    return np.asarray(pc.fill_null(mask, False).to_numpy(), dtype=bool)


def row_digest(*fields: str) -> bytes:
    """16 bytes naming a row: a prompt/response pair or a text (the length prefixes keep the
    fields apart)."""
    data = ''.join(f'{len(f)}:{f}' for f in fields[:-1]) + fields[-1]
    return hashlib.blake2b(data.encode('utf-8', 'surrogatepass'), digest_size=16).digest()


def unseen_rows(table: pa.Table, candidates: np.ndarray, seen: set[bytes]) -> np.ndarray:
    """candidates minus rows whose fields are in ``seen`` (earlier or in this batch); updates seen."""
    keep = candidates.copy()
    columns = [column.to_pylist() for column in table.columns]
    for i in np.flatnonzero(candidates):
        digest = row_digest(*(column[i] for column in columns))
        if digest in seen:
            keep[i] = False
        else:
            seen.add(digest)
    return keep


# --- check ------------------------------------------------------------------


def build_report(input_spec, tokenizer_dir: str | None = None,
                 max_seq_len: int = TrainConfigPretrainLarge.max_seq_len,
                 token_sample_rows: int = TOKEN_SAMPLE_ROWS, seed: int = 0) -> dict[str, Any]:
    """The guide's quality figures plus blanks, duplicates and (with a tokenizer) token lengths,
    per column of the files' kind (prompt and response, or text)."""
    files = resolve_parquet_files(input_spec)
    total = count_rows(files)
    kind = files_kind(files, 'check')
    names = KINDS[kind]
    columns = open_parquet(files[0]).schema_arrow.names
    head: list[dict] | None = None
    tokens = _TokenStats(tokenizer_dir, max_seq_len, token_sample_rows, total, seed, names) \
        if tokenizer_dir else None
    counts = {'null_rows': 0, 'blank_rows': 0, 'duplicate_rows': 0}
    nulls = dict.fromkeys(names, 0)
    lengths: dict[str, list[np.ndarray]] = {name: [] for name in names}
    seen: set[bytes] = set()
    for table in iter_parquet_tables(files, kind):
        if head is None:  # the first rows of the first file, cut for display (pandas formats a value whole)
            head = _head_rows(table.slice(0, 5))
        masks = build_row_masks(table)
        counts['null_rows'] += int(masks['null'].sum())
        counts['blank_rows'] += int(masks['blank'].sum())
        usable = ~masks['null']
        counts['duplicate_rows'] += int(usable.sum() - unseen_rows(table, usable, seen).sum())
        for name in names:
            nulls[name] += table.column(name).null_count
            # int32 per row: 10M rows cost 40 MB; null rows are left out, as describe() would
            length = pc.drop_null(pc.utf8_length(table.column(name)))
            lengths[name].append(length.to_numpy().astype(np.int32))
        if tokens is not None:
            tokens.add(table)
    return {
        'files': files, 'rows': total, 'columns': columns, 'shape': (total, len(columns)), 'kind': kind,
        'head': head or [], 'nulls': nulls, **counts,
        'usable_rows': total - counts['null_rows'] - counts['blank_rows'],  # what train reads (iter_usable_rows)
        **{f'{name}_chars': _describe(lengths[name]) for name in names},
        'tokens': tokens.summary() if tokens is not None else None,
    }


def _head_rows(table: pa.Table, chars: int = HEAD_CHARS) -> list[dict]:
    cut = {name: pc.utf8_slice_codeunits(table.column(name), 0, chars) for name in table.column_names}
    return pa.table(cut).to_pylist()


def _describe(parts: list[np.ndarray]) -> dict[str, float]:
    import pandas as pd

    values = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return {k: float(v) for k, v in pd.Series(values, dtype='int64').describe().items()}


class _TokenStats:
    """Token lengths (eos included) of a seeded sample of at most ``sample_rows`` rows."""

    def __init__(self, tokenizer_dir: str, max_seq_len: int, sample_rows: int, total: int, seed: int,
                 names: tuple[str, ...] = KINDS['pairs']):
        from model.data.tokenizer import load_tokenizer, text_cut_chars

        self.tok = load_tokenizer(tokenizer_dir)
        self.tokenizer_dir = tokenizer_dir
        self.max_seq_len = max_seq_len
        self.cut_chars = text_cut_chars(self.tok, max_seq_len)  # longer texts: counted up to there
        self.cut = 0
        self.keep = 1.0 if total <= sample_rows else sample_rows / total
        self.rng = np.random.default_rng(seed)
        self.lengths: dict[str, list[np.ndarray]] = {name: [] for name in names}

    def add(self, table: pa.Table) -> None:
        masks = build_row_masks(table)
        chosen = ~masks['null']
        if self.keep < 1.0:
            chosen &= self.rng.random(table.num_rows) < self.keep
        rows = table.filter(pa.array(chosen))
        from model.data.tokenizer import cut_texts

        for name in self.lengths:
            texts = rows.column(name).to_pylist()
            self.cut += sum(len(t) > self.cut_chars for t in texts)
            ids = self.tok(cut_texts(texts, self.cut_chars), add_special_tokens=True)['input_ids'] if texts else []
            self.lengths[name].append(np.array([len(x) for x in ids], dtype=np.int32))

    def summary(self) -> dict[str, Any]:
        from model.data.tokenizer import check_sentinels

        try:
            check_sentinels(self.tokenizer_dir)  # train's own check
            sentinels = None
        except UserError as e:
            sentinels = e.message
        values = {name: np.concatenate(parts or [np.zeros(0, np.int32)]) for name, parts in self.lengths.items()}
        over = {name: v > self.max_seq_len for name, v in values.items()}
        any_over = np.logical_or.reduce(list(over.values()))
        sampled = len(any_over)
        return {
            'sample_rows': sampled, 'sampled_all': self.keep >= 1.0, 'max_seq_len': self.max_seq_len,
            'cut_texts': self.cut, 'cut_chars': self.cut_chars,
            **{name: _percentiles(v) for name, v in values.items()},
            'truncated': {name: int(o.sum()) for name, o in over.items()},
            'truncated_rows': int(any_over.sum()),
            'truncated_share': float(any_over.mean()) if sampled else 0.0,
            'no_sentinels': sentinels,  # why span corruption refuses this tokenizer (None: it takes it)
        }


def _percentiles(values: np.ndarray) -> dict[str, int]:
    if values.size == 0:
        return {k: 0 for k in ('p50', 'p90', 'p95', 'p99', 'max')}
    p50, p90, p95, p99 = np.percentile(values, [50, 90, 95, 99])
    return {'p50': int(p50), 'p90': int(p90), 'p95': int(p95), 'p99': int(p99),
            'max': int(values.max())}


def format_report(report: dict[str, Any]) -> str:
    import pandas as pd

    names = list(report['nulls'])
    lines = [f'files: {", ".join(report["files"])}',
             f'kind: {describe_kind(report["kind"])}',
             f'shape: {report["shape"]}', f'columns: {report["columns"]}', '', 'first 5 rows:']
    with pd.option_context('display.max_colwidth', 30, 'display.width', 160):
        lines.append(pd.DataFrame(report['head']).to_string() if report['head'] else '  (none)')
    lines += ['', 'nulls per column:'] + [f'  {k:<10} {v}' for k, v in report['nulls'].items()]
    what = 'prompt+response' if report['kind'] == 'pairs' else 'text'
    lines += [f'rows with a null field:                 {report["null_rows"]}',
              f'rows with an empty/whitespace field:    {report["blank_rows"]}',
              f'duplicate rows (same {what}):{" " * (17 - len(what))}{report["duplicate_rows"]}']
    for name in names:
        stats = pd.Series(report[f'{name}_chars']).to_string(float_format=lambda v: f'{v:.1f}')
        lines += ['', f'{name} length (characters):', stats]
    tokens = report['tokens']
    if tokens is not None:
        sample = 'all rows' if tokens['sampled_all'] else f'a random sample of {tokens["sample_rows"]} rows'
        cut = (f'; {tokens["cut_texts"]} text(s) over {tokens["cut_chars"]:,} characters counted up to there'
               if tokens['cut_texts'] else '')
        lines += ['', f'token lengths, eos included ({sample}{cut}):']
        for name in names:
            lines.append(f'  {name:<9} ' + '  '.join(f'{k} {v}' for k, v in tokens[name].items()))
        each = ', '.join(f'{name}s {n}' for name, n in tokens['truncated'].items()) if len(names) > 1 else ''
        if tuple(names) == KINDS['text']:  # span corruption packs whole documents
            lines.append(f'documents over max_seq_len={tokens["max_seq_len"]} tokens: {tokens["truncated_rows"]} '
                         f'({100 * tokens["truncated_share"]:.2f}%); span corruption packs whole documents and cuts '
                         f'the stream, so none is truncated')
        else:
            lines.append(f'rows max_seq_len={tokens["max_seq_len"]} would truncate: {tokens["truncated_rows"]} '
                         f'({100 * tokens["truncated_share"]:.2f}%{"; " + each if each else ""})')
        if tuple(names) == KINDS['text'] and tokens['no_sentinels']:
            lines.append(f'note: --objective=span_corruption refuses this tokenizer: {tokens["no_sentinels"]}')
    if tuple(names) == KINDS['text']:
        note = dominant_document(report['text_chars'])
        if note:
            lines += ['', note]
    lines += ['', f'usable rows (text in every column, as train reads them): {report["usable_rows"]} of {report["rows"]}']
    return '\n'.join(lines)


def dominant_document(chars: dict[str, float]) -> str | None:
    """A note when one document holds a large share of a text corpus (a book saved as one line, a
    whole file pasted into one cell): span corruption packs documents into one stream, so a run would
    learn mostly that one. Said when the longest holds over a tenth of all characters and is over
    twenty times the median -- not for a handful of documents of like length."""
    count, mean, longest, median = (chars.get(k, 0.0) for k in ('count', 'mean', 'max', '50%'))
    total = count * mean
    if count < 2 or total <= 0 or longest <= 0.1 * total or longest <= 20 * max(median, 1.0):
        return None
    return (f'note: the longest document ({int(longest):,} characters) holds {100 * longest / total:.0f}% of all '
            f'the text (the median document: {int(median):,}); a run would learn mostly that one: split it into '
            f'its lines or paragraphs, or leave it out (prepare_data.py clean IN OUT --max_chars=N)')


def check_verdict(report: dict[str, Any]) -> None:
    """UserError, after the report, when train would refuse these files: no usable row."""
    if report['usable_rows'] == 0:
        raise UserError(f'{", ".join(report["files"])}: no row has text in every column ({report["null_rows"]} with '
                        f'a null field, {report["blank_rows"]} blank, of {report["rows"]}): train refuses it; '
                        f'convert or clean the source again')


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
    kind = input_kind(input_spec, 'clean')  # the inputs exist and have the columns, before anything is written
    counts = dict.fromkeys(('rows', *DROP_REASONS, 'kept'), 0)
    seen: set[bytes] = set()
    tables = iter_parquet_tables(input_spec, kind)
    check_outputs({'output': output_path}, [input_spec])
    with open_parquet_output(output_path, 'clean', kind) as out:
        for table in tables:
            masks = build_row_masks(table, max_chars)
            keep = np.ones(table.num_rows, dtype=bool)
            for reason in DROP_REASONS[:3]:
                counts[reason] += int((masks[reason] & keep).sum())
                keep &= ~masks[reason]
            if dedup:
                unique = unseen_rows(table, keep, seen)
                counts['duplicate'] += int(keep.sum() - unique.sum())
                keep = unique
            counts['rows'] += table.num_rows
            out.write(table.filter(pa.array(keep)))
        if out.rows_total == 0:  # raised inside: no file is written
            words = {'blank': 'empty/whitespace', 'too_long': 'too long'}  # as the command's count line says them
            dropped = ', '.join(f'{words.get(r, r)} {counts[r]}' for r in DROP_REASONS if counts[r])
            hint = '; raise --max_chars (0 = no limit)' if counts['too_long'] else ''
            if not counts['rows']:
                raise UserError(f'{input_spec}: no rows to clean; nothing written to {output_path}')
            raise UserError(f'{input_spec}: no row left of {counts["rows"]} (dropped: {dropped}){hint}; '
                            f'nothing written to {output_path}')
    counts['kept'] = out.rows_written
    return counts


