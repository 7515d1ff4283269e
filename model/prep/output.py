"""Writing the toolkit's Parquet: full row groups, the toolkit's marker, an atomic rename.

Outputs have exactly the string columns of their kind (model/data/files.py ``KINDS``):
``prompt`` and ``response`` (pairs, ``OUTPUT_SCHEMA``) or ``text`` (raw text,
``TEXT_OUTPUT_SCHEMA``), in row groups of
``ROW_GROUP_ROWS`` rows (fewer when rows are long: about ``ROW_GROUP_MAX_BYTES`` of text),
carry the toolkit's marker in the footer (so a later command may replace them, and nothing else), and are written to a temporary file renamed into place, so
a failed run leaves no partial file behind.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from model.errors import UserError
from model.state import markers, ownership, writes
from model.data.files import KINDS, resolve_parquet_files
from model.state.markers import DATA
from model.stopping import critical_from_mark

ROW_GROUP_ROWS = 65536  # rows per output row group: the training streamer shuffles at this grain
BATCH_ROWS = 8192  # rows per read batch: bounds memory per step, big enough for vectorised work
ROW_GROUP_MAX_BYTES = 64 << 20  # long rows: a row group ends here, far below a reader's limit (read_guard)
OUTPUT_SCHEMAS = {kind: pa.schema([(name, pa.string()) for name in columns]) for kind, columns in KINDS.items()}
OUTPUT_SCHEMA = OUTPUT_SCHEMAS['pairs']  # prompt, response
TEXT_OUTPUT_SCHEMA = OUTPUT_SCHEMAS['text']  # text


class RowGroupWriter:
    """Buffers incoming tables so every row group but the last has ROW_GROUP_ROWS rows, or
    fewer when they hold ROW_GROUP_MAX_BYTES of text."""

    def __init__(self, writer: pq.ParquetWriter, kind: str = 'pairs'):
        self._writer, self.kind = writer, kind
        self._pending: list[pa.Table] = []
        self._pending_rows = self._pending_bytes = 0
        self.rows_written = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._pending.append(build_output_table(table, self.kind))
        self._pending_rows += table.num_rows
        self._pending_bytes += self._pending[-1].nbytes
        if self._pending_rows >= ROW_GROUP_ROWS or self._pending_bytes >= ROW_GROUP_MAX_BYTES:
            self._flush(final=False)

    @property
    def rows_total(self) -> int:
        """Rows written so far, including those still buffered for the next row group."""
        return self.rows_written + self._pending_rows

    def close(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        table = pa.concat_tables(self._pending) if self._pending else None
        self._pending, self._pending_rows, self._pending_bytes = [], 0, 0
        if table is None:
            return
        per_group = ROW_GROUP_ROWS
        if table.nbytes > ROW_GROUP_MAX_BYTES:  # long rows: fewer of them a row group
            per_group = max(1, min(per_group, table.num_rows * ROW_GROUP_MAX_BYTES // table.nbytes))
        full = table.num_rows if final else table.num_rows - table.num_rows % per_group
        if full:
            self._writer.write_table(table.slice(0, full), row_group_size=per_group)
            self.rows_written += full
        if full < table.num_rows:
            self._pending, self._pending_rows = [table.slice(full)], table.num_rows - full
            self._pending_bytes = self._pending[0].nbytes


def build_output_table(table: pa.Table | pa.RecordBatch, kind: str = 'pairs') -> pa.Table:
    """The columns of the kind as plain `string` (inputs may hold large_string)."""
    arrays = [table.column(name).cast(pa.string()) for name in KINDS[kind]]
    return pa.Table.from_arrays(arrays, schema=OUTPUT_SCHEMAS[kind])


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
        real = ownership.resolve_place(path, f'--{what}', file=True)  # a link is written through, never replaced
        if real in seen:
            raise UserError(f'--{what} and --{seen[real]} are the same file: {path}')
        seen[real] = what
        ownership.check_not_an_input(real, files, f'--{what}', specs, given=os.fspath(path))
        ownership.check_replaceable(real, DATA, f'--{what}', folder=False)
        ownership.check_writable(real, f'--{what}')
        if os.fspath(path).endswith(os.sep):
            named = os.fspath(path).rstrip(os.sep) or 'out'
            raise UserError(f'--{what}={path} names a folder; give the file to write, e.g. '
                            f'{named if named.endswith(".parquet") else named + ".parquet"}')
        if not real.endswith('.parquet') or os.path.basename(real) == '.parquet':  # a folder's reader: its *.parquet
            stem = os.path.splitext(real)[0] or 'out'
            named = stem if stem.endswith('.parquet') else f'{stem}.parquet'
            if os.path.basename(named) == '.parquet':  # a hidden file, which a folder's reader passes over
                named = os.path.join(os.path.dirname(named), 'out.parquet')
            through = f' leads to {real}:' if real != os.path.abspath(os.path.expanduser(os.fspath(path))) else ':'
            raise UserError(f'--{what}={path}{through} the output is written as Parquet, and the readers know Parquet '
                            f'by its name (a folder given as input: its *.parquet files; a .json, .csv or .txt name '
                            f'is taken for a source to convert); name it {named}')


@contextlib.contextmanager
def open_parquet_output(path: str, command: str = '', kind: str = 'pairs') -> Iterator[RowGroupWriter]:
    """A RowGroupWriter of the kind's columns (pairs or text) on a temporary file next to
    ``path``, renamed into place on success.

    The footer carries the toolkit's marker, so a later command may replace this file; any
    other file at ``path`` is refused before anything is written.
    """
    with writes.atomic_file(path, DATA, 'the output') as tmp:
        writer = pq.ParquetWriter(tmp, OUTPUT_SCHEMAS[kind])
        try:
            rows = RowGroupWriter(writer, kind)
            yield rows
            rows.close()
            writer.add_key_value_metadata(markers.parquet_marker(DATA, command=command, rows=rows.rows_written))
        finally:
            writer.close()


@contextlib.contextmanager
def open_parquet_outputs(paths: list[str], command: str = '', kind: str = 'pairs') -> Iterator[list[RowGroupWriter]]:
    """Several outputs that belong together (split's train and validation files): written in
    full, then renamed into place together -- a stop while they are renamed waits for the last
    one -- or, on any failure or a stop before that, none of them."""
    with critical_from_mark() as all_written, contextlib.ExitStack() as stack:
        writers = [stack.enter_context(open_parquet_output(path, command, kind)) for path in paths]
        yield writers
        all_written()
