"""prepare_data.py: convert / split / check / clean / demo, in process and through the real CLI."""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cli_runner
from conftest import ENV, ROOT, make_texts, write_parquet, write_records
from model.errors import UserError
from model.prep import demo_corpus, ops as prep_ops, output as prep_output, readers as prep_readers
from model.prep import records as prep_records
from model.prep.demo_corpus import build_demo_rows, demo_prompts, write_demo
from model.prep.ops import build_report, clean_parquet, convert_to_parquet, format_report, split_parquet
from model.prep.output import OUTPUT_SCHEMA
from model.prep.records import find_bad_utf8


def set_constant(monkeypatch, name, value):
    """A module constant, in every data-preparation module that reads it."""
    name = {'TEXT_CHUNK_BYTES': 'READ_CHUNK_BYTES'}.get(name, name)
    for module in (prep_output, prep_records, prep_readers, prep_ops, demo_corpus):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, value)


def read_pairs(path) -> list[tuple]:
    table = pq.read_table(path)
    assert table.schema == OUTPUT_SCHEMA
    return list(zip(table.column('prompt').to_pylist(), table.column('response').to_pylist()))


def leftovers(folder) -> list[str]:
    """Temporary files a failed write could leave behind."""
    from conftest import is_temp_name

    return [n for n in os.listdir(folder) if is_temp_name(n)]


def write_source(path, pairs, fmt: str, keys=('question', 'answer')) -> str:
    """pairs in fmt with renamed columns and an extra column that convert must drop."""
    records = [{keys[0]: p, 'id': i, keys[1]: r} for i, (p, r) in enumerate(pairs)]
    return write_records(path, records, fmt)


# --- convert ----------------------------------------------------------------


@pytest.mark.parametrize('fmt', ['csv', 'json', 'jsonl', 'parquet'])
def test_convert_round_trip_renames_columns(tmp_path, fmt):
    pairs = make_texts(300, seed=3)
    pairs[5] = ('多行\n问题，带"引号"', '答案\n第二行')  # newlines and quotes survive CSV and JSON
    src = write_source(tmp_path / f'src.{fmt}', pairs, fmt)
    out = tmp_path / 'out.parquet'
    rows = convert_to_parquet(src, str(out), prompt_col='question', response_col='answer')
    assert rows == 300
    assert read_pairs(out) == pairs


def test_convert_writes_full_row_groups(tmp_path, monkeypatch):
    set_constant(monkeypatch, 'ROW_GROUP_ROWS', 100)
    set_constant(monkeypatch, 'BATCH_ROWS', 64)  # batches straddle row-group borders
    pairs = make_texts(450, seed=4)
    src = write_source(tmp_path / 'src.jsonl', pairs, 'jsonl')
    out = tmp_path / 'out.parquet'
    convert_to_parquet(src, str(out), 'question', 'answer')
    md = pq.ParquetFile(out).metadata
    assert [md.row_group(i).num_rows for i in range(md.num_row_groups)] == [100, 100, 100, 100, 50]
    assert read_pairs(out) == pairs


def test_row_group_writer_flushes_as_it_goes(tmp_path, monkeypatch):
    set_constant(monkeypatch, 'ROW_GROUP_ROWS', 100)
    chunk = prep_output.build_output_table(pa.table({'prompt': ['问'] * 50, 'response': ['答'] * 50}))
    with prep_output.open_parquet_output(str(tmp_path / 'out.parquet')) as out:
        for _ in range(5):
            out.write(chunk)
        assert out.rows_written == 200  # memory holds at most one row group
    assert out.rows_written == 250 and pq.ParquetFile(tmp_path / 'out.parquet').metadata.num_rows == 250


def test_json_list_parser_streams_across_small_chunks(tmp_path, monkeypatch):
    set_constant(monkeypatch, 'TEXT_CHUNK_BYTES', 64)  # every record crosses a read
    pairs = make_texts(50, seed=5)
    pairs[7] = ('长' * 500, '一个比读取块大很多的记录' * 20)  # a record larger than the window
    src = write_source(tmp_path / 'src.json', pairs, 'json')
    out = tmp_path / 'out.parquet'
    convert_to_parquet(src, str(out), 'question', 'answer')
    assert read_pairs(out) == pairs
    lines = [json.dumps({'question': p, 'answer': r}, ensure_ascii=False) for p, r in pairs]
    lines[40] = '{"question": "坏的", "answer" "没有冒号"}'
    (tmp_path / 'bad.json').write_text('[\n' + ',\n'.join(lines) + '\n]', encoding='utf-8')
    with pytest.raises(UserError, match=r'bad\.json: line 42: malformed JSON'):
        convert_to_parquet(str(tmp_path / 'bad.json'), str(out), 'question', 'answer')


def test_json_values_numbers_become_text_and_null_stays(tmp_path):
    src = tmp_path / 'src.json'
    src.write_text('\ufeff[{"prompt": 12, "response": 3.5}, {"prompt": "问", "response": null}]',
                   encoding='utf-8')  # a BOM, as Windows tools write it
    out = tmp_path / 'out.parquet'
    convert_to_parquet(str(src), str(out))
    assert read_pairs(out) == [('12', '3.5'), ('问', None)]


def test_jsonl_saved_as_json_and_format_flag(tmp_path):
    pairs = make_texts(20, seed=6)
    as_json = write_source(tmp_path / 'lines.json', pairs, 'jsonl')
    as_txt = write_source(tmp_path / 'lines.txt', pairs, 'jsonl')
    convert_to_parquet(as_json, str(tmp_path / 'a.parquet'), 'question', 'answer')
    convert_to_parquet(as_txt, str(tmp_path / 'b.parquet'), 'question', 'answer', input_format='jsonl')
    assert read_pairs(tmp_path / 'a.parquet') == pairs == read_pairs(tmp_path / 'b.parquet')


def test_an_output_not_named_parquet_is_refused_before_any_work(tmp_path):
    """The readers know Parquet by its name: convert wrote Parquet as x.json, which clean then
    refused as a source to convert, and whose suggested convert failed."""
    src = write_source(tmp_path / 'src.jsonl', make_texts(20, seed=6), 'jsonl')
    data = str(tmp_path / 'data.parquet')
    convert_to_parquet(src, data, 'question', 'answer')
    before = sorted(os.listdir(tmp_path))
    for name, run in [('x.json', lambda out: convert_to_parquet(src, out, 'question', 'answer')),
                      ('x', lambda out: clean_parquet(data, out)),
                      ('x.csv', lambda out: split_parquet(data, out, str(tmp_path / 'v.parquet'), valid_ratio=0.5)),
                      ('x.parquet/', lambda out: clean_parquet(data, out))]:
        with pytest.raises(UserError, match='x.parquet$'):
            run(f'{tmp_path}/{name}')  # a Path would drop the trailing slash
    assert sorted(os.listdir(tmp_path)) == before  # nothing written
    os.symlink(tmp_path / 'real.json', tmp_path / 'link.parquet')  # the name that counts is the file written
    os.symlink(tmp_path / 'real.parquet', tmp_path / 'link')
    with pytest.raises(UserError, match=r'link\.parquet leads to .*real\.json: .*name it .*real\.parquet$'):
        clean_parquet(data, str(tmp_path / 'link.parquet'))
    with pytest.raises(UserError, match=r'name it .*/x\.parquet$'):
        clean_parquet(data, str(tmp_path / 'x.parquet.tmp'))
    with pytest.raises(UserError, match=r'name it .*/out\.parquet$'):  # a hidden file: a folder's reader skips it
        clean_parquet(data, str(tmp_path / '.parquet'))
    os.symlink('k.parquet/', tmp_path / 'k2.parquet')  # a target written as a folder, through a chain too
    os.symlink('k2.parquet', tmp_path / 'k3.parquet')
    os.symlink('k.parquet//.', tmp_path / 'k4.parquet')
    for name, said in (('k2.parquet', 'k2.parquet points to k.parquet/,'), ('k3.parquet', 'k2.parquet points to k.parquet/,'),
                       ('k4.parquet', 'k4.parquet points to k.parquet//.,')):
        with pytest.raises(UserError, match=re.escape(said) + ' a folder.s name'):
            clean_parquet(data, str(tmp_path / name))
    assert not os.path.lexists(tmp_path / 'k.parquet')
    clean_parquet(data, str(tmp_path / 'link'))
    assert not os.path.exists(tmp_path / 'real.json') and os.path.isfile(tmp_path / 'real.parquet')


def test_failed_convert_leaves_no_file(tmp_path, monkeypatch):
    set_constant(monkeypatch, 'BATCH_ROWS', 10)
    set_constant(monkeypatch, 'ROW_GROUP_ROWS', 10)  # row groups hit the disk before the error
    src = write_source(tmp_path / 'src.jsonl', make_texts(95, seed=7), 'jsonl')
    with open(src, 'a', encoding='utf-8') as f:
        f.write('{"question": "坏", "answer": \n')
    out = tmp_path / 'out.parquet'
    with pytest.raises(UserError, match=r'src\.jsonl: line 96: malformed JSON'):
        convert_to_parquet(src, str(out), 'question', 'answer')
    assert not out.exists() and leftovers(tmp_path) == []


def test_find_bad_utf8_counts_lines_across_chunks(tmp_path, monkeypatch):
    set_constant(monkeypatch, 'TEXT_CHUNK_BYTES', 7)  # cuts 3-byte characters in two
    path = tmp_path / 'mixed.csv'
    path.write_bytes('prompt,response\n你好,世界\n早上,好\n'.encode() + '中文'.encode('gbk') + b',x\n')
    assert find_bad_utf8(str(path))[0] == 4
    path.write_bytes('全是好的\n文本\n'.encode())
    assert find_bad_utf8(str(path)) is None


# --- split ------------------------------------------------------------------


def assert_partition(source, train, valid):
    assert not set(train) & set(valid)
    assert collections.Counter(train) + collections.Counter(valid) == collections.Counter(source)


def test_split_sklearn_path_sizes_and_partition(tmp_path, monkeypatch):
    set_constant(monkeypatch, 'BATCH_ROWS', 64)  # rows are gathered from many batches
    set_constant(monkeypatch, 'ROW_GROUP_ROWS', 128)
    pairs = make_texts(1000, seed=8)
    src = write_parquet(tmp_path / 'all.parquet', pairs)
    result = split_parquet(src, str(tmp_path / 't.parquet'), str(tmp_path / 'v.parquet'))
    assert (result.train_rows, result.valid_rows, result.method) == (900, 100, 'sklearn')
    train, valid = read_pairs(tmp_path / 't.parquet'), read_pairs(tmp_path / 'v.parquet')
    assert_partition(pairs, train, valid)
    from sklearn.model_selection import train_test_split  # the guide's split, row for row
    assert (train, valid) == tuple(map(list, train_test_split(pairs, test_size=0.1, random_state=42)))
    again = split_parquet(src, str(tmp_path / 't2.parquet'), str(tmp_path / 'v2.parquet'))
    assert again == result and read_pairs(tmp_path / 'v2.parquet') == valid


def test_split_streaming_path_is_seeded_and_batch_independent(tmp_path, monkeypatch):
    pairs = make_texts(3000, seed=9)
    src = write_parquet(tmp_path / 'all.parquet', pairs, row_group_size=700)

    def run(name, seed):
        return split_parquet(src, str(tmp_path / f't{name}.parquet'), str(tmp_path / f'v{name}.parquet'),
                             valid_ratio=0.1, seed=seed, max_in_memory_rows=100)

    first = run('a', 42)
    assert first.method == 'streaming' and first.train_rows + first.valid_rows == 3000
    assert 220 <= first.valid_rows <= 380  # binomial(3000, 0.1): sd ~16
    train, valid = read_pairs(tmp_path / 'ta.parquet'), read_pairs(tmp_path / 'va.parquet')
    assert_partition(pairs, train, valid)
    set_constant(monkeypatch, 'BATCH_ROWS', 333)
    assert run('b', 42) == first and read_pairs(tmp_path / 'vb.parquet') == valid
    run('c', 7)
    assert read_pairs(tmp_path / 'vc.parquet') != valid


# --- check ------------------------------------------------------------------


def flawed_pairs() -> list[tuple]:
    """20 good rows, then 3 null rows (4 null fields), 3 blank rows and 2 repeats."""
    good = make_texts(20, seed=10, min_len=6)
    return good + [(None, 'a'), ('b', None), (None, None), ('', 'x'), ('y', '  \t'), ('\n', ' '),
                   good[0], good[3]]


def test_check_report_counts_known_flaws(tmp_path):
    pairs = flawed_pairs()
    src = write_parquet(tmp_path / 'flawed.parquet', pairs)
    report = build_report(src)
    assert report['shape'] == (28, 2) and report['columns'] == ['prompt', 'response']
    assert report['nulls'] == {'prompt': 2, 'response': 2}
    assert (report['null_rows'], report['blank_rows'], report['duplicate_rows']) == (3, 3, 2)
    assert len(report['head']) == 5 and report['head'][0]['prompt'] == pairs[0][0]
    prompt_lengths = [len(p) for p, _ in pairs if p is not None]
    assert report['prompt_chars']['count'] == len(prompt_lengths)
    assert report['prompt_chars']['max'] == max(prompt_lengths)
    assert report['tokens'] is None
    text = format_report(report)
    assert 'duplicate rows' in text and 'nulls per column' in text


def test_check_token_lengths_and_truncation(tmp_path, tokenizer_dir, tokenizer):
    pairs = make_texts(200, seed=11)
    src = write_parquet(tmp_path / 'texts.parquet', pairs)
    report = build_report(src, tokenizer_dir=tokenizer_dir, max_seq_len=12)
    lengths = [(len(tokenizer(p)['input_ids']), len(tokenizer(r)['input_ids'])) for p, r in pairs]
    expected = sum(lp > 12 or lr > 12 for lp, lr in lengths)
    assert 0 < expected < len(pairs)  # the figure below can be wrong either way
    tokens = report['tokens']
    assert tokens['sample_rows'] == 200 and tokens['sampled_all']
    assert tokens['truncated_rows'] == expected
    assert tokens['response']['max'] == max(lr for _, lr in lengths)
    assert 'would truncate' in format_report(report)


def test_check_samples_rows_for_token_stats(tmp_path, tokenizer_dir):
    src = write_parquet(tmp_path / 'texts.parquet', make_texts(2000, seed=12))
    tokens = build_report(src, tokenizer_dir=tokenizer_dir, token_sample_rows=300)['tokens']
    assert not tokens['sampled_all'] and 200 <= tokens['sample_rows'] <= 400
    assert 'random sample of' in format_report(build_report(src, tokenizer_dir, token_sample_rows=300))


# --- clean ------------------------------------------------------------------


def test_clean_counts_each_reason(tmp_path):
    pairs = flawed_pairs() + [('长' * 61, '短'), ('短', '长' * 61)]
    src = write_parquet(tmp_path / 'flawed.parquet', pairs)
    counts = clean_parquet(src, str(tmp_path / 'clean.parquet'), max_chars=60)
    assert counts == {'rows': 30, 'null': 3, 'blank': 3, 'too_long': 2, 'duplicate': 2, 'kept': 20}
    assert read_pairs(tmp_path / 'clean.parquet') == pairs[:20]
    counts = clean_parquet(src, str(tmp_path / 'kept_dups.parquet'), dedup=False)
    assert (counts['too_long'], counts['duplicate'], counts['kept']) == (0, 0, 24)


def test_clean_that_would_keep_no_row_writes_nothing_and_says_why(tmp_path):
    src = write_parquet(tmp_path / 'all_dropped.parquet', [('长' * 61, '短'), ('  ', '答'), ('长' * 61, '短')])
    with pytest.raises(UserError, match=r'no row left of 3 \(dropped: empty/whitespace 1, too long 2\); raise --max_chars '
                                        r'\(0 = no limit\); nothing written to'):
        clean_parquet(src, str(tmp_path / 'clean.parquet'), max_chars=60)
    with pytest.raises(UserError, match=r'none.parquet: no rows to clean; nothing written'):
        clean_parquet(write_parquet(tmp_path / 'none.parquet', []), str(tmp_path / 'clean.parquet'))
    assert not os.path.exists(tmp_path / 'clean.parquet')


# --- demo -------------------------------------------------------------------


def test_demo_files_rows_and_character_set(tmp_path):
    written = write_demo(str(tmp_path / 'demo'), rows=2000, seed=1)
    train_path, valid_path = str(tmp_path / 'demo' / 'train.parquet'), str(tmp_path / 'demo' / 'valid.parquet')
    assert written == {train_path: 1800, valid_path: 200}
    train, valid = read_pairs(train_path), read_pairs(valid_path)
    assert not {p for p, _ in train} & {p for p, _ in valid}  # validation prompts are unseen
    texts = [t for pair in train + valid for t in pair]
    assert max(map(len, texts)) < 40 and min(map(len, texts)) > 0
    chars = set(''.join(texts))
    assert len(chars) < 500
    assert all(set(p) <= chars for p in demo_prompts()) and len(demo_prompts()) >= 6


def test_demo_is_deterministic_with_learnable_answers():
    train, valid = build_demo_rows(20000, seed=42)
    assert (len(train), len(valid)) == (18000, 2000)
    assert build_demo_rows(500, seed=42) == build_demo_rows(500, seed=42) != build_demo_rows(500, seed=3)
    answers: dict[str, set] = collections.defaultdict(set)
    for prompt, response in train + valid:
        answers[prompt].add(response)
    assert all(len(a) == 1 for a in answers.values())  # the answer is a function of the prompt
    for prompt, response in demo_corpus.DEMO_EXAMPLES:
        assert answers.get(prompt, {response}) == {response}


# --- the real CLI -----------------------------------------------------------


def start_cli(*args, runner=cli_runner) -> subprocess.Popen:
    """runner=subprocess: the real interpreter (the smoke test), else forked from the zygote."""
    return runner.Popen([sys.executable, 'prepare_data.py', *map(str, args)], cwd=ROOT, env=ENV,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_cli(*args, runner=subprocess) -> subprocess.CompletedProcess:
    proc = start_cli(*args, runner=runner)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def run_forked(*args) -> subprocess.CompletedProcess:
    """run_cli forked from the zygote: the imports done once, not at every call."""
    return run_cli(*args, runner=cli_runner)


def build_bad_inputs(tmp_path):
    """(name, args, words the error line must hold) for each kind of user mistake."""
    d = tmp_path
    good = make_texts(9000, seed=13)
    write_source(d / 'late_bad.jsonl', good, 'jsonl')  # a first batch is written before the error
    with open(d / 'late_bad.jsonl', 'a', encoding='utf-8') as f:
        f.write('{"question": "问", "answer": oops}\n')
    (d / 'gbk.csv').write_bytes('question,answer\n你好,世界\n'.encode() + '再见,朋友\n'.encode('gbk'))
    (d / 'gbk_header.csv').write_bytes('问题,回答\n你好,世界\n'.encode('gbk'))
    (d / 'not_list.json').write_text('"just a string"', encoding='utf-8')
    (d / 'open_quote.csv').write_text('question,answer\n问一,答一\n"未闭合的引号,答二\n问三,答三\n', encoding='utf-8')
    # the quote in the last column: pyarrow took every later line into that value, one row, exit 0
    (d / 'open_quote_last.csv').write_text('question,answer\n问一,答一\n问二,"未闭合的引号\n问三,答三\n问四,答四\n',
                                           encoding='utf-8')
    (d / 'open_quote_text.csv').write_text('id,body\n' + ''.join(
        f'{i},"第{i}行,""引号""文本"\n' if i % 3 else f'{i},他说"好"\n' for i in range(40)) + '40,"没关上\n41,后面\n',
        encoding='utf-8')
    (d / 'extra_comma.csv').write_text('question,answer\n问一,答一\n"多\n行",答\n问二,答,二\n', encoding='utf-8')
    (d / 'not_objects.json').write_text('[\n{"question": "a", "answer": "b"},\n 42\n]', encoding='utf-8')
    (d / 'bad_list.json').write_text('[\n{"question": "a", "answer": "b"},\n{"question": "c" "answer": 1}\n]',
                                     encoding='utf-8')
    pq.write_table(pa.table({'question': [1, 2], 'answer': ['a', 'b']}), d / 'int_col.parquet')
    write_source(d / 'ok.jsonl', good[:5], 'jsonl')
    out = ['--prompt_col=question', '--response_col=answer']
    return [
        ('missing file', ['convert', d / 'nope.jsonl', d / 'out1.parquet'], ['nope.jsonl', 'no such file']),
        ('missing column', ['convert', d / 'ok.jsonl', d / 'out2.parquet', '--prompt_col=q'],
         ['ok.jsonl', 'line 1', "'q'"]),
        ('malformed json line', ['convert', d / 'late_bad.jsonl', d / 'out3.parquet', *out],
         ['late_bad.jsonl', 'line 9001', 'malformed JSON']),
        ('not utf-8 csv', ['convert', d / 'gbk.csv', d / 'out4.parquet', *out],
         ['gbk.csv', 'line 3', 'iconv -f GB18030 -t UTF-8']),
        ('not utf-8 csv header', ['convert', d / 'gbk_header.csv', d / 'out10.parquet'],
         ['gbk_header.csv', 'line 1', 'iconv -f GB18030 -t UTF-8']),
        ('csv quote never closed', ['convert', d / 'open_quote.csv', d / 'out11.parquet', *out],
         ['open_quote.csv', 'line 3', 'a quote (") opened there is never closed']),  # not a field count
        ('csv quote never closed, last column', ['convert', d / 'open_quote_last.csv', d / 'out13.parquet', *out],
         ['open_quote_last.csv', 'line 3', 'never closed']),
        ('csv text quote never closed', ['convert', d / 'open_quote_text.csv', d / 'out14.parquet', '--text_col=body'],
         ['open_quote_text.csv', 'line 42', 'never closed']),
        ('csv row with a comma too many', ['convert', d / 'extra_comma.csv', d / 'out12.parquet', *out],
         ['extra_comma.csv', 'line 5', 'a row of 3 field(s)']),  # after a quoted value over two lines
        ('json not a list', ['convert', d / 'not_list.json', d / 'out5.parquet', *out],
         ['not_list.json', 'line 1', 'list of objects']),
        ('json list of non-objects', ['convert', d / 'not_objects.json', d / 'out6.parquet', *out],
         ['not_objects.json', 'line 3', 'JSON object']),
        ('malformed json list', ['convert', d / 'bad_list.json', d / 'out7.parquet', *out],
         ['bad_list.json', 'line 3', 'malformed JSON']),
        ('non-string parquet column', ['convert', d / 'int_col.parquet', d / 'out8.parquet', *out],
         ['int_col.parquet', "'question'", 'int64']),
        ('check without prompt column', ['check', d / 'int_col.parquet'], ['int_col.parquet', 'no prompt and response columns', '--text_col']),
        ('unknown flag', ['clean', d / 'ok.jsonl', d / 'out9.parquet', '--max_char=3'], ['--max_chars']),
    ]


def test_cli_bad_inputs_end_in_one_line_and_no_file(tmp_path):
    assert_one_line_errors(tmp_path, build_bad_inputs(tmp_path))


def assert_one_line_errors(tmp_path, cases):
    """Each case (name, args, words) exits 2 with one line `error: ...` holding the words, and
    leaves no file behind."""
    before = set(os.listdir(tmp_path))
    running = [(name, words, start_cli(*args)) for name, args, words in cases]  # startup dominates
    for name, words, proc in running:
        _, stderr = proc.communicate(timeout=120)
        lines = stderr.strip().splitlines()
        assert proc.returncode == 2, (name, stderr)
        assert len(lines) == 1 and lines[0].startswith('error: '), (name, stderr)
        assert 'Traceback' not in stderr
        for word in words:
            assert word in lines[0], (name, word, lines[0])
    assert set(os.listdir(tmp_path)) == before  # no output and no temporary file


def test_cli_happy_path_convert_clean_split_check(tmp_path):
    pairs = make_texts(400, seed=14) + [('', '空'), ('重复', '行'), ('重复', '行')]
    write_source(tmp_path / 'raw.csv', pairs, 'csv')
    steps = [
        ('convert', tmp_path / 'raw.csv', tmp_path / 'all.parquet', '--prompt_col=question',
         '--response_col=answer'),
        ('clean', tmp_path / 'all.parquet', tmp_path / 'clean.parquet', '--max_chars=1000'),
        ('split', tmp_path / 'clean.parquet', f'--train_out={tmp_path / "train.parquet"}',
         f'--valid_out={tmp_path / "valid.parquet"}'),
        ('check', tmp_path / 'train.parquet'),
        ('convert', '--help'),  # the commands' **flags must not swallow it
    ]
    outputs = []
    for step in steps:
        proc = run_cli(*step)
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout + proc.stderr)  # Fire writes help to stderr
    assert f'wrote 403 rows to {tmp_path / "all.parquet"}' in outputs[0]
    assert 'empty/whitespace 1' in outputs[1] and 'duplicate 1' in outputs[1] and 'kept 401 rows' in outputs[1]
    assert 'train: 360 rows' in outputs[2] and 'valid: 41 rows' in outputs[2]
    assert 'shape: (360, 2)' in outputs[3]
    assert 'convert INPUT OUTPUT' in outputs[4] and '--prompt_col' in outputs[4]
    assert pq.ParquetFile(tmp_path / 'valid.parquet').schema_arrow == OUTPUT_SCHEMA


def quote_left_open(path: str, delimiter: str) -> int | None:
    """The line where readers._quote_fault finds a quoted value the file never closes, or None."""
    fault = prep_readers._quote_fault(path, delimiter)
    return fault[0] if fault is not None and fault[1] is None else None


def test_a_csv_quote_left_open_is_found_where_it_opens(tmp_path):
    """readers._quote_fault reads quotes as pyarrow does: only a value's first character opens
    one, "" is a quote, a quote inside an unquoted value is text; any CSV Python's csv writes is
    closed, and one with its last closing quote removed is open where that value starts."""
    import csv
    import io
    import random


    def left_open(text):
        (tmp_path / 'f.csv').write_bytes(text.encode('utf-8'))
        return quote_left_open(str(tmp_path / 'f.csv'), ',')

    assert left_open('id,body\n1,a\n2,"open\n3,c\n4,d\n') == 3
    assert left_open('\ufeff"id",body\n1,"x\n') == 2 and left_open('"id,body\n1,a\n') == 1
    assert left_open('a,b\n1,""\n2,""""\n3,he said "hi" ok\n4,5" screen\n') is None
    assert left_open('a,b\n1,"""\n') == 2 and left_open('a,b\r\n1,"x\r\ny"\r\n2,"z\r\n') == 4
    assert left_open('a,b\n1, "x\n') is None and left_open('') is None
    # a lone CR ends a line for pyarrow too; quotes doubled inside unquoted text are text (each was a rescan)
    assert left_open('text,b\r"a,"b,c\rd,e\r') is None and left_open('text,b\r1,a\r2,"open\r3,c\r') == 3
    assert left_open('id,text\n' + ''.join(f'{i},12"" screen\n' for i in range(3000))) is None
    rnd = random.Random(3)
    for _ in range(300):
        rows = [[rnd.choice(['a', 'b"c', '"', 'x,y', '多\n行', '', '中文']) + rnd.choice(['', '"', '""']) for _ in range(3)]
                for _ in range(rnd.randint(1, 6))]
        end = rnd.choice(['\n', '\r\n', '\r'])
        out = io.StringIO()
        csv.writer(out, lineterminator=end).writerows(rows)
        text = out.getvalue()
        assert left_open(text) is None, text
        assert prep_readers._quote_fault(str(tmp_path / 'f.csv'), ',') is None, text  # nothing read otherwise
        if text.endswith('"' + end):  # the last value was quoted: without its closing quote it runs to the end
            opened = text.rfind('"', 0, len(text) - 1 - len(end))
            while not (opened == 0 or text[opened - 1] in ',\r\n') or text[:opened].count('"') % 2:
                opened = text.rfind('"', 0, opened)
            before = text[:opened]
            breaks = before.count('\n') + before.count('\r') - before.count('\r\n')
            assert left_open(text[:-1 - len(end)] + end) == breaks + 1, text


# --- delimited text other than commas: TSV, ;, | ---------------------------


def write_delimited(path, rows, delimiter: str, end: str = '\n', bom: bool = False) -> str:
    """rows as Python's csv writes them with this delimiter (a value holding it, a quote or a line
    break is quoted)."""
    import csv

    with open(path, 'w', encoding='utf-8-sig' if bom else 'utf-8', newline='') as f:
        csv.writer(f, delimiter=delimiter, lineterminator=end).writerows(rows)
    return str(path)


# a tab, a comma, a semicolon, a quote and a line break inside values: quoted where they must be
DELIMITED_PAIRS = [('问一', '答一'), ('带\t制表符的问题', '答案，有逗号, a comma'), ('多\n行', '他说"好"'),
                   ('a;b|c', '"引号"开头')] + make_texts(50, seed=21)


def test_cli_converts_tsv_and_other_delimiters(tmp_path):
    """A TSV by its extension (.tsv, .tab), by --format=tsv, or by --delimiter written \\t, tab or
    a real tab; ; and | by --delimiter; a .tsv that is really comma-separated by --delimiter=,.
    Pairs and raw text (--text_col) alike, rows ended by LF or CRLF, a BOM or none, every value back
    as written."""
    pair_rows = [('question', 'answer')] + DELIMITED_PAIRS
    text_rows = [('id', 'body')] + [(str(i), p + r) for i, (p, r) in enumerate(DELIMITED_PAIRS)]
    pairs = ['--prompt_col=question', '--response_col=answer']
    cases = [  # (file name, delimiter written, flags)
        ('qa.tsv', '\t', []), ('qa.tab', '\t', []), ('qa.dat', '\t', ['--format=tsv']),
        ('qa.csv', '\t', ['--delimiter=\\t']), ('qa2.csv', '\t', ['--delimiter=tab']),
        ('qa3.csv', '\t', ['--delimiter=\t']), ('qa.txt', '\t', ['--format=csv', '--delimiter=\\t']),
        ('semi.csv', ';', ['--delimiter=;']), ('bar.csv', '|', ['--delimiter=|']),
        ('hive.txt', '\x01', ['--format=csv', '--delimiter=\\001']), ('hive2.csv', '\x01', ['--delimiter=\\x01']),
        ('unit.csv', '\x1f', ['--delimiter=\\u001f']),
        ('really_comma.tsv', ',', ['--delimiter=,']), ('crlf.tsv', '\t', []), ('bom.tsv', '\t', []),
    ]
    running = []
    for i, (name, delimiter, flags) in enumerate(cases):
        for kind, rows, cols in (('pairs', pair_rows, pairs), ('text', text_rows, ['--text_col=body'])):
            src = write_delimited(tmp_path / f'{kind}_{name}', rows, delimiter, '\r\n' if 'crlf' in name else '\n',
                                  bom='bom' in name)
            out = tmp_path / f'{kind}_{i}.parquet'
            running.append((name, kind, out, start_cli('convert', src, out, *cols, *flags)))
    for name, kind, out, proc in running:
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, (name, kind, stderr)
        got = pq.read_table(out).to_pylist()
        if kind == 'pairs':
            expected = DELIMITED_PAIRS
            got = [(r['prompt'], r['response']) for r in got]
        else:
            expected = [p + r for p, r in DELIMITED_PAIRS]
            got = [r['text'] for r in got]
        assert got == expected, (name, kind)


def test_cli_bad_delimited_inputs_end_in_one_line_and_no_file(tmp_path):
    d = tmp_path
    (d / 'open_quote.tsv').write_text('question\tanswer\n问一\t答一\n问二\t"未闭合的引号\n问三\t答三\n', encoding='utf-8')
    (d / 'open_quote_first.tsv').write_text('question\tanswer\n问一\t答一\n"未闭合\t答二\n问三\t答三\n', encoding='utf-8')
    (d / 'extra_tab.tsv').write_text('question\tanswer\n问一\t答一\n"多\n行"\t答\n问二\t答\t二\n', encoding='utf-8')
    (d / 'semi_extra.csv').write_text('id;body\n1;"多\n行"\n2;文;本\n', encoding='utf-8')
    (d / 'tabs.csv').write_text('id\tbody\n1\t文本\n', encoding='utf-8')
    (d / 'commas.tsv').write_text('question,answer\n问一,答一\n', encoding='utf-8')
    (d / 'semi.csv').write_text('prompt;response\n问一;答一\n', encoding='utf-8')
    (d / 'ok.csv').write_text('question,answer\n问一,答一\n', encoding='utf-8')
    (d / 'fw_comma.csv').write_text('prompt，response\n你好，世界\n', encoding='utf-8')
    (d / 'fw_semi.tsv').write_text('id；body\n1；你好，世界\n', encoding='utf-8')
    (d / 'hive.txt').write_text('id\x01body\n1\x01你好\n', encoding='utf-8')
    write_source(d / 'ok.jsonl', [('问', '答')], 'jsonl')
    (d / 'ok.txt').write_text('一行\n', encoding='utf-8')
    out = ['--prompt_col=question', '--response_col=answer']
    one = 'give the one character between values'
    cases = [
        ('tsv quote never closed, last column', ['convert', d / 'open_quote.tsv', d / 'o1.parquet', *out],
         ['open_quote.tsv', 'line 3', 'never closed']),
        ('tsv quote never closed, first column', ['convert', d / 'open_quote_first.tsv', d / 'o2.parquet', *out],
         ['open_quote_first.tsv', 'line 3', 'a quote (") opened there is never closed']),
        ('tsv row with a tab too many', ['convert', d / 'extra_tab.tsv', d / 'o3.parquet', *out],
         ['extra_tab.tsv', 'line 5', 'a row of 3 field(s)', 'a tab in a value']),
        ('; row with one too many', ['convert', d / 'semi_extra.csv', d / 'o4.parquet', '--text_col=body',
                                     '--delimiter=;'], ['semi_extra.csv', 'line 4', 'a row of 3 field(s)']),
        ('a tsv read as csv', ['convert', d / 'tabs.csv', d / 'o5.parquet', '--text_col=body'],
         ["missing column 'body' (has: 'id\\tbody')", 'read as CSV', 'tab-separated file?', '--delimiter=tab',
          '--format=tsv']),
        ('a csv named .tsv', ['convert', d / 'commas.tsv', d / 'o6.parquet', *out],
         ["missing column 'question'", 'read as TSV', 'comma-separated file?', '--delimiter=,']),
        ('a ;-separated csv', ['convert', d / 'semi.csv', d / 'o7.parquet'],
         ["missing column 'prompt'", 'semicolon-separated file?', "--delimiter=';'"]),
        ('empty delimiter', ['convert', d / 'ok.csv', d / 'o8.parquet', *out, '--delimiter='], ['is empty', one]),
        ('two-character delimiter', ['convert', d / 'ok.csv', d / 'o9.parquet', *out, '--delimiter=,,'],
         ["--delimiter=',,' is 2 characters", one, 'escapes read: ']),
        ('quote delimiter', ['convert', d / 'ok.csv', d / 'o10.parquet', *out, '--delimiter="'],
         ['a quote (") quotes values, it cannot separate them', one]),
        ('quote delimiter as an escape', ['convert', d / 'ok.csv', d / 'o10.parquet', *out, '--delimiter=\\x22'],
         ['a quote (") quotes values']),
        ('newline delimiter', ['convert', d / 'ok.csv', d / 'o11.parquet', *out, '--delimiter=\n'],
         ["--delimiter='\\n': a line break separates rows, not values", one]),
        ('CR delimiter', ['convert', d / 'ok.csv', d / 'o12.parquet', *out, '--delimiter=\r'],
         ['a line break separates rows, not values']),
        ('newline delimiter as a shell passes it', ['convert', d / 'ok.csv', d / 'o12.parquet', *out, '--delimiter=\\n'],
         ["--delimiter='\\n': a line break separates rows, not values", one]),
        ('CRLF delimiter as a shell passes it', ['convert', d / 'ok.csv', d / 'o12.parquet', *out,
                                                 '--delimiter=\\r\\n'], ['a line break separates rows, not values']),
        ('an escape not read', ['convert', d / 'ok.csv', d / 'o12.parquet', *out, '--delimiter=\\q'],
         ["--delimiter='\\q': not an escape this reads", "\\t or tab, \\\\ (a backslash), \\xHH, \\uHHHH, \\NNN (octal, e.g. Hive's \\001)"]),
        ('a tab escape the shell took the backslash of', ['convert', d / 'ok.csv', d / 'o21.parquet', *out,
                                                          '--delimiter=t'],
         ["--delimiter='t': letters and digits are text, not a separator; was it '\\t'?",
          "write --delimiter='\\t', quoted, or --delimiter=tab"]),
        ("Hive's escape so", ['convert', d / 'ok.csv', d / 'o22.parquet', *out, '--delimiter=001'],
         ["was it '\\001'?", "write --delimiter='\\001', quoted"]),
        ('a letter', ['convert', d / 'ok.csv', d / 'o23.parquet', *out, '--delimiter=a'],
         ["--delimiter='a': letters and digits are text, not a separator; give the one character"]),
        ('a NUL delimiter', ['convert', d / 'ok.csv', d / 'o19.parquet', *out, '--delimiter=\\0'],
         ["--delimiter='\\0': a NUL byte cannot separate values", one]),
        ('another non-ASCII delimiter', ['convert', d / 'ok.csv', d / 'o20.parquet', *out, '--delimiter=§'],
         ['not an ASCII character', "replace it by a tab first if no value holds a tab or '§'", '--delimiter=tab']),
        ('full-width comma', ['convert', d / 'ok.csv', d / 'o13.parquet', *out, '--delimiter=，'],
         ['not an ASCII character', 'would also split every value that holds it', 'export the file again as CSV']),
        ('a csv separated by full-width commas', ['convert', d / 'fw_comma.csv', d / 'o16.parquet'],
         ["missing column 'prompt' (has: 'prompt，response')", 'a file separated by full-width commas (，)?',
          'splits only at an ASCII character', 'export the file again as CSV with its values quoted']),
        ('a tsv separated by full-width semicolons', ['convert', d / 'fw_semi.tsv', d / 'o17.parquet', '--text_col=body'],
         ["missing column 'body' (has: 'id；body')", 'read as TSV', 'full-width semicolons (；)?', 'or as TSV']),
        ('a Hive export read as csv', ['convert', d / 'hive.txt', d / 'o18.parquet', '--format=csv', '--text_col=body'],
         ["missing column 'body' (has: 'id\\x01body')", "a \\001 (Hive)-separated file? pass --delimiter='\\001'"]),
        ('delimiter with jsonl', ['convert', d / 'ok.jsonl', d / 'o14.parquet', *out, '--delimiter=;'],
         ['for CSV and TSV files', 'read as jsonl', 'leave out --delimiter']),
        ('delimiter with txt', ['convert', d / 'ok.txt', d / 'o15.parquet', '--delimiter=\\t'],
         ['for CSV and TSV files', 'read as txt']),
    ]
    assert_one_line_errors(tmp_path, cases)


def test_a_delimited_file_without_rows_says_so_whatever_its_last_line_ends_with(tmp_path):
    """A header alone, with or without a final line end (pyarrow called the latter an empty file
    it could not read), and files with no text at all: "no rows to convert", one line, nothing
    written; a header alone still has its columns checked."""
    d = tmp_path
    files = {'header.csv': b'prompt,response', 'header_lf.csv': b'prompt,response\n', 'header.tsv': b'prompt\tresponse',
             'header_cr.tsv': b'prompt\tresponse\r\r', 'header_crlf_blank.csv': b'\r\nprompt,response\r\n\r\n \r\n',
             'bom_header.csv': b'\xef\xbb\xbfprompt,response', 'quoted_header.csv': b'"prompt","response"',
             'empty.csv': b'', 'bom.csv': b'\xef\xbb\xbf', 'blank_lines.tsv': b'\n\n\r\n', 'spaces.csv': b' \n\t\n',
             'text_header.csv': b'id,text', 'other_header.csv': b'a,b'}
    for name, data in files.items():
        (d / name).write_bytes(data)
    cases = [(name, ['convert', d / name, d / f'{name}.parquet'],
              [f'{d / name}: no rows to convert; nothing written to {d / name}.parquet'])
             for name in files if name != 'other_header.csv']
    for name, data in {'open_quote_header.csv': b'prompt,"response\n', 'open_quote_first.csv': b'"prompt,response',
                       'open_quote_header.tsv': b'prompt\t"response\r\n\r\n'}.items():  # read as closed at its line's end
        (d / name).write_bytes(data)
        cases.append((name, ['convert', d / name, d / f'{name}.parquet'],
                      [f'{d / name}: line 1: a quote (") opened there is never closed']))
    (d / 'two_line_header.csv').write_bytes(b'"prompt\nx",response')  # a quoted header over two lines, no line end
    (d / 'tab_row.tsv').write_bytes(b'prompt\tresponse\n\t\n')  # a row of empty values is a row, as `,` in a CSV
    (d / 'comma_row.csv').write_bytes(b'prompt,response\n,\n')
    cases += [('two-line header', ['convert', d / 'two_line_header.csv', d / 'o.parquet'],
               ["missing column 'prompt' (has: 'prompt\\nx', 'response')"])]
    (d / 'quoted_empty_row.csv').write_bytes(b'prompt,response\n""\n')  # a row, of one empty value
    cases += [(name, ['convert', d / name, d / 'o.parquet'], ['its one row lacks text in a column'])
              for name in ('tab_row.tsv', 'comma_row.csv')]
    cases += [('quoted empty row', ['convert', d / 'quoted_empty_row.csv', d / 'o.parquet'],
               ['line 2: a row of 1 field(s), where the header has 2'])]
    cases += [('header, columns missing', ['convert', d / 'other_header.csv', d / 'o.parquet'], ["missing column 'prompt'"]),
              ('header, --text_col missing', ['convert', d / 'header.csv', d / 'o.parquet', '--text_col=body'],
               ["missing column 'body'"])]
    assert_one_line_errors(tmp_path, cases)
    # a byte of another encoding in a column convert does not read, in the first rows: pyarrow's to meet, as anywhere
    (d / 'latin_unused.csv').write_bytes(b'prompt,response,notes\nhello,world,caf\xe9\nfoo,bar,ok\n')
    proc = run_forked('convert', d / 'latin_unused.csv', d / 'latin.parquet')
    assert proc.returncode == 0 and 'wrote 2 rows' in proc.stdout, proc.stderr


def test_counts_and_formats_read_as_a_user_reads_them(tmp_path, monkeypatch):
    """One row is "1 row"; a file read as TSV or with --delimiter is not called a CSV; the names a
    header holds are quoted, so one read as a single column shows as one."""
    (tmp_path / 'one.csv').write_text('prompt,response\n问,答\n', encoding='utf-8')
    proc = run_forked('convert', tmp_path / 'one.csv', tmp_path / 'one.parquet')
    assert proc.returncode == 0 and f'wrote 1 row to {tmp_path / "one.parquet"} (' in proc.stdout, proc.stdout
    proc = run_forked('clean', tmp_path / 'one.parquet', tmp_path / 'clean.parquet')
    assert proc.returncode == 0 and 'read 1 row;' in proc.stdout and 'kept 1 row ->' in proc.stdout, proc.stdout
    proc = run_forked('split', tmp_path / 'one.parquet', f'--train_out={tmp_path / "t.parquet"}',
                      f'--valid_out={tmp_path / "v.parquet"}')
    assert proc.returncode == 2 and '1 row; a split needs at least 2' in proc.stderr, proc.stderr
    (tmp_path / 'fw.csv').write_text('prompt，response\n问，答\n', encoding='utf-8')
    proc = run_forked('convert', tmp_path / 'fw.csv', tmp_path / 'fw.parquet')
    assert proc.returncode == 2 and "missing column 'prompt' (has: 'prompt，response')" in proc.stderr, proc.stderr
    (tmp_path / 'ab.csv').write_text('a,b\n1,2\n', encoding='utf-8')
    proc = run_forked('convert', tmp_path / 'ab.csv', tmp_path / 'ab.parquet')
    assert proc.returncode == 2 and "missing column 'prompt' (has: 'a', 'b')" in proc.stderr, proc.stderr
    # what pyarrow refuses and Python's csv finds no fault in: said as the format it was read as
    monkeypatch.setattr(prep_readers, '_csv_bad_row', lambda *args: None)
    for name, delimiter, said in (('bad.tsv', None, 'not a readable TSV (Expected 2 columns, got 3'),
                                  ('bad.csv', ';', 'not a readable semicolon-separated file (Expected 2 columns'),
                                  ('bad2.csv', None, 'not a readable CSV (Expected 2 columns')):
        sep = delimiter or ('\t' if name.endswith('.tsv') else ',')
        (tmp_path / name).write_text(f'prompt{sep}response\n1{sep}2{sep}3\n', encoding='utf-8')
        with pytest.raises(UserError, match=re.escape(said)):
            prep_ops.convert_file(str(tmp_path / name), str(tmp_path / 'out.parquet'), delimiter=delimiter)


def test_a_quote_left_open_is_found_with_the_files_delimiter(tmp_path):
    """_quote_fault: a quote opens a value after the file's delimiter, not after a comma."""

    def left_open(text, delimiter):
        (tmp_path / 'f.tsv').write_bytes(text.encode('utf-8'))
        return quote_left_open(str(tmp_path / 'f.tsv'), delimiter)

    assert left_open('a\tb\n1\t"open\n2\tc\n', '\t') == 2 and left_open('a\tb\n1\t"open\n2\tc\n', ',') is None
    assert left_open('a\tb\n1,"x\t2\n', '\t') is None and left_open('a;b\r\n1;"x;y"\r\n2;"z\r\n', ';') == 3


def test_rows_merged_into_one_value_by_a_stray_quote_are_noted_and_kept(tmp_path):
    # a quote opened by mistake in row 1, closed only by a stray quote in row 4: valid CSV (pyarrow reads the rows
    # between as one value), so not refused -- but said, with the row; a value that really has lines is not
    for name, delimiter, text in (
            ('stray.csv', ',', 'id,body\n1,"opened here\n2,plain two\n3,plain three\n4,closed here"\n5,after\n'),
            ('stray.tsv', '\t', 'id\tbody\n1\t"opened\r\n2\ttwo\r\n3\tthree\r\n4\tclosed"\r\n5\tafter\r\n')):
        (tmp_path / name).write_text(text, encoding='utf-8', newline='')
        proc = run_forked('convert', tmp_path / name, tmp_path / f'{name}.parquet', '--text_col=body')
        assert proc.returncode == 0 and 'wrote 2 rows' in proc.stdout, proc.stderr
        assert "note: data row 1's 'body' holds 3 lines that read as whole rows of this file: a quote" in proc.stdout
        assert pq.read_table(tmp_path / f'{name}.parquet').num_rows == 2  # kept as read
    pairs = [('多行问题\n第二行\n第三行', '答案'), ('一行', '一，二，三\n四，五\n六'), ('表格', '列\n1,2\n')]
    write_source(tmp_path / 'fine.csv', pairs * 3, 'csv')
    proc = run_forked('convert', tmp_path / 'fine.csv', tmp_path / 'fine.parquet', '--prompt_col=question',
                   '--response_col=answer')
    assert proc.returncode == 0 and 'note:' not in proc.stdout, proc.stdout  # one row-like line: not said
    assert prep_readers.rows_in_value('a\n1,2\n3,4', 2, ',') == 2 and prep_readers.rows_in_value('a\n1,2', 1, ',') == 0
    assert prep_readers.rows_in_value('a\n"1",2\n3,4,5', 2, ',') == 0
    # many such values: the first named, the rest counted
    many = 'id,body\n' + ''.join(f'{i},"x\n{i}a,b\n{i}c,d"\n' for i in range(1, 6))
    (tmp_path / 'many.csv').write_text(many, encoding='utf-8')
    proc = run_forked('convert', tmp_path / 'many.csv', tmp_path / 'many.parquet', '--text_col=body')
    assert "note: data row 1's 'body' holds 2 lines that read as whole rows of this file (and 4 more value(s) like " \
           "it)" in proc.stdout, proc.stdout


def test_a_record_without_the_field_the_others_have_is_named_with_its_own_fix(tmp_path):
    # the first record without it: a field named wrong (the flags fix it); a later one: that record lacks it
    cases = {'later.jsonl': ('{"text": "一"}\n{"text": null}\n{"body": "二"}\n', [],
                             ["line 3: record has no field 'text' (has: 'body') while the records before it have it",
                              'give this record the field too (a null value is kept']),
             'later.json': ('[{"prompt": "问", "response": "答"}, {"prompt": "问二"}]', [],
                            ["record has no field 'response' (has: 'prompt') while the records before it have it"]),
             'first.jsonl': ('{"body": "二"}\n{"text": "一"}\n', ['--text_col=text'],
                             ["line 1: record has no field 'text' (has: 'body'); pass --text_col="])}
    for name, (text, flags, said) in cases.items():
        (tmp_path / name).write_text(text, encoding='utf-8')
        proc = run_forked('convert', tmp_path / name, tmp_path / f'{name}.parquet', *flags)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and all(s in lines[0] for s in said), (name, proc.stderr)
        assert 'while the records before' not in lines[0] or name != 'first.jsonl'
        assert not (tmp_path / f'{name}.parquet').exists()


def test_a_quoted_value_with_text_after_its_closing_quote_is_refused_and_quoting_none_keeps_quotes(tmp_path):
    # pyarrow reads "好"的意思 as 好的意思 without a word (CSV quoting): refused with its line, and --quoting=none
    # (a file that does not quote its values, as most TSV exports) reads every quote as text
    cases = {'lead.tsv': 'prompt\tresponse\n问一\t答一\n"好"的意思\t回答\n',
             'resp.tsv': 'prompt\tresponse\n问\t"答"很好\n',
             'lead.csv': 'prompt,response\n"他说""好""",没问题\n"好"的,回答\n'}
    for name, text in cases.items():
        (tmp_path / name).write_text(text, encoding='utf-8')
        proc = run_forked('convert', tmp_path / name, tmp_path / f'{name}.parquet')
        lines = proc.stderr.strip().splitlines()
        line = 3 if name != 'resp.tsv' else 2
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(
            f'error: {tmp_path / name}: line {line}: a value starts with a quote (") and goes on after its closing '
            f'quote ("') and 'pass --quoting=none' in lines[0], (name, proc.stderr)
        assert not (tmp_path / f'{name}.parquet').exists()
    proc = run_forked('convert', tmp_path / 'lead.tsv', tmp_path / 'none.parquet', '--quoting=none')
    assert proc.returncode == 0, proc.stderr
    assert read_pairs(tmp_path / 'none.parquet') == [('问一', '答一'), ('"好"的意思', '回答')]
    # quoted as CSV writes it: read as ever (quotes doubled inside, a line break inside)
    (tmp_path / 'ok.csv').write_text('prompt,response\n"他说""好""",x\n"两\n行",y\n', encoding='utf-8')
    proc = run_forked('convert', tmp_path / 'ok.csv', tmp_path / 'ok.parquet')
    assert proc.returncode == 0 and read_pairs(tmp_path / 'ok.parquet') == [('他说"好"', 'x'), ('两\n行', 'y')]
    (tmp_path / 'unquoted.tsv').write_text('a\tb\n"x\ty\tz\n', encoding='utf-8')
    for args, said in ((('--quoting=none', '--prompt_col=a', '--response_col=b'),
                        'line 2: a row of 3 field(s), where the header has 2 (a tab in a value? --quoting=none'),
                       (('--quoting=maybe', '--prompt_col=a', '--response_col=b'), '--quoting=maybe: choose csv')):
        proc = run_forked('convert', tmp_path / 'unquoted.tsv', tmp_path / 'u.parquet', *args)
        assert proc.returncode == 2 and said in proc.stderr, proc.stderr
    (tmp_path / 'a.jsonl').write_text('{"prompt": "p", "response": "r"}\n', encoding='utf-8')
    proc = run_forked('convert', tmp_path / 'a.jsonl', tmp_path / 'j.parquet', '--quoting=none')
    assert proc.returncode == 2 and 'is for CSV and TSV files' in proc.stderr, proc.stderr
