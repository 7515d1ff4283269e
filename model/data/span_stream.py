"""Raw text as T5 pretrains on it: this rank's span-corrupted batches of the epoch, by position.

The epoch's rows come in the order of model/data/epoch_order.py (the same windows as for pairs).
Each window's documents, in that order, are tokenized whole, each followed by eos, concatenated
and cut into runs of ``raw_length`` tokens -- the length whose corrupted input is
``max_seq_len`` tokens (:func:`span_corruption.lengths_for`); a window's last run is kept when it
holds at least two tokens. Example k of the epoch is corrupted with a Generator seeded by
(seed, epoch, k) (model/data/span_corruption.py).

The position is one number, the examples of the epoch consumed, as rows are for pairs: global
batch i is examples ``[i*G, (i+1)*G)`` and rank r takes its slice, so the examples, their masks
and the position are the same for any number of ranks, and a resume needs only the window that
holds the position. To know where each window's examples start without reading the windows, the
dataset counts every row's tokens once (:meth:`SpanCorruptionDataset.row_tokens`, the first time
an epoch's size is asked for): a window's examples follow from its rows' token counts alone.

The counts travel with the data position into every saved state (:meth:`counts_part`), with what
they were counted from (each file's name, size and Parquet footer digest; the tokenizer's digest):
a resume on the same files takes them (:meth:`take_counts`) instead of tokenizing the corpus again,
at every requeue (bench/bench_span_resume.py measures both).

Costs, stated: the counting pass tokenizes the training files once at a run's start (not again
on resume), each rank a share of the row groups (their counts summed over the ranks); and every rank tokenizes every window it
takes examples from (a window's examples interleave across the ranks), where pairs are tokenized
one rank's rows each.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import time
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from torch.utils.data import IterableDataset, get_worker_info

from model import stopping
from model.errors import UserError
from model.faults import fault_point
from model.data import span_corruption as sc
from model.data.batches import TokenEncoder, batch_from_ids
from model.data.epoch_order import EpochPlan, OrderParams
from model.data.files import (TEXT_COLUMN, as_text, blank_mask, check_utf8, open_parquet, row_group_table,
                              short_read_error)
from model.data.read_guard import ReadGuard
from model.data.window_reader import WindowReader

logger = logging.getLogger(__name__)

COUNT_ROWS = 4096  # rows tokenized per call of the counting pass
COUNT_RULE = 1  # how a row is counted (whole document + eos, literal special tokens as text): a saved count of another rule is not taken
FOOTER_BYTES = 1 << 26  # a Parquet footer larger than this is not digested (the counts are then not kept)


@dataclass(frozen=True)
class SpanSettings:
    """T5's span corruption (the T5 paper's values by default)."""

    max_seq_len: int  # tokens of a corrupted input, eos included
    noise_density: float = 0.15  # share of a run's tokens masked
    mean_noise_span_length: float = 3.0  # mean tokens per masked span

    def __post_init__(self):
        if not 0 < self.noise_density < 1:
            raise ValueError(f'noise_density must be in (0, 1), got {self.noise_density}')
        if not self.mean_noise_span_length >= 1:
            raise ValueError(f'mean_noise_span_length must be >= 1, got {self.mean_noise_span_length}')

    @property
    def lengths(self) -> tuple[int, int]:
        """(raw tokens per example, target tokens of a full example)."""
        return sc.lengths_for(self.max_seq_len, self.noise_density, self.mean_noise_span_length)


def runs_of(tokens: np.ndarray, raw_length: int) -> np.ndarray:
    """Examples made of windows holding ``tokens`` tokens each (see :func:`span_corruption.pack`)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    return tokens // raw_length + (tokens % raw_length >= 2)


class SpanCorruptionDataset(IterableDataset):
    """This rank's span-corrupted local batches of one pass; the same interface as
    model/data/loader.py's ParquetStreamDataset, positions being examples instead of rows."""

    def __init__(self, files: list[str], encoder: TokenEncoder, span: SpanSettings, return_row_index: bool = False,
                 count_share: tuple | None = None):
        """count_share: (rank, world, combine): this process counts the tokens of the row groups
        g with g % world == rank and combine(counts, error) sums every rank's (see row_tokens)."""
        if encoder.truncate:
            raise ValueError('span corruption packs whole documents: give a TokenEncoder with truncate=False')
        if encoder.sentinel_ids is None:
            raise UserError('the tokenizer has no T5 sentinel tokens (<extra_id_0> ...), which span corruption '
                            'needs; train one with: python train_low_mem.py train_tokenizer --train_file=YOUR_TEXT '
                            '--tokenizer_dir=NEW_FOLDER')
        self.files, self.encoder, self.span = files, encoder, span
        self.return_row_index = return_row_index
        self.raw_length, _ = span.lengths
        spans = sc.span_count(self.raw_length, span.noise_density, span.mean_noise_span_length)
        if spans > sc.SENTINEL_COUNT:  # each noise span takes one sentinel
            raise UserError(f'max_seq_len={span.max_seq_len} with noise_density={span.noise_density} and '
                            f'mean_noise_span_length={span.mean_noise_span_length} makes {spans} noise spans an '
                            f'example, more than the {sc.SENTINEL_COUNT} sentinels; lower --max_seq_len or raise '
                            f'--mean_noise_span_length')
        self.row_groups, self.num_rows = row_group_table(files, (TEXT_COLUMN,))
        self._row_tokens: np.ndarray | None = None
        self._counts_part: dict | None = None
        self._counts_of: dict | None = None  # what the counts were counted from (read as they were counted)
        self.counts_taken = False  # the counts came from a saved state (take_counts), not from counting
        self._share_before_taking = count_share
        self.count_share = count_share
        self._sizes: dict[tuple[int, OrderParams], np.ndarray] = {}
        self.pass_ = None

    # -- sizes

    def row_tokens(self) -> np.ndarray:
        """Every row's tokens with its eos (0 for a blank row), files in order: the counting pass,
        split across the ranks when a count_share is given (every rank must call it then, together)."""
        if self._row_tokens is None:
            rank, world, combine = self.count_share or (0, 1, None)
            try:
                self._counts_of = self._counted_from()
            except OSError:  # then the counts are kept without their origin: a resume counts again
                self._counts_of = None
            start, counts, error = time.perf_counter(), np.zeros(self.num_rows, dtype=np.int64), None
            broken_off = False  # a stop came (a training run only records it): the count ends here, unfinished
            try:
                for g, (fi, rg, n, first) in enumerate(self.row_groups):
                    if g % world == rank:
                        got = self._count_row_group(fi, rg, n)
                        if got is None:
                            broken_off = True
                            break
                        counts[first:first + n] = got
            except UserError as e:  # a damaged page: every rank must hear of it before the sum
                error = e
            if combine is not None:
                counts = combine(counts, error)  # every rank leaves here if any broke its count off
            elif error is not None:
                raise error
            # nothing unfinished is kept; with a sum over ranks the stop is the sum's to say (every rank at once)
            if broken_off or (combine is None and stopping.requested()):
                raise stopping.STOP.stopped(f'while counting the training text\'s tokens, '
                                            f'{stopping.STOP.seconds_since_signal():.1f} s after the signal: nothing '
                                            f'was trained, saved or moved')
            self._row_tokens, self.count_share = counts, None  # counted: nothing of the ranks' group is pickled
            logger.info('data: %d tokens in %d rows, counted in %.1f s by %d process(es) (span corruption: %d '
                        'tokens per example)', int(counts.sum()), self.num_rows, time.perf_counter() - start, world,
                        self.raw_length)
        return self._row_tokens

    def counts_part(self) -> dict:
        """The rows' token counts as a saved state keeps them (in its data position): int32
        little-endian, zlib, base64, with what they were counted from. Made once."""
        if self._counts_part is None:
            counts = self.row_tokens()
            packed = zlib.compress(counts.astype('<i4').tobytes(), 1)
            self._counts_part = {'of': self._counts_of, 'rows': int(counts.size), 'tokens': int(counts.sum()),
                                 'int32_zlib_base64': base64.b64encode(packed).decode('ascii')}
        return self._counts_part

    def take_counts(self, part) -> str | None:
        """The counts of a saved state's data position, if they were counted from these very files
        (names, sizes, footers) with this tokenizer and rule: None, taken; else why not, nothing
        taken (they are then counted as at a first start)."""
        now = self._counted_from()
        if not isinstance(part, dict) or not isinstance(part.get('of'), dict):
            return 'the saved state holds none'
        was = part['of']
        if any(f['footer_sha256'] is None for f in now['files']):
            return 'a file\'s Parquet footer could not be read or is too large to digest'
        if was.get('files') != now['files'] or part.get('rows') != self.num_rows:
            names = [f['name'] for f in now['files']]
            changed = [f['name'] for f in now['files'] if f not in (was.get('files') or [])]
            return (f'the training files differ from those counted ({", ".join(changed or names)}: another name, '
                    f'size or Parquet footer, e.g. written again)')
        if was.get('tokenizer_sha256') != now['tokenizer_sha256']:
            return 'they were counted with another tokenizer'
        if was.get('rule') != now['rule']:
            return 'they were counted by another version of the counting rule'
        try:
            raw = zlib.decompressobj().decompress(base64.b64decode(part['int32_zlib_base64'], validate=True),
                                                  4 * self.num_rows + 1)  # never more than the rows' numbers
            counts = np.frombuffer(raw, dtype='<i4').astype(np.int64)
        except (KeyError, TypeError, ValueError, binascii.Error, zlib.error):
            return 'they are damaged'
        if counts.size != self.num_rows or (counts < 0).any() or int(counts.sum()) != part.get('tokens'):
            return 'they are damaged'
        self._share_before_taking = self.count_share
        self._row_tokens, self._counts_of, self.count_share, self.counts_taken = counts, now, None, True
        return None

    def drop_taken_counts(self) -> None:
        """Forget counts taken from a saved state (another rank could not take them: all count)."""
        if self.counts_taken:
            self._row_tokens, self._counts_of, self._counts_part = None, None, None
            self.count_share, self.counts_taken = self._share_before_taking, False

    def _counted_from(self) -> dict:
        """What the counts depend on: each file's name, size and footer digest, the tokenizer, the rule."""
        files = []
        for path in self.files:
            size = os.path.getsize(path)
            with open(path, 'rb') as f:  # a Parquet file ends with its footer, its 4-byte length, b'PAR1'
                f.seek(max(size - 8, 0))
                tail = f.read(8)
                length = int.from_bytes(tail[:4], 'little') if len(tail) == 8 else -1
                if not 0 <= length <= min(FOOTER_BYTES, size - 8):
                    footer = None
                else:
                    f.seek(size - 8 - length)
                    footer = hashlib.sha256(f.read(length)).hexdigest()
            files.append({'name': os.path.basename(path), 'bytes': size, 'footer_sha256': footer})
        return {'files': files, 'tokenizer_sha256': self.encoder.digest(), 'rule': COUNT_RULE}

    def _count_row_group(self, fi: int, rg: int, rows: int) -> np.ndarray | None:
        """Tokens (eos included) of each row of one row group, 0 for a blank row; None when a stop
        came (model/stopping.py: a training run records it and goes on) before it was counted."""
        path, out, done = self.files[fi], [], 0
        pf = open_parquet(path)
        try:
            with ReadGuard(path).at(f'row group {rg}'):
                for batch in pf.iter_batches(batch_size=COUNT_ROWS, row_groups=[rg], columns=[TEXT_COLUMN]):
                    fault_point('token-count')
                    if stopping.requested():
                        return None
                    check_utf8(batch)
                    texts = as_text(batch.column(TEXT_COLUMN))
                    n = np.zeros(len(texts), dtype=np.int64)
                    keep = np.flatnonzero(~blank_mask(texts))
                    if keep.size:
                        n[keep] = self.encoder.encode_lengths(texts.take(pa.array(keep)).to_pylist())
                    out.append(n)
                    done += len(texts)
        finally:
            pf.close()
        if done != rows:
            raise short_read_error(path, rg, done, rows)
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def window_examples(self, plan: EpochPlan) -> np.ndarray:
        """Examples of each window of the plan, from the rows' token counts."""
        key = (plan.epoch, plan.order)
        sizes = self._sizes.get(key)
        if sizes is None:
            cum = np.concatenate([[0], np.cumsum(self.row_tokens())])
            tokens = [sum(int(cum[u.first_row + u.rows] - cum[u.first_row]) for u in window) for window in plan.windows]
            sizes = self._sizes[key] = runs_of(np.array(tokens, dtype=np.int64), self.raw_length)
            for old in [k for k in self._sizes if k != key][:-1]:  # the last two epochs' are kept
                del self._sizes[old]
        return sizes

    def num_positions(self, epoch: int, order: OrderParams) -> int:
        """Examples in the epoch (they vary a little with the epoch: its windows hold other rows)."""
        return int(self.window_examples(self.plan(epoch, order)).sum())

    def plan(self, epoch: int, order: OrderParams) -> EpochPlan:
        return EpochPlan(self.row_groups, order, epoch, self.num_rows)

    # -- iteration

    def configure(self, pass_) -> None:
        self.pass_ = pass_

    def __iter__(self):
        if self.pass_ is None:
            raise RuntimeError('configure() the dataset before iterating it')
        return self._batches(self.pass_)

    def _batches(self, pass_):
        from model.data.loader import READ_ERROR, ParquetStreamDataset

        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:
            os.environ['TOKENIZERS_PARALLELISM'] = 'false'
        plan = self.plan(pass_.epoch, pass_.order)
        starts = np.concatenate([[0], np.cumsum(self.window_examples(plan))])
        reader = WindowReader(self.files, plan, (TEXT_COLUMN,))
        windows = _WindowRuns(self, plan, reader, starts, pass_.epoch)
        try:
            for j, s, e in ParquetStreamDataset.local_batches(pass_, worker, num_workers):
                batch = windows.batch(s, e)
                batch['batch_index'] = j
                yield batch
        except UserError as e:  # a damaged page met mid-epoch: see ParquetStreamDataset
            if info is None:
                raise
            yield {READ_ERROR: str(e)}
        finally:
            reader.close()


class _WindowRuns:
    """The runs (uncorrupted examples) of the windows in use, tokenized once each."""

    def __init__(self, dataset: SpanCorruptionDataset, plan: EpochPlan, reader: WindowReader, starts: np.ndarray,
                 epoch: int):
        self.dataset, self.plan, self.reader, self.starts, self.epoch = dataset, plan, reader, starts, epoch
        self.runs: dict[int, list[np.ndarray]] = {}

    def window_runs(self, w: int) -> list[np.ndarray]:
        runs = self.runs.get(w)
        if runs is None:
            for old in [x for x in self.runs if x < w]:
                del self.runs[old]
            lo, hi = int(self.plan.window_start[w]), int(self.plan.window_start[w + 1])
            self.reader.release_below(lo)
            (texts,), _, _ = self.reader.take(np.arange(lo, hi, dtype=np.int64))  # blank rows left out
            flat, lens = self.dataset.encoder.encode_ragged(texts) if texts else (np.zeros(0, np.int64), None)
            runs = self.runs[w] = sc.pack([flat], self.dataset.raw_length) if flat.size else []
            expected = int(self.starts[w + 1] - self.starts[w])
            if len(runs) != expected and self.dataset.counts_taken:  # changed inside, the same size and footer
                raise UserError(f'{", ".join(self.dataset.files)}: the text differs from the token counts the saved '
                                f'state kept (window {w}: {len(runs)} examples, {expected} by the kept counts): a file '
                                f'was changed in place since they were counted',
                                'resume with --allow_data_change=True: the run then counts the tokens again')
            if len(runs) != expected:  # the files changed after the counting pass
                raise UserError(f'{", ".join(self.dataset.files)}: the text changed while training read it '
                                f'(window {w}: {len(runs)} examples, {expected} counted at start-up); '
                                f'start the run again')
        return runs

    def batch(self, start: int, stop: int) -> dict:
        d, span = self.dataset, self.dataset.span
        inputs, targets = [], []
        for k in range(start, stop):
            w = int(np.searchsorted(self.starts, k, side='right') - 1)
            run = self.window_runs(w)[k - int(self.starts[w])]
            mask = sc.noise_mask(len(run), span.noise_density, span.mean_noise_span_length,
                                 sc.example_rng(self.plan.order.seed, self.epoch, k))
            x, y = sc.corrupt(run, mask, d.encoder.sentinel_ids, d.encoder.eos_id)
            inputs.append(x)
            targets.append(y)

        def side(seqs):
            if not seqs:
                return np.zeros(0, np.int64), np.zeros(0, np.int64)
            return np.concatenate(seqs), np.array([len(s) for s in seqs], dtype=np.int64)
        rows = np.arange(start, stop, dtype=np.int64) if d.return_row_index else None
        return batch_from_ids(side(inputs), side(targets), rows, 0, d.encoder.eos_id)
