"""Reading the rows of an epoch's windows from Parquet, on demand, in bounded memory.

A window is slices of up to ``mix_row_groups`` row groups (model/data/epoch_order.py), read
column-pruned to its kind's columns (``prompt`` and ``response``, or ``text``) and held as Arrow text. A row group is read
sequentially across the windows that take from it (one open stream each), so every row is read
once per epoch. Memory per reading process: the loaded window(s) (about ``shuffle_window_rows``
rows, two while a batch or length group straddles a boundary), one read-ahead batch per open
row group (``shuffle_window_rows / mix_row_groups`` rows at most 8192) and the reader's page
buffers. Nothing else grows with the data. A page that cannot be read (a file damaged or
replaced since the run started) is one line naming the file and the row group, at any step.
"""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model.data.epoch_order import EpochPlan, RowGroupSlice
from model.data import read_guard
from model.data.files import (PAIR_COLUMNS, as_text, blank_mask, check_utf8, open_parquet, row_group_text_bytes,
                         short_read_error)
from model.data.read_guard import ReadGuard

STREAM_BATCH_ROWS = 8192  # at most this many rows per Arrow batch when streaming a row group's slices
READ_BUFFER_BYTES = 4 << 20  # page-wise reads: a huge column chunk is not loaded at once
MAX_OPEN_FILES = 8  # many small files: keep only a few open


class Window:
    __slots__ = ('index', 'start', 'perm', 'columns', 'row_index', 'blank')

    def __init__(self, index, start, perm, columns: list, row_index):
        self.index, self.start, self.perm = index, start, perm
        self.columns, self.row_index = columns, row_index
        self.blank = np.zeros(len(perm), dtype=bool)
        for column in columns:
            self.blank |= blank_mask(column)  # null, empty or whitespace only

    @property
    def end(self) -> int:
        return self.start + len(self.perm)

    def texts(self, raw: np.ndarray) -> list[list]:
        """Each column's texts of rows `raw` (read order) as Python strings."""
        return [column.take(raw).to_pylist() for column in self.columns]


def _contiguous(chunks: list[pa.Array]) -> pa.Array:
    chunks = [as_text(a) for a in chunks]  # dictionary-encoded, string_view, all-null columns
    if len(chunks) == 1:
        return chunks[0]
    if len({a.type for a in chunks}) > 1 or sum(a.nbytes for a in chunks) >= 1 << 31:
        # files may mix string and large_string; int32 offsets end at 2 GiB
        chunks = [a.cast(pa.large_string()) for a in chunks]
    return pa.concat_arrays(chunks)


class WindowReader:
    """Loads the windows of one epoch on demand and drops those no longer needed."""

    def __init__(self, files: list[str], plan: EpochPlan, columns: tuple[str, ...] = PAIR_COLUMNS):
        self.files, self.plan, self.columns = files, plan, tuple(columns)
        self.loaded: dict[int, Window] = {}
        self._handles: dict[int, pq.ParquetFile] = {}
        # (file, row group) -> [batch iterator, next row, leftover record batch or None]
        self._streams: dict[tuple[int, int], list] = {}
        self._text_bytes: dict[int, list[int]] = {}  # file -> its row groups' text bytes (footer)

    def close(self) -> None:
        self.loaded.clear()
        self._streams.clear()
        for h in self._handles.values():
            h.close()
        self._handles.clear()

    def release_below(self, position: int) -> None:
        for w in [w for w, win in self.loaded.items() if win.end <= position]:
            del self.loaded[w]

    def window(self, w: int) -> Window:
        win = self.loaded.get(w)
        if win is None:
            win = self.loaded[w] = self._load(w)
        return win

    def windows_for(self, positions: np.ndarray) -> list[Window]:
        lo, hi = self.plan.window_of(np.array([positions.min(), positions.max()]))
        return [self.window(w) for w in range(int(lo), int(hi) + 1)]

    def take(self, positions: np.ndarray) -> tuple[list[list], np.ndarray, int]:
        """The non-blank rows at flat positions, in order: each column's texts (prompts and
        responses, or texts), their global row indices, and how many blank rows were left out."""
        texts, rows, blank = self.take_all(positions)
        if not blank.any():
            return texts, rows, 0
        keep = np.flatnonzero(~blank)
        return [[column[i] for i in keep] for column in texts], rows[keep], int(blank.sum())

    def take_all(self, positions: np.ndarray) -> tuple[list[list], np.ndarray, np.ndarray]:
        """Every row at the flat positions, in order: each column's texts, global row indices
        and a blank mask (blank rows come as they are: None or whitespace)."""
        wins = self.windows_for(positions)
        if len(wins) == 1:
            win = wins[0]
            raw = win.perm[positions - win.start]
            return win.texts(raw), win.row_index[raw], win.blank[raw]
        texts, rows, blank = [[] for _ in self.columns], [], []
        which = self.plan.window_of(positions)
        for w, raws in itertools.groupby(zip(which.tolist(), positions.tolist()), key=lambda x: x[0]):
            # consecutive runs of one window keep the order (a group straddling windows)
            win = self.loaded[w]
            raw = win.perm[np.array([q for _, q in raws]) - win.start]
            for out, part in zip(texts, win.texts(raw)):
                out += part
            rows.append(win.row_index[raw])
            blank.append(win.blank[raw])
        return texts, np.concatenate(rows), np.concatenate(blank)

    # -- assembling a window from its units

    def _handle(self, f: int) -> pq.ParquetFile:
        h = self._handles.get(f)
        if h is None:
            if len(self._handles) >= MAX_OPEN_FILES:
                for k in [k for k in self._handles if all(s[0] != k for s in self._streams)]:
                    self._handles.pop(k).close()
            h = self._handles[f] = open_parquet(self.files[f], buffer_size=READ_BUFFER_BYTES)
        return h

    def _read_unit(self, u: RowGroupSlice) -> list[pa.RecordBatch]:
        if u.whole and self._row_group_bytes(u) <= read_guard.MAX_ROW_GROUP_TEXT_BYTES:
            table = self._handle(u.file).read_row_group(u.row_group, columns=list(self.columns))
            return table.to_batches()
        # a slice of a huge row group: stream it so that only the slice is held in memory
        key = (u.file, u.row_group)
        stream = self._streams.get(key)
        if stream is None or stream[1] > u.start:
            order = self.plan.order  # a window takes window / mix rows of each open row group
            rows = min(STREAM_BATCH_ROWS, max(1024, order.shuffle_window_rows // max(1, order.mix_row_groups)))
            it = self._handle(u.file).iter_batches(batch_size=rows, row_groups=[u.row_group],
                                                   columns=list(self.columns), use_threads=False)
            stream = self._streams[key] = [it, 0, None]
        out, need = [], u.rows
        while need:
            batch = stream[2] if stream[2] is not None else next(stream[0], None)
            if batch is None:
                raise short_read_error(self.files[u.file], u.row_group, stream[1], self._row_group_rows(u))
            stream[2] = None
            if stream[1] < u.start:  # resuming inside the row group: skip to the slice
                skip = min(u.start - stream[1], batch.num_rows)
                batch, stream[1] = batch.slice(skip), stream[1] + skip
                if batch.num_rows == 0:
                    continue
            piece = batch.slice(0, need)
            out.append(piece)
            need -= piece.num_rows
            stream[1] += piece.num_rows
            if piece.num_rows < batch.num_rows:
                stream[2] = batch.slice(piece.num_rows)
        if stream[1] >= self._row_group_rows(u):
            del self._streams[key]
        return out

    def _row_group_bytes(self, u: RowGroupSlice) -> int:
        """Text bytes of the unit's row group (footer): a larger one is streamed in slices."""
        sizes = self._text_bytes.get(u.file)
        if sizes is None:
            sizes = self._text_bytes[u.file] = row_group_text_bytes(self._handle(u.file), self.columns)
        return sizes[u.row_group]

    def _row_group_rows(self, u: RowGroupSlice) -> int:
        return self._handle(u.file).metadata.row_group(u.row_group).num_rows

    def _load(self, w: int) -> Window:
        chunks = {c: [] for c in self.columns}
        row_index = []
        for u in self.plan.windows[w]:
            with ReadGuard(self.files[u.file]).at(f'row group {u.row_group}'):
                batches = self._read_unit(u)
                for batch in batches:
                    check_utf8(batch)
            if sum(b.num_rows for b in batches) != u.rows:
                raise short_read_error(self.files[u.file], u.row_group, sum(b.num_rows for b in batches),
                                       self._row_group_rows(u))
            for batch in batches:
                for c in self.columns:
                    chunks[c].append(batch.column(c))
            row_index.append(np.arange(u.first_row, u.first_row + u.rows, dtype=np.int64))
        # one contiguous array per column: Arrow's take on a many-chunk array would
        # concatenate per call; a single chunk (one whole row group) is used as read
        return Window(w, int(self.plan.window_start[w]), self.plan.window_permutation(w),
                      [_contiguous(chunks[c]) for c in self.columns], np.concatenate(row_index))
