"""Bounded memory per record at every reader, and damage met mid-read (model/data/read_guard.py).

The limits are lowered for the tests; memory is Python's own (tracemalloc), which is where a
whole line or JSON value would land if a reader held it.
"""

from __future__ import annotations

import io
import json
import os
import sys
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.errors import UserError
import cli_runner
from conftest import ENV, ROOT, make_texts, write_parquet
# imported before memory is measured
from model.prep import output as prep_output
from model.prep import records as prep_records
from model.data import read_guard
from model.data.files import inspect_parquet, iter_text_tables
from model.prep.ops import convert_to_parquet

LIMIT = 64 << 10
ROW_GROUP_LIMIT = 2 << 20  # over a page (~1 MiB as pyarrow writes them)
HUGE = 8 << 20  # a record 128 times the limit


@pytest.fixture
def small_limits(monkeypatch):
    monkeypatch.setattr(read_guard, 'MAX_RECORD_BYTES', LIMIT)
    monkeypatch.setattr(read_guard, 'MAX_ROW_GROUP_TEXT_BYTES', ROW_GROUP_LIMIT)
    monkeypatch.setattr(read_guard, 'MAX_LOG_LINE_BYTES', LIMIT)
    monkeypatch.setattr(prep_records, 'READ_CHUNK_BYTES', 4 << 10)


def peak_python_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def refused(fn, match) -> int:
    """Peak Python memory of fn, which must raise a UserError matching `match`."""
    def run():
        with pytest.raises(UserError, match=match):
            fn()
    return peak_python_bytes(run)


def test_a_huge_jsonl_line_is_refused_before_it_is_held(tmp_path, small_limits):
    src = tmp_path / 'big.jsonl'
    good = json.dumps({'prompt': '问', 'response': '答'}, ensure_ascii=False)
    src.write_text(f'{good}\n{good}\n{{"prompt": "{"长" * (HUGE // 3)}", "response": "x"}}\n', encoding='utf-8')
    peak = refused(lambda: convert_to_parquet(str(src), str(tmp_path / 'out.parquet')),
                   r'big\.jsonl: line 3 is longer than 64 KiB \(read_guard\.MAX_RECORD_BYTES\)')
    assert peak < 8 * LIMIT, peak
    assert not os.path.exists(tmp_path / 'out.parquet')


@pytest.mark.parametrize('layout', ['list', 'records under a key', 'one object'])
def test_a_huge_json_value_is_refused_while_it_streams(tmp_path, small_limits, layout):
    big = {'prompt': 'x' * HUGE, 'response': 'y'}
    value = {'list': [{'prompt': 'a', 'response': 'b'}, big],
             'records under a key': {'data': [{'prompt': 'a', 'response': 'b'}, big]},
             'one object': big}[layout]
    src = tmp_path / 'big.json'
    src.write_text(json.dumps(value), encoding='utf-8')
    where = {'list': 'element 2 of the list', 'records under a key': 'element 2 of the list',
             'one object': 'the top-level object'}[layout]
    peak = refused(lambda: convert_to_parquet(str(src), str(tmp_path / 'out.parquet')),
                   f'{where} is longer than 64 KiB')
    assert peak < 8 * LIMIT, peak


@pytest.mark.parametrize('size,message', [
    (HUGE, r'big\.csv: a row is longer than 64 KiB .* or a quote'),  # past two blocks: pyarrow stops
    (LIMIT + 3000, r'big\.csv: data row 2 is longer than 64 KiB'),  # within two blocks: read, then refused
])
def test_a_huge_csv_row_of_short_lines_is_one_line_naming_the_limit(tmp_path, small_limits, size, message):
    src = tmp_path / 'big.csv'
    src.write_text('prompt,response\n问,答\n"' + '长长长长长\n' * (size // 16) + '",答\n', encoding='utf-8')
    with pytest.raises(UserError, match=message):
        convert_to_parquet(str(src), str(tmp_path / 'out.parquet'))


@pytest.mark.parametrize('name,text,where', [
    ('one_line.csv', '长' * (LIMIT // 3 + 10), 'line 1'),  # the header alone, no line end: the whole file
    ('header.tsv', 'prompt\tresponse\t' + '长' * (LIMIT // 3 + 10) + '\n问\t答\n', 'line 1'),
    ('field.csv', 'prompt,response\n问,答\n"' + '长' * (LIMIT // 3 + 10) + '",答\n', r'line 3 \(from byte 24\)'),
    ('cr.csv', 'prompt,response\r问,答\r' + '长' * (LIMIT // 3 + 10), r'line 3 \(from byte 24\)'),
])
def test_a_csv_line_over_the_record_limit_is_refused_by_its_number_before_pyarrow_holds_it(
        tmp_path, small_limits, monkeypatch, name, text, where):
    """pyarrow reads on to a line's end (800 MB for a file of one 300 MB line) and then called
    the file empty; the line is refused first, read in pieces of the limit."""
    import pyarrow.csv as pcsv

    def not_read(*args, **kwargs):
        raise AssertionError('pyarrow opened the file')

    monkeypatch.setattr(pcsv, 'open_csv', not_read)
    src = tmp_path / name
    src.write_bytes(text.encode('utf-8'))
    peak = refused(lambda: convert_to_parquet(str(src), str(tmp_path / 'out.parquet')),
                   f'{name}: {where} is longer than 64 KiB \\(read_guard\\.MAX_RECORD_BYTES\\); no training row')
    assert peak < 8 * LIMIT, peak
    assert not os.path.exists(tmp_path / 'out.parquet')


def test_find_long_line_measures_lines_across_pieces():
    def first_long(data, limit=8):
        return read_guard.find_long_line(io.BytesIO(data), limit)

    assert first_long(b'') is None and first_long(b'12345678') is None and first_long(b'123456789') == 0
    assert first_long(b'1234\n12345678\r\n1234567\n') is None
    assert first_long(b'1234\n123456789\n') == 5 and first_long(b'1234\r\n123\r123456789') == 10
    assert first_long(b'\n' * 20 + b'123456789') == 20


def test_a_large_row_group_of_ordinary_rows_is_read_in_slices_and_a_huge_page_is_refused(tmp_path, small_limits,
                                                                                       monkeypatch):
    """pandas and pyarrow write row groups of up to a million rows: over MAX_ROW_GROUP_TEXT_BYTES
    they are streamed in slices, not refused; one value larger than a record may be is refused
    from the page headers before any read, with the fix."""
    monkeypatch.setattr(prep_output, 'ROW_GROUP_MAX_BYTES', LIMIT)
    pairs = make_texts(20_000, seed=2, max_len=60)
    src = write_parquet(tmp_path / 'big_groups.parquet', pairs)  # one row group of ~2.6 MiB
    assert inspect_parquet(src).num_rows == 20_000
    assert [r for t in iter_text_tables(src) for r in zip(*t.to_pydict().values())] == pairs
    out = str(tmp_path / 'fixed.parquet')
    assert convert_to_parquet(src, out) == 20_000
    assert len(inspect_parquet(out).row_group_rows) > 1  # convert writes row groups within the limit
    huge = str(tmp_path / 'huge_page.parquet')
    pq.write_table(pa.table({'prompt': ['长' * (HUGE // 3)] + ['问'] * 5000, 'response': ['答'] * 5001}), huge)
    with pytest.raises(UserError, match=r'row group 0 holds a page of 8\.0 MiB, more than the 2 MiB'):
        inspect_parquet(huge)


def test_a_parquet_cell_over_the_record_limit_is_refused_by_convert_from_the_footer(tmp_path, small_limits):
    src = str(tmp_path / 'cell.parquet')
    pq.write_table(pa.table({'prompt': ['长' * HUGE], 'response': ['答']}), src)
    peak = refused(lambda: convert_to_parquet(src, str(tmp_path / 'out.parquet')),
                   r'row group 0 holds 24\.0 MiB of text in 1 row\(s\), more than 64 KiB a row')
    assert peak < 8 * LIMIT, peak


def test_a_huge_page_in_a_large_row_group_is_refused_by_convert_before_it_is_read(tmp_path, small_limits):
    """Many short rows hide one huge value from the footer's average; its page header shows it."""
    src = str(tmp_path / 'cell.parquet')
    pq.write_table(pa.table({'prompt': ['长' * (HUGE // 3)] + ['问'] * 5000, 'response': ['答'] * 5001}), src)
    peak = refused(lambda: convert_to_parquet(src, str(tmp_path / 'out.parquet')),
                   r'row group 0 holds a page of 8\.0 MiB, more than the 2 MiB one read may hold')
    assert peak < 8 * LIMIT, peak


def test_page_headers_give_the_largest_page_whatever_the_writer_options(tmp_path):
    from model.data.files import largest_page_bytes

    table = pa.table({'prompt': ['长' * 100_000] + ['问'] * 3000, 'response': ['答'] * 3001})
    for i, options in enumerate(({}, {'use_dictionary': False}, {'compression': 'zstd'}, {'data_page_version': '2.0'},
                                 {'write_page_index': True, 'write_page_checksum': True}, {'data_page_size': 1024})):
        path = str(tmp_path / f'{i}.parquet')
        pq.write_table(table, path, **options)
        # the 300,000-byte value, with at most a page's worth (1 MiB) of the short ones
        assert 300_000 <= largest_page_bytes(path, 0) < 300_000 + (1 << 20), options
    (tmp_path / 'damaged.parquet').write_bytes(open(path, 'rb').read()[:200] + b'\xff' * 100)
    assert largest_page_bytes(str(tmp_path / 'damaged.parquet'), 0) is None


def test_plot_skips_a_huge_log_line_unread(tmp_path, small_limits):
    from model.use.plotting import read_curves

    log = tmp_path / 'run.log'
    with open(log, 'w', encoding='utf-8') as f:
        f.write('2026-01-01 INFO step 1/10 | epoch 0 | loss 5.0 | lr 1.0e-04\n')
        f.write('x' * HUGE + ' step 2/10 | epoch 0 | loss 9.9 | lr 9.0e-04\n')  # too long: skipped
        f.write('2026-01-01 INFO step 3/10 | epoch 0 | loss 4.0 | lr 2.0e-04\n')
        f.write('2026-01-01 INFO eval at step 3: validation loss 4.5\n')
    result = {}
    peak = peak_python_bytes(lambda: result.update(curves=read_curves(str(log))))
    curves = result['curves']
    assert (curves.step, curves.loss, curves.eval_step) == ([1, 3], [5.0, 4.0], [3])
    assert peak < 8 * LIMIT, peak


def test_chat_refuses_a_huge_piped_line_and_reads_the_others(small_limits):
    from train_low_mem import read_prompt_line

    stream = io.BytesIO('你好\r\n第二行\n'.encode() + b'x' * HUGE + b'\n')
    assert read_prompt_line(stream, 1).strip() == '你好'
    assert read_prompt_line(stream, 2).strip() == '第二行'
    peak = refused(lambda: read_prompt_line(stream, 3), r'stdin: line 3 is longer than 64 KiB')
    assert peak < 8 * LIMIT, peak
    with pytest.raises(EOFError):
        read_prompt_line(io.BytesIO(b''), 1)


@pytest.mark.slow
def test_a_cut_text_gives_the_tokens_of_the_whole_text(tokenizer):
    from model.data.batches import TokenEncoder

    encoder = TokenEncoder(tokenizer, 48)
    texts = [p + '\n' + r for p, r in make_texts(300, seed=9)]
    longs = [(t + ' ') * (encoder._cut_chars // len(t) + 2) for t in texts]
    assert all(len(t) > encoder._cut_chars for t in longs)
    whole = [e.ids for e in encoder._rust.encode_batch_fast(longs)]  # the same truncation, uncut
    assert encoder.encode(longs) == whole


# --------------------------------------------------------------------------- damage met mid-read


def test_a_file_cut_short_while_read_is_one_line_naming_the_row_group(tmp_path):
    src = write_parquet(tmp_path / 'data.parquet', make_texts(300, seed=3), row_group_size=100)
    tables = iter_text_tables(src)
    next(tables)
    os.truncate(src, 200)
    with pytest.raises(UserError, match=r'data\.parquet: row group 1: 0 of its 100 rows could be read'):
        next(tables)


def damage_row_group(tmp_path, name='data.parquet') -> str:
    """A file of 10 row groups whose row group 7 holds bytes that are not UTF-8."""
    pairs = make_texts(1000, seed=4)
    pairs[730] = ('MARKER-IN-GROUP-7', pairs[730][1])
    path = str(tmp_path / name)
    table = pa.table({'prompt': [p for p, _ in pairs], 'response': [r for _, r in pairs]})
    pq.write_table(table, path, row_group_size=100, compression='none', use_dictionary=False,
                   write_statistics=False)  # the marker only in its page
    data = open(path, 'rb').read()
    assert data.count(b'MARKER-IN-GROUP-7') == 1
    with open(path, 'wb') as f:
        f.write(data.replace(b'MARKER-IN-GROUP-7', b'\xff' * len('MARKER-IN-GROUP-7')))
    return path


@pytest.mark.parametrize('workers', [0, 1])
def test_a_damaged_page_met_mid_epoch_is_one_line(tmp_path, tokenizer, workers):
    from model.data.loader import LoaderSettings, StreamingLoader

    path = damage_row_group(tmp_path)
    inspect_parquet(path)  # the footer is fine: the damage shows only when the page is read
    loader = StreamingLoader(path, tokenizer, LoaderSettings(32, 4, shuffle=False, shuffle_window_rows=100,
                                                                 num_workers=workers))
    seen = 0
    with pytest.raises(UserError) as raised:
        for _ in loader:
            seen += 1
    assert seen >= 128  # row groups 0-6 trained on (tokenized 64 batches at a time) before the damage
    message = str(raised.value)
    assert '\n' not in message and 'Traceback' not in message
    assert message.startswith(f'{path}: row group 7: cannot be read') and 'UTF8' in message


def test_tokenizer_training_reports_the_damaged_file_not_sentencepiece(tmp_path):
    from model.data.tokenizer import train_tokenizer

    path = damage_row_group(tmp_path)
    with pytest.raises(UserError, match=r'data\.parquet: row group 7: cannot be read'):
        train_tokenizer(path, str(tmp_path / 'tok'), vocab_size=300, num_threads=1)
    assert not os.path.exists(tmp_path / 'tok')


def test_a_folder_named_like_a_file_and_a_fifo_are_refused(tmp_path):
    folder = tmp_path / 'inputs'
    folder.mkdir()
    write_parquet(folder / 'a.parquet', make_texts(10, seed=5))
    (folder / 'b.parquet').mkdir()
    with pytest.raises(UserError, match=r'b\.parquet: not a regular file'):
        iter_text_tables(str(folder)).__next__()
    fifo = str(tmp_path / 'pipe.parquet')
    os.mkfifo(fifo)
    for args in (['check', fifo], ['convert', fifo, str(tmp_path / 'out.parquet')]):
        # a reader that opened the FIFO would wait for a writer forever: the timeout would fail it
        r = cli_runner.run([sys.executable, 'prepare_data.py', *args], cwd=ROOT, env=ENV, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.count('\n') == 1 and 'not a regular file' in r.stderr, r.stderr


def test_row_groups_end_at_a_byte_size_when_rows_are_long(tmp_path, monkeypatch):
    monkeypatch.setattr(prep_output, 'ROW_GROUP_MAX_BYTES', LIMIT)
    rows = [('问' * 3000, '答' * 3000)] * 40  # 18 KB a row: ~4 rows a row group
    src = write_parquet(tmp_path / 'long.parquet', rows)
    out = str(tmp_path / 'out.parquet')
    convert_to_parquet(src, out)
    md = pq.ParquetFile(out).metadata
    sizes = [md.row_group(i).total_byte_size for i in range(md.num_row_groups)]
    assert md.num_rows == 40 and md.num_row_groups > 1 and max(sizes) < 2 * LIMIT, sizes


# --------------------------------------------------------------------------- the guard itself


class StopRun(BaseException):
    """Like the stop exception a SIGTERM raises: not an Exception."""


@pytest.mark.parametrize('error', [UserError('already one line'), KeyboardInterrupt(), StopRun(), MemoryError(),
                                   AttributeError('a bug'), NameError('a bug'), AssertionError('a bug')])
def test_the_guard_lets_through_what_is_not_a_reader_failure(error):
    with pytest.raises(type(error)) as raised:
        with read_guard.ReadGuard('data.parquet').at('row group 2'):
            raise error
    assert raised.value is error


@pytest.mark.parametrize('error,fix', [
    (pa.ArrowInvalid("Couldn't deserialize thrift: TProtocolException: Invalid data\nmore"), 'damaged'),
    (json.JSONDecodeError('Expecting value', 'x', 0), 'damaged'),
    (UnicodeDecodeError('utf-8', b'\xff', 0, 1, 'invalid start byte'), 'damaged'),
    (RecursionError('maximum recursion depth exceeded'), 'damaged'),
    (PermissionError(13, 'Permission denied', 'data.parquet'), 'check its permissions'),
    (FileNotFoundError(2, 'No such file or directory', 'data.parquet'), 'moved or deleted'),
])
def test_the_guard_makes_a_reader_failure_one_line_naming_the_file_and_place(error, fix):
    with pytest.raises(UserError) as raised:
        with read_guard.ReadGuard('data.parquet').at('row group 2'):
            raise error
    message = str(raised.value)
    assert message.startswith('data.parquet: row group 2: cannot be read (') and fix in message
    assert '\n' not in message and raised.value.__suppress_context__


def test_the_csv_quote_scan_lets_go_of_the_pages_it_read_past(tmp_path, monkeypatch):
    """convert's scan for a quote left open maps the whole CSV: it held every page it read as the
    process's resident memory (a 400 MB file: 900 MB peak, 618 MB without the scan), what `time
    -v` and a cluster's job accounting show; and a file without quotes was read to its end by one
    search, every page held. The peak is read from /proc."""
    from model.prep import readers

    monkeypatch.setattr(readers, '_DROP_EVERY', 1 << 20)
    quoted = '"' + '长' * 40 + '","' + '答' * 4000 + '"\n'
    plain = '长' * 40 + ',' + '答' * 4000 + '\n'  # no quote at all: one search would read to the end
    for name, row in (('quoted.csv', quoted), ('plain.csv', plain), ('late.csv', quoted)):
        with open(tmp_path / name, 'w', encoding='utf-8') as f:
            f.write('prompt,response\n' + row * (24 * (1 << 20) // len(row.encode())))
            if name == 'late.csv':  # quotes up front, then none
                f.write(plain * (24 * (1 << 20) // len(plain.encode())))
        held = _peak_memory_while(lambda: readers._quote_fault(str(tmp_path / name), ','))
        assert held < 8 << 10, f'{held} KiB of {name} held'


def _peak_memory_while(scan) -> int:
    """How far this process's peak resident memory (KiB) rose above its size while scan() ran: the
    peak is reset first (/proc/self/clear_refs), so nothing of earlier tests counts."""
    import re

    def status(key: str) -> int:
        return int(re.search(key + r':\s+(\d+)', open('/proc/self/status').read()).group(1))

    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    base = status('VmRSS')
    assert scan() is None
    return status('VmHWM') - base
