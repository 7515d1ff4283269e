"""Stream prompt/response Parquet rows as tokenized, padded batches in one global order.

The order of an epoch is a single flat sequence of rows that depends only on the data
files, the seed, the epoch and a few order parameters -- never on the number of ranks or
DataLoader workers:

* units: the row groups of all files (a row group larger than ``shuffle_window_rows`` is cut
  into consecutive slices of at most that many rows; the slices of one row group stay
  adjacent and in file order, so a huge row group is streamed once per epoch);
* a seeded permutation of the row groups (numpy Generator from (seed, epoch)) gives the
  unit order; consecutive units form windows of about ``shuffle_window_rows`` rows; rows
  are permuted within a window by a Generator from (seed, epoch, window);
* optional length grouping: within groups of ``length_group_batches x batch_size`` rows of
  that sequence, rows are sorted by characters (stable, seeded tie-break), cut into blocks
  of ``batch_size`` rows and the blocks are shuffled (the last partial block stays last).

Global batch i is rows ``[i*G, (i+1)*G)`` with ``G = batch_size * world_size``; rank r takes
``[i*G + r*batch_size, i*G + (r+1)*batch_size)``. The data position is one number, the rows
of the sequence consumed, equal on every rank; resuming at it needs only the window (or
length group) that holds it, and stays valid when the world size changes.

drop_last=True (training): the rows used per epoch are cut to a multiple of
``G * accumulation``, so every optimizer step is full and all ranks yield the same number of
batches. drop_last=False (validation): the tail is split as far as it goes, so in the last
global batch a rank may get a short batch or none at all -- callers must not assume lockstep
there (reduce sums, not per-batch collectives).

DataLoader workers split the work, not the order: worker w of W produces local batches
j with ``j % W == w`` and PyTorch's round-robin collection hands them out in order. Each
worker reads (lazily) only the windows holding its batches -- with 65536-row windows that is
every window. Reading (Parquet -> Arrow -> Python bytes per batch) measured ~6 us per row,
about a tenth of tokenizing (~60 us per row), so W workers pay W reads for one tokenization
(bench/bench_data.py prints the figure); workers hand numpy arrays to the main process.

Memory per reading process: the loaded window(s) as Arrow text (about
``shuffle_window_rows`` rows, two while a batch or length group straddles a boundary) plus
one row group (or, for a row group bigger than a window, one window-sized slice of it and
the reader's page buffers) while a window is assembled. Nothing else grows with the data.

Why the trainer does not pass this loader to ``accelerator.prepare()``: prepare() wraps an
IterableDataset in a dispatcher / shard wrapper that splits its output again across
processes (or lets rank 0 read and broadcast), which would re-slice batches this loader
already assigned per rank and break the world-size-independent order and the resume
position. The loader knows its rank, yields this rank's local batches, and the trainer
moves them to its device itself.

Tokenization: prompts become ``input_ids``, responses ``labels``, each truncated to
``max_seq_len`` tokens with eos kept last. The fast tokenizer's Rust backend is the
reference; when the tokenizer folder also holds the sentencepiece model it was built from
(model/tokenizer.py writes it) the same ids are produced ~5x faster by sentencepiece's C++
encoder. That path is checked against the Rust tokenizer at construction, and the rows on
which the two can differ go to the Rust tokenizer: a leading space or '▁' (HF's Metaspace adds
no second prefix), a literal special token such as '</s>' (HF matches it as the special id),
and equal-score ties such as 'hhhhhhh' = 'hhh'+'hhhh' = 'hhhh'+'hhh' (the libraries break them
differently; they show up as two different adjacent powers of one root in the output).
``tokenizer_backend='hf'`` turns the fast path off.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from config import UserError
from model.files import TEXT_COLUMNS, as_text, blank_mask, inspect_parquet, resolve_parquet_files

logger = logging.getLogger(__name__)

PAD_ID = 0
LABEL_PAD_ID = -100
_STREAM_BATCH_ROWS = 8192  # rows per Arrow batch when streaming a slice of a huge row group
_READ_BUFFER_BYTES = 4 << 20  # page-wise reads: a huge column chunk is not loaded at once
_TOKENIZE_ROWS = 256  # rows of local batches tokenized per call (latency ~20 ms of work)
# seed-stream tags, so the generators of different decisions never coincide
_TAG_UNITS, _TAG_WINDOW, _TAG_GROUP = 1, 2, 3


def _rng(seed: int, epoch: int, tag: int, index: int = 0) -> np.random.Generator:
    return np.random.default_rng([tag, seed & 0xFFFF_FFFF_FFFF_FFFF, epoch, index])


# --------------------------------------------------------------------------- order


@dataclass(frozen=True)
class OrderParams:
    """Everything the flat row sequence of an epoch depends on (besides the files)."""

    seed: int
    shuffle: bool
    shuffle_window_rows: int
    group_by_length: bool
    length_group_batches: int
    batch_size: int  # block size of length grouping (rows per rank per batch)

    @property
    def group_rows(self) -> int:
        return self.length_group_batches * self.batch_size


@dataclass(frozen=True)
class _Unit:
    file: int  # index into the file list
    row_group: int
    start: int  # first row inside the row group
    rows: int
    first_row: int  # global row index of `start` (files concatenated in list order)
    whole: bool  # the unit is the entire row group


class EpochPlan:
    """Units, windows and window permutations of one epoch; metadata only, no reads."""

    def __init__(self, row_groups: list[tuple[int, int, int, int]], order: OrderParams, epoch: int,
                 num_rows: int):
        """row_groups: (file, row_group, rows, global first row) in file order."""
        self.order, self.epoch, self.num_rows = order, epoch, num_rows
        w = order.shuffle_window_rows
        sequence = (_rng(order.seed, epoch, _TAG_UNITS).permutation(len(row_groups))
                    if order.shuffle else range(len(row_groups)))
        units: list[_Unit] = []
        for g in sequence:
            f, rg, n, first = row_groups[g]
            for s in range(0, n, w):
                units.append(_Unit(f, rg, s, min(w, n - s), first + s, n <= w))
        self.windows: list[list[_Unit]] = []
        current, size = [], 0
        for u in units:
            if current and size + u.rows > w:
                self.windows.append(current)
                current, size = [], 0
            current.append(u)
            size += u.rows
        if current:
            self.windows.append(current)
        sizes = [sum(u.rows for u in win) for win in self.windows]
        self.window_start = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])

    def window_of(self, positions: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.window_start, positions, side='right') - 1

    def window_permutation(self, w: int) -> np.ndarray:
        """Row k of window w in the flat sequence is row perm[k] of the window as read."""
        n = int(self.window_start[w + 1] - self.window_start[w])
        if not self.order.shuffle:
            return np.arange(n, dtype=np.int64)
        return _rng(self.order.seed, self.epoch, _TAG_WINDOW, w).permutation(n)


def length_group_order(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of one length group in their new order: sorted by length (seeded
    tie-break), cut into blocks of batch_size, blocks shuffled, a partial block last."""
    n = len(lengths)
    tie = rng.permutation(n)
    by_length = tie[np.argsort(lengths[tie], kind='stable')]
    full = n // batch_size
    blocks = rng.permutation(full)
    head = by_length[:full * batch_size].reshape(full, batch_size)[blocks].reshape(-1)
    return np.concatenate([head, by_length[full * batch_size:]])


# --------------------------------------------------------------------------- reading


class _Window:
    __slots__ = ('index', 'start', 'perm', 'prompt', 'response', 'row_index', 'blank', '_lengths')

    def __init__(self, index, start, perm, prompt, response, row_index):
        self.index, self.start, self.perm = index, start, perm
        self.prompt, self.response, self.row_index = prompt, response, row_index
        self.blank = blank_mask(prompt) | blank_mask(response)  # null, empty or whitespace only
        self._lengths = None

    @property
    def end(self) -> int:
        return self.start + len(self.perm)

    def lengths(self) -> np.ndarray:
        """Characters of prompt + response per row, in read order (null counts as 0)."""
        if self._lengths is None:
            lp = pc.fill_null(pc.utf8_length(self.prompt), 0).to_numpy()
            lr = pc.fill_null(pc.utf8_length(self.response), 0).to_numpy()
            self._lengths = lp.astype(np.int64) + lr
        return self._lengths

    def texts(self, raw: np.ndarray, binary: bool) -> tuple[list, list]:
        """Prompts and responses of rows `raw` (read order) as bytes (UTF-8) or str.
        Handing sentencepiece bytes skips two UTF-8 conversions per text (~2 us each)."""
        p, r = self.prompt.take(raw), self.response.take(raw)
        if binary:
            p, r = (a.view(pa.binary() if a.type == pa.string() else pa.large_binary()) for a in (p, r))
        return p.to_pylist(), r.to_pylist()


def _contiguous(chunks: list[pa.Array]) -> pa.Array:
    chunks = [as_text(a) for a in chunks]  # dictionary-encoded, string_view, all-null columns
    if len(chunks) == 1:
        return chunks[0]
    if len({a.type for a in chunks}) > 1 or sum(a.nbytes for a in chunks) >= 1 << 31:
        # files may mix string and large_string; int32 offsets end at 2 GiB
        chunks = [a.cast(pa.large_string()) for a in chunks]
    return pa.concat_arrays(chunks)


class _WindowReader:
    """Loads the windows of one epoch on demand and drops those no longer needed."""

    def __init__(self, files: list[str], plan: EpochPlan):
        self.files, self.plan = files, plan
        self.loaded: dict[int, _Window] = {}
        self._handles: dict[int, pq.ParquetFile] = {}
        # (file, row group) -> [batch iterator, next row, leftover record batch or None]
        self._streams: dict[tuple[int, int], list] = {}

    def close(self) -> None:
        self.loaded.clear()
        self._streams.clear()
        for h in self._handles.values():
            h.close()
        self._handles.clear()

    def release_below(self, position: int) -> None:
        for w in [w for w, win in self.loaded.items() if win.end <= position]:
            del self.loaded[w]

    def window(self, w: int) -> _Window:
        win = self.loaded.get(w)
        if win is None:
            win = self.loaded[w] = self._load(w)
        return win

    def windows_for(self, positions: np.ndarray) -> list[_Window]:
        lo, hi = self.plan.window_of(np.array([positions.min(), positions.max()]))
        return [self.window(w) for w in range(int(lo), int(hi) + 1)]

    def take(self, positions: np.ndarray, binary: bool = False) -> tuple[list, list, np.ndarray, int]:
        """The non-blank rows at flat positions, in order: prompts, responses, their global
        row indices, and how many blank rows were left out."""
        wins = self.windows_for(positions)
        if len(wins) == 1:
            win = wins[0]
            raw = win.perm[positions - win.start]
            blank = win.blank[raw]
            skipped = int(blank.sum())
            if skipped:
                raw = raw[~blank]
            return (*win.texts(raw, binary), win.row_index[raw], skipped)
        prompts, responses, rows, skipped = [], [], [], 0
        which = self.plan.window_of(positions)
        for w, raws in itertools.groupby(zip(which.tolist(), positions.tolist()), key=lambda x: x[0]):
            # consecutive runs of one window keep the order; rare (a batch straddling windows)
            win = self.loaded[w]
            raw = win.perm[np.array([q for _, q in raws]) - win.start]
            blank = win.blank[raw]
            skipped += int(blank.sum())
            raw = raw[~blank]
            p, r = win.texts(raw, binary)
            prompts += p
            responses += r
            rows.append(win.row_index[raw])
        return prompts, responses, np.concatenate(rows), skipped

    def lengths(self, start: int, stop: int) -> np.ndarray:
        """Character lengths of flat positions [start, stop)."""
        positions = np.arange(start, stop, dtype=np.int64)
        out = np.empty(stop - start, dtype=np.int64)
        for win in self.windows_for(positions):
            a, b = max(start, win.start), min(stop, win.end)
            out[a - start:b - start] = win.lengths()[win.perm[a - win.start:b - win.start]]
        return out

    # -- assembling a window from its units

    def _handle(self, f: int) -> pq.ParquetFile:
        h = self._handles.get(f)
        if h is None:
            if len(self._handles) >= 8:  # many small files: keep only a few open
                for k in [k for k in self._handles if all(s[0] != k for s in self._streams)]:
                    self._handles.pop(k).close()
            # pre_buffer (pyarrow's default) would fetch a whole column chunk -- for a huge row
            # group 300+ MB -- before the first batch; buffered reads go page by page instead
            h = self._handles[f] = pq.ParquetFile(self.files[f], buffer_size=_READ_BUFFER_BYTES, pre_buffer=False)
        return h

    def _read_unit(self, u: _Unit) -> list[pa.RecordBatch]:
        if u.whole:
            table = self._handle(u.file).read_row_group(u.row_group, columns=list(TEXT_COLUMNS))
            return table.to_batches()
        # a slice of a huge row group: stream it so that only the slice is held in memory
        key = (u.file, u.row_group)
        stream = self._streams.get(key)
        if stream is None or stream[1] > u.start:
            it = self._handle(u.file).iter_batches(batch_size=_STREAM_BATCH_ROWS, row_groups=[u.row_group],
                                                   columns=list(TEXT_COLUMNS), use_threads=False)
            stream = self._streams[key] = [it, 0, None]
        out, need = [], u.rows
        while need:
            batch = stream[2] if stream[2] is not None else next(stream[0])
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

    def _row_group_rows(self, u: _Unit) -> int:
        return self._handle(u.file).metadata.row_group(u.row_group).num_rows

    def _load(self, w: int) -> _Window:
        chunks = {c: [] for c in TEXT_COLUMNS}
        row_index = []
        for u in self.plan.windows[w]:
            for batch in self._read_unit(u):
                for c in TEXT_COLUMNS:
                    chunks[c].append(batch.column(c))
            row_index.append(np.arange(u.first_row, u.first_row + u.rows, dtype=np.int64))
        # one contiguous array per column: Arrow's take on a many-chunk array would
        # concatenate per call; a single chunk (one whole row group) is used as read
        prompt, response = (_contiguous(chunks[c]) for c in TEXT_COLUMNS)
        return _Window(w, int(self.plan.window_start[w]), self.plan.window_permutation(w),
                       prompt, response, np.concatenate(row_index))


class _FlatOrder:
    """Maps positions of the epoch's final sequence to positions after window shuffling
    (they differ only when length grouping is on)."""

    def __init__(self, plan: EpochPlan, reader: _WindowReader):
        self.plan, self.reader, self.order = plan, reader, plan.order
        self._groups: dict[int, np.ndarray] = {}

    def low_water(self, position: int) -> int:
        """The smallest pre-grouping position still needed from `position` on."""
        if not self.order.group_by_length:
            return position
        k = self.order.group_rows
        return position // k * k

    def positions(self, start: int, stop: int) -> np.ndarray:
        if not self.order.group_by_length:
            return np.arange(start, stop, dtype=np.int64)
        k = self.order.group_rows
        if start // k == (stop - 1) // k:  # the usual case: one block inside one group
            g = start // k
            return g * k + self._group(g)[start - g * k:stop - g * k]
        q = np.arange(start, stop, dtype=np.int64)
        g = q // k
        out = np.empty_like(q)
        for gi in np.unique(g).tolist():
            sel = g == gi
            out[sel] = gi * k + self._group(gi)[q[sel] - gi * k]
        return out

    def _group(self, g: int) -> np.ndarray:
        perm = self._groups.get(g)
        if perm is None:
            k = self.order.group_rows
            a, b = g * k, min((g + 1) * k, self.plan.num_rows)
            rng = _rng(self.order.seed, self.plan.epoch, _TAG_GROUP, g)
            perm = length_group_order(self.reader.lengths(a, b), self.order.batch_size, rng)
            for old in [x for x in self._groups if x < g]:
                del self._groups[old]
            self._groups[g] = perm
        return perm


# --------------------------------------------------------------------------- tokenizing

_PROBES = ('今天天气很好，我们去公园散步吧。', '价格是12345元，约合US$1,700。', 'GPU 和 Python 3.11\n第二行\t制表',
           '表情😀与生僻字𠮷', '全角\u3000空格，ＡＢＣ１２３', 'a  b   c', 'trailing space ', '\n\n',
           '长' * 600, 'x' * 50 + '重复' * 200)


class TextEncoder:
    """Strings -> token id lists, each truncated to max_seq_len with eos kept last.

    backend: 'auto' (sentencepiece when available and verified, else the Rust tokenizer),
    'hf' (always the Rust tokenizer) or 'sentencepiece' (required, else UserError).
    Pickles as plain data (tokenizer JSON and model bytes) for DataLoader workers.
    """

    def __init__(self, tokenizer, max_seq_len: int, backend: str = 'auto', threads: int | None = None):
        if max_seq_len < 2:
            raise ValueError(f'max_seq_len must be >= 2 (one token and eos), got {max_seq_len}')
        if backend not in ('auto', 'hf', 'sentencepiece'):
            raise ValueError(f"backend must be 'auto', 'hf' or 'sentencepiece', got {backend!r}")
        from tokenizers import Tokenizer

        rust = getattr(tokenizer, 'backend_tokenizer', tokenizer)
        self.max_seq_len = max_seq_len
        self.eos_id = tokenizer.eos_token_id if hasattr(tokenizer, 'eos_token_id') else rust.token_to_id('</s>')
        self._rust_json = rust.to_str()
        self._specials = tuple(t.content for t in rust.get_added_tokens_decoder().values())
        self._special_bytes = tuple(x.encode() for x in self._specials)
        self._spm_proto: bytes | None = None
        self._sp = None
        self._power_root: np.ndarray | None = None
        self.threads = threads
        # a private copy: truncation settings on the shared tokenizer would leak to other users
        self._rust = Tokenizer.from_str(self._rust_json)
        self._setup_rust()
        if backend != 'hf':
            reason = self._try_sentencepiece(tokenizer)
            if reason and backend == 'sentencepiece':
                raise UserError(f'sentencepiece tokenization unavailable: {reason}')
            if reason:
                logger.info('tokenizing with the Rust tokenizer (%s)', reason)
        self.backend = 'sentencepiece' if self._spm_proto is not None else 'hf'

    def _setup_rust(self):
        self._rust.no_padding()
        self._rust.enable_truncation(self.max_seq_len)

    def _try_sentencepiece(self, tokenizer) -> str | None:
        folder = getattr(tokenizer, 'name_or_path', '') or ''
        path = os.path.join(folder, 'sentencepiece.model')
        if not os.path.isfile(path):
            return f'no sentencepiece.model next to the tokenizer in {folder!r}'
        try:
            import sentencepiece as spm
        except ImportError:
            return 'the sentencepiece package is not installed'
        with open(path, 'rb') as f:
            proto = f.read()
        sp = spm.SentencePieceProcessor(model_proto=proto)
        n = sp.get_piece_size()
        if n != self._rust.get_vocab_size() or any(
                sp.id_to_piece(i) != self._rust.id_to_token(i) for i in range(n)):
            return 'sentencepiece.model does not match the tokenizer vocabulary'
        self._spm_proto, self._sp = proto, sp
        if self.encode(list(_PROBES)) != self._encode_rust(list(_PROBES)):
            self._spm_proto = self._sp = None
            return 'sentencepiece disagrees with the Rust tokenizer on probe texts'
        return None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ('_rust', '_sp', '_power_root')}

    def __setstate__(self, state):
        from tokenizers import Tokenizer

        self.__dict__.update(state)
        self._rust = Tokenizer.from_str(self._rust_json)
        self._setup_rust()
        self._sp = self._power_root = None
        if self._spm_proto is not None:
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_proto=self._spm_proto)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text (eos last, at most max_seq_len)."""
        flat, lens = self.encode_ragged(texts)
        return [x.tolist() for x in np.split(flat, np.cumsum(lens)[:-1])] if len(texts) else []

    def encode_ragged(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """All ids concatenated (int64) and the length of each text's part."""
        if self._sp is None:
            return _flatten(self._encode_rust(texts))
        return self._encode_sentencepiece(texts)

    def _encode_rust(self, texts) -> list[list[int]]:
        texts = [t.decode() if isinstance(t, bytes) else t for t in texts]
        encode = getattr(self._rust, 'encode_batch_fast', self._rust.encode_batch)  # no offsets
        return [e.ids for e in encode(texts, add_special_tokens=True)]

    def _encode_sentencepiece(self, texts) -> tuple[np.ndarray, np.ndarray]:
        out = self._sp.encode(texts, out_type=int, num_threads=self.threads or 1)
        if self._power_root is None:
            self._power_root = _power_roots(self._rust)
        root = self._power_root
        keep, eos = self.max_seq_len - 1, self.eos_id
        binary = bool(texts) and isinstance(texts[0], bytes)
        lead, lt, specials = ((_LEAD_BYTES, b'<', self._special_bytes) if binary else
                              (_LEAD, '<', self._specials))
        odd = []
        for i, (t, ids) in enumerate(zip(texts, out)):
            if len(ids) > keep:  # cut to `keep` and add eos, as the Rust post-processor does
                a, b = ids[keep - 1], ids[keep]
                if a != b and root[a] >= 0 and root[a] == root[b]:
                    odd.append(i)  # a tie straddling the cut
                del ids[keep:]
            ids.append(eos)
            if t.startswith(lead) or (lt in t and any(x in t for x in specials)):
                odd.append(i)
        flat, lens = _flatten(out)
        odd = set(odd).union(_tied_rows(flat, lens, root).tolist())
        if odd:
            rows = sorted(odd)
            for i, ids in zip(rows, self._encode_rust([texts[i] for i in rows])):
                out[i] = ids
            return _flatten(out)
        return flat, lens


def _flatten(seqs) -> tuple[np.ndarray, np.ndarray]:
    lens = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(lens.sum()))
    return flat, lens


# Where sentencepiece may legitimately differ from the Rust tokenizer, the Rust one decides:
# * a leading space or '\u2581': sentencepiece always adds the dummy prefix, HF's Metaspace
#   only when the text does not already start with one;
# * a literal special token ('</s>'): HF matches it as the special id;
# * adjacent pieces w^a w^b (a != b) of one root w: w^b w^a scores the same, and the two
#   libraries break that tie differently (seen on runs like 'hhhhhhh').


def _power_roots(rust) -> np.ndarray:
    """piece id -> index of its primitive root w if the piece is w^k and the vocabulary
    holds at least two powers of w, else -1."""
    specials = {t.content for t in rust.get_added_tokens_decoder().values()}
    by_root: dict[str, list[int]] = {}
    vocab = rust.get_vocab()
    for piece, i in vocab.items():
        if piece in specials or _BYTE_PIECE.fullmatch(piece):
            continue
        root = (piece + piece).find(piece, 1)  # length of the primitive root (divides len)
        by_root.setdefault(piece[:root], []).append(i)
    out = np.full(max(vocab.values()) + 1, -1, dtype=np.int64)
    for k, ids in enumerate(v for v in by_root.values() if len(v) >= 2):
        out[ids] = k
    return out


def _tied_rows(flat: np.ndarray, lens: np.ndarray, power_root: np.ndarray) -> np.ndarray:
    """Rows holding two different adjacent powers of one root (vectorized over the batch)."""
    if len(flat) < 2:
        return np.zeros(0, dtype=np.int64)
    roots = power_root[flat]
    pair = (roots[:-1] >= 0) & (roots[:-1] == roots[1:]) & (flat[:-1] != flat[1:])
    if not pair.any():
        return np.zeros(0, dtype=np.int64)
    k = np.flatnonzero(pair)
    ends = np.cumsum(lens)
    row = np.searchsorted(ends, k, side='right')  # the row holding id k
    return np.unique(row[k + 1 < ends[row]])  # drop pairs that span two rows


_BYTE_PIECE = re.compile(r'<0x[0-9A-F]{2}>')
_LEAD, _LEAD_BYTES = (' ', '\u2581'), (b' ', '\u2581'.encode())


def _pad(flat: np.ndarray, lens: np.ndarray, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest row; returns (ids [b, L] int64, mask [b, L] int64)."""
    mask = np.arange(int(lens.max())) < lens[:, None]
    ids = np.full(mask.shape, pad, dtype=np.int64)
    ids[mask] = flat  # the mask's row-major order is the order of the concatenated rows
    return ids, mask.astype(np.int64)


def collate(prompts: list, responses: list, encoder: TextEncoder,
            row_index: np.ndarray | None = None) -> dict:
    """Tokenize and pad one local batch of Python strings; blank rows are skipped and counted."""
    keep = [i for i, (p, r) in enumerate(zip(prompts, responses)) if not (_is_blank(p) or _is_blank(r))]
    part = ([prompts[i] for i in keep], [responses[i] for i in keep],
            None if row_index is None else np.asarray(row_index)[keep], len(prompts) - len(keep))
    return to_torch(make_batches([part], encoder)[0])


def _is_blank(text) -> bool:
    return text is None or not text.strip()


def make_batches(parts: list[tuple[list, list, np.ndarray | None, int]], encoder: TextEncoder) -> list[dict]:
    """Batch dicts (numpy arrays; see :func:`to_torch`) of several local batches, each given
    as (prompts, responses, row_index, num_skipped), tokenized in one call: sentencepiece's
    threads pay off only on a few hundred texts.

    A batch whose rows were all skipped becomes a 1-row placeholder (input [eos], labels
    -100) so that ranks stay in lockstep; it contributes no target tokens.
    """
    texts = [t for prompts, responses, _, _ in parts for t in itertools.chain(prompts, responses)]
    flat, lens = encoder.encode_ragged(texts) if texts else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    ends = np.cumsum(lens)
    out, row = [], 0
    for prompts, responses, row_index, num_skipped in parts:
        n = len(prompts)
        if n == 0:
            one = np.ones((1, 1), dtype=np.int64)
            batch = {'input_ids': one * encoder.eos_id, 'attention_mask': one, 'labels': one * LABEL_PAD_ID}
        else:
            a, m, b = (int(ends[i - 1]) if i else 0 for i in (row, row + n, row + 2 * n))
            input_ids, attention = _pad(flat[a:m], lens[row:row + n], PAD_ID)
            labels, _ = _pad(flat[m:b], lens[row + n:row + 2 * n], LABEL_PAD_ID)
            batch = {'input_ids': input_ids, 'attention_mask': attention, 'labels': labels}
        batch.update(num_rows=n, num_skipped=num_skipped)
        if row_index is not None:
            batch['row_index'] = np.ascontiguousarray(row_index, dtype=np.int64)
        out.append(batch)
        row += 2 * n
    return out


def to_torch(batch: dict, pin_memory: bool = False) -> dict:
    """numpy arrays -> tensors (zero-copy), optionally pinned for non_blocking copies."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(v)
            if pin_memory:
                v = v.pin_memory()
        out[k] = v
    return out


def _as_is(batch):
    return batch


# --------------------------------------------------------------------------- dataset


@dataclass(frozen=True)
class _Pass:
    """One iteration: which epoch, order, rows and slice of each global batch."""

    epoch: int
    order: OrderParams
    start: int  # first position of the sequence to yield
    stop: int  # one past the last position used this epoch
    rank: int
    world_size: int
    batch_size: int


class ParquetStreamDataset(IterableDataset):
    """This rank's local batches of one pass (set by :meth:`configure`); see the module doc."""

    def __init__(self, files: list[str], encoder: TextEncoder, return_row_index: bool = False):
        self.files = files
        self.encoder = encoder
        self.return_row_index = return_row_index
        infos = [inspect_parquet(f) for f in files]
        self.row_groups: list[tuple[int, int, int, int]] = []
        first = 0
        for fi, info in enumerate(infos):
            for rg, n in enumerate(info.row_group_rows):
                if n:
                    self.row_groups.append((fi, rg, n, first))
                first += n
        self.num_rows = first
        self.pass_: _Pass | None = None

    def configure(self, pass_: _Pass) -> None:
        self.pass_ = pass_

    def plan(self, epoch: int, order: OrderParams) -> EpochPlan:
        return EpochPlan(self.row_groups, order, epoch, self.num_rows)

    @staticmethod
    def local_batches(p: _Pass, worker: int = 0, num_workers: int = 1):
        """(j, start, stop) in the sequence of this rank's local batches j with
        j % num_workers == worker."""
        g = p.batch_size * p.world_size
        j = worker
        while True:
            s = p.start + j * g + p.rank * p.batch_size
            if s >= p.stop:
                return
            yield j, s, min(s + p.batch_size, p.stop)
            j += num_workers

    def __iter__(self):
        if self.pass_ is None:
            raise RuntimeError('configure() the dataset before iterating it')
        return self._batches(self.pass_)  # the pass is fixed now, not at the first next()

    def _batches(self, pass_: _Pass):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:
            # workers already split the cores between them; threads per worker would oversubscribe
            os.environ['TOKENIZERS_PARALLELISM'] = 'false'
            self.encoder.threads = 1
        plan = self.plan(pass_.epoch, pass_.order)
        reader = _WindowReader(self.files, plan)
        flat = _FlatOrder(plan, reader)
        binary = self.encoder.backend == 'sentencepiece'
        per_call = max(1, _TOKENIZE_ROWS // pass_.batch_size)
        pending = []
        try:
            for _, s, e in self.local_batches(pass_, worker, num_workers):
                reader.release_below(flat.low_water(s))
                prompts, responses, rows, skipped = reader.take(flat.positions(s, e), binary)
                pending.append((prompts, responses, rows if self.return_row_index else None, skipped))
                if len(pending) == per_call:
                    yield from make_batches(pending, self.encoder)
                    pending = []
            yield from make_batches(pending, self.encoder)
        finally:
            reader.close()


# --------------------------------------------------------------------------- loader


class StreamingLoader:
    """Owns the dataset and its DataLoader, tracks the data position, saves and resumes it.

    ``for batch in loader`` yields this rank's local batches of the current epoch from the
    current position; when they run out the loader moves to (epoch + 1, 0). Batch dict:
    ``input_ids`` int64 [b, Ls], ``attention_mask`` int64 [b, Ls], ``labels`` int64
    [b, Lt] (padding -100), ``num_rows`` (real rows), ``num_skipped`` (blank rows dropped),
    and with ``return_row_index`` also ``row_index`` (global row numbers, files in order).
    """

    def __init__(self, files, tokenizer, max_seq_len: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, accumulation: int = 1, shuffle: bool = True, seed: int = 0,
                 shuffle_window_rows: int = 65536, group_by_length: bool = False,
                 length_group_batches: int = 64, drop_last: bool = True, num_workers: int = 0,
                 pin_memory: bool = False, tokenizer_backend: str = 'auto',
                 tokenizer_threads: int | None = None, return_row_index: bool = False,
                 multiprocessing_context=None):
        for name, v in (('batch_size', batch_size), ('world_size', world_size), ('accumulation', accumulation),
                        ('shuffle_window_rows', shuffle_window_rows), ('length_group_batches', length_group_batches)):
            if v < 1:
                raise ValueError(f'{name} must be >= 1, got {v}')
        if not 0 <= rank < world_size:
            raise ValueError(f'rank {rank} outside world size {world_size}')
        if num_workers < 0:
            raise ValueError(f'num_workers must be >= 0, got {num_workers}')
        self.files = resolve_parquet_files(files)
        if tokenizer_threads is None:  # like the Rust tokenizer: threads unless told otherwise
            quiet = os.environ.get('TOKENIZERS_PARALLELISM', '').lower() in ('0', 'false', 'no', 'off')
            tokenizer_threads = 1 if quiet or num_workers else min(4, os.cpu_count() or 1)
        encoder = TextEncoder(tokenizer, max_seq_len, backend=tokenizer_backend, threads=tokenizer_threads)
        self.dataset = ParquetStreamDataset(self.files, encoder, return_row_index=return_row_index)
        if self.dataset.num_rows == 0:
            raise UserError(f'{", ".join(self.files)}: no rows to train on')
        self.rank, self.world_size, self.accumulation = rank, world_size, accumulation
        self.batch_size, self.drop_last, self.num_workers = batch_size, drop_last, num_workers
        self.pin_memory = pin_memory
        self.order = OrderParams(seed=seed, shuffle=shuffle, shuffle_window_rows=shuffle_window_rows,
                                 group_by_length=group_by_length, length_group_batches=length_group_batches,
                                 batch_size=batch_size)
        self.dataloader = DataLoader(self.dataset, batch_size=None, num_workers=num_workers,
                                     multiprocessing_context=multiprocessing_context,
                                     # workers hand over numpy arrays: pickled through the pipe they
                                     # cost ~5 us, torch tensors go through shared memory at ~40 us
                                     # per row of the main process (measured, bench/bench_data.py)
                                     collate_fn=_as_is,
                                     # its own generator: the base seed must not come from (and
                                     # advance) the global torch RNG, or resuming dropout drifts
                                     generator=torch.Generator())
        self.epoch = 0
        self.rows_consumed = 0
        self._epoch_order = self.order  # the order of the epoch in progress (may be a saved one)
        self._grid_origin = 0  # drop_last cuts (num_rows - origin) to multiples of G * accumulation
        logger.info('data: %d rows in %d files, %d row groups; tokenizer backend %s', self.num_rows,
                    len(self.files), len(self.dataset.row_groups), encoder.backend)

    # -- sizes

    @property
    def num_rows(self) -> int:
        return self.dataset.num_rows

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def _stop(self, origin: int) -> int:
        if not self.drop_last:
            return self.num_rows
        span = self.global_batch_size * self.accumulation
        return origin + (self.num_rows - origin) // span * span

    def _local_count(self, start: int, stop: int) -> int:
        first = start + self.rank * self.batch_size
        return 0 if first >= stop else math.ceil((stop - first) / self.global_batch_size)

    def rows_per_epoch(self) -> int:
        """Rows of the sequence used in a full epoch (all ranks together)."""
        return self._stop(0)

    def __len__(self) -> int:
        """This rank's local batches in a full epoch (from metadata)."""
        return self._local_count(0, self._stop(0))

    def steps_per_epoch(self) -> int:
        """Optimizer steps in a full epoch (the last one may be partial with drop_last=False)."""
        return math.ceil(self._stop(0) / (self.global_batch_size * self.accumulation))

    # -- position

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of `epoch`; a no-op for the current epoch, so a trainer that
        calls it after load_state_dict() keeps the resumed position."""
        if epoch != self.epoch:
            self.epoch, self.rows_consumed = epoch, 0
            self._epoch_order, self._grid_origin = self.order, 0

    def state_dict(self) -> dict:
        return {'epoch': self.epoch, 'rows_consumed': self.rows_consumed, 'num_rows': self.num_rows,
                **asdict(self._epoch_order), 'global_batch_size': self.global_batch_size,
                'accumulation': self.accumulation, 'grid_origin': self._grid_origin}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.rows_consumed = int(state['epoch']), int(state['rows_consumed'])
        saved = replace(self.order, **{k: state[k] for k in asdict(self.order) if k in state})
        if state.get('num_rows', self.num_rows) != self.num_rows:
            logger.warning('data: the files now hold %d rows, the saved position was for %d; '
                           'the order of epoch %d changes', self.num_rows, state['num_rows'], self.epoch)
        if self.rows_consumed == 0:
            saved = self.order  # nothing of this epoch was used yet: start it with the new order
        elif saved != self.order:
            changed = ', '.join(f'{k} {getattr(saved, k)} -> {getattr(self.order, k)}'
                                for k in asdict(saved) if getattr(saved, k) != getattr(self.order, k))
            logger.info('data: keeping the saved order for the rest of epoch %d (%s from epoch %d on)',
                        self.epoch, changed, self.epoch + 1)
        self._epoch_order = saved
        same_grid = (state.get('global_batch_size') == self.global_batch_size
                     and state.get('accumulation') == self.accumulation)
        self._grid_origin = int(state.get('grid_origin', 0)) if same_grid else self.rows_consumed
        if not same_grid and self.rows_consumed:
            logger.info('data: global batch changed since the save; epoch %d continues at row %d',
                        self.epoch, self.rows_consumed)
        self.rows_consumed = min(self.rows_consumed, self._stop(self._grid_origin))

    # -- iteration

    def __iter__(self):
        start, stop = self.rows_consumed, self._stop(self._grid_origin)
        stop = max(stop, start)
        self.dataset.configure(_Pass(self.epoch, self._epoch_order, start, stop, self.rank,
                                     self.world_size, self.batch_size))
        g = self.global_batch_size
        # without workers the DataLoader adds only per-batch overhead (~5% here): iterate directly
        batches = self.dataloader if self.num_workers else self.dataset
        for handed, batch in enumerate(batches, start=1):
            self.rows_consumed = min(start + handed * g, stop)
            yield to_torch(batch, self.pin_memory)
        # reached only when the epoch ran out (not when the caller stopped early)
        self.epoch += 1
        self.rows_consumed = 0
        self._epoch_order, self._grid_origin = self.order, 0

