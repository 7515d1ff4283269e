"""prepare_data.py on raw text (one `text` column): convert from every format and from .txt (one
document a line), clean / split / check on text files, and the mistakes as one line."""

from __future__ import annotations

import codecs
import collections
import gzip
import json
import os
import shlex
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import assert_user_error, make_texts, run_parallel, snapshot, write_parquet, write_records
from model.data import read_guard
from model.data.files import inspect_parquet
from model.errors import UserError
from model.prep.ops import build_report, clean_parquet, convert_file, convert_to_parquet, format_report, split_parquet
from model.prep.output import TEXT_OUTPUT_SCHEMA

PY = 'prepare_data.py'


def chinese_texts(n: int, seed: int = 0) -> list[str]:
    return [p + '。' + r for p, r in make_texts(n, seed=seed)]


def read_texts(path) -> list[str]:
    table = pq.read_table(path)
    assert table.schema == TEXT_OUTPUT_SCHEMA
    assert inspect_parquet(str(path)).kind == 'text'
    return table.column('text').to_pylist()


def write_text_source(path, texts, fmt: str, key: str = 'content') -> str:
    """texts under `key`, with an extra column convert must drop."""
    records = [{'id': i, key: t} for i, t in enumerate(texts)]
    return write_records(path, records, fmt)


def write_text_parquet(path, texts, row_group_size=None) -> str:
    pq.write_table(pa.table({'text': pa.array(texts, pa.string())}), str(path), row_group_size=row_group_size)
    return str(path)


# --- convert ----------------------------------------------------------------


@pytest.mark.parametrize('fmt', ['csv', 'json', 'jsonl', 'parquet'])
def test_each_format_converts_to_text_with_text_col(tmp_path, fmt):
    texts = chinese_texts(200, seed=1)
    texts[3] = '多行\n文本，带"引号"\n第三行'  # newlines and quotes survive CSV and JSON
    src = write_text_source(tmp_path / f'src.{fmt}', texts, fmt)
    result = convert_file(src, str(tmp_path / 'out.parquet'), text_col='content')
    assert (result.rows, result.kind) == (200, 'text')
    assert read_texts(tmp_path / 'out.parquet') == texts


@pytest.mark.parametrize('fmt', ['csv', 'json', 'jsonl', 'parquet'])
def test_without_flags_a_text_column_is_text_and_prompt_response_stay_pairs(tmp_path, fmt):
    texts = chinese_texts(30, seed=2)
    src = write_text_source(tmp_path / f'text.{fmt}', texts, fmt, key='text')
    assert convert_file(src, str(tmp_path / 'a.parquet')).kind == 'text'
    assert read_texts(tmp_path / 'a.parquet') == texts
    both = [{'text': t, 'prompt': t[:3], 'response': t[3:]} for t in texts]  # pairs win, as in files.kind_of
    src = str(tmp_path / f'both.{fmt}')
    if fmt == 'parquet':
        pq.write_table(pa.Table.from_pylist(both), src)
    elif fmt == 'csv':
        import pyarrow.csv as pcsv
        pcsv.write_csv(pa.Table.from_pylist(both), src)
    else:
        with open(src, 'w', encoding='utf-8') as f:
            if fmt == 'json':
                json.dump(both, f, ensure_ascii=False)
            else:
                f.writelines(json.dumps(r, ensure_ascii=False) + '\n' for r in both)
    assert convert_file(src, str(tmp_path / 'b.parquet')).kind == 'pairs'
    assert inspect_parquet(str(tmp_path / 'b.parquet')).kind == 'pairs'


def test_pandas_json_layouts_of_a_text_column(tmp_path):
    import pandas as pd

    texts = chinese_texts(20, seed=3)
    for orient in ('columns', 'split', 'index', 'records', 'table'):
        src = tmp_path / f'{orient}.json'
        pd.DataFrame({'text': texts}).to_json(src, orient=orient, force_ascii=False)
        out = tmp_path / f'{orient}.parquet'
        assert convert_to_parquet(str(src), str(out)) == 20, orient
        assert read_texts(out) == texts, orient
    pd.DataFrame({'text': texts}).to_json(tmp_path / 'values.json', orient='values', force_ascii=False)
    with pytest.raises(UserError, match=r'element 1 of the list .* or --text_col=0 \(raw text\)'):
        convert_to_parquet(str(tmp_path / 'values.json'), str(tmp_path / 'values.parquet'))
    assert convert_to_parquet(str(tmp_path / 'values.json'), str(tmp_path / 'values.parquet'), text_col='0') == 20
    assert read_texts(tmp_path / 'values.parquet') == texts


def test_a_text_field_of_numbers_only_is_a_field_named_wrong(tmp_path):
    """--text_col=id (a number a record) made a corpus of numbers, rc 0: refused, naming the other
    fields. A text field that also holds a number here and there converts (the numbers as text)."""
    import pandas as pd

    frame = pd.DataFrame({'content': ['甲文', '乙文', '丙文'], 'n': [1, 2, 3], 'ok': [True, False, True]})
    for name, orient in (('r.json', 'records'), ('c.json', 'columns')):
        frame.to_json(tmp_path / name, orient=orient, force_ascii=False)
    frame.to_json(tmp_path / 'r.jsonl', orient='records', lines=True, force_ascii=False)
    for name in ('r.json', 'c.json', 'r.jsonl'):
        for col in ('n', 'ok'):
            with pytest.raises(UserError, match=rf"field '{col}' holds numbers or true/false, not text .*every one of "
                                                rf"the first 3 records") as e:
                convert_to_parquet(str(tmp_path / name), str(tmp_path / 'out.parquet'), text_col=col)
            assert name == 'c.json' or 'the records also have: content' in str(e.value)  # a row's other fields
        assert not (tmp_path / 'out.parquet').exists()
    write_records(tmp_path / 'mixed.jsonl', [{'t': '一篇'}, {'t': 305}, {'t': True}], 'jsonl')
    assert convert_to_parquet(str(tmp_path / 'mixed.jsonl'), str(tmp_path / 'out.parquet'), text_col='t') == 3
    assert read_texts(tmp_path / 'out.parquet') == ['一篇', '305', 'true']


def test_a_txt_of_carriage_returns_alone_is_refused_not_read_as_one_document(tmp_path):
    import subprocess

    (tmp_path / 'mac.txt').write_bytes('第一篇\r第二篇\r第三篇\r'.encode())
    with pytest.raises(UserError, match=r'mac\.txt: line 1 holds line breaks of a carriage return alone') as e:
        convert_to_parquet(str(tmp_path / 'mac.txt'), str(tmp_path / 'out.parquet'))
    fix = str(e.value).split('e.g. ')[1]
    subprocess.run(fix, shell=True, check=True)  # the command it gives works
    assert convert_to_parquet(str(tmp_path / 'mac.lf.txt'), str(tmp_path / 'out.parquet')) == 3
    (tmp_path / 'dos.txt').write_bytes('第一篇\r\n第二篇\r\n'.encode())  # CRLF: two documents, as ever
    assert convert_to_parquet(str(tmp_path / 'dos.txt'), str(tmp_path / 'out2.parquet')) == 2


def test_a_malformed_jsonl_line_is_named_at_its_column(tmp_path):
    (tmp_path / 'cut.jsonl').write_text('{"t": "好"}\n{"t": "bad"\n', encoding='utf-8')
    (tmp_path / 'colon.jsonl').write_text('{"t": "好"}\r\n{"t" "x"}\r\n', encoding='utf-8')
    with pytest.raises(UserError, match=r"line 2: malformed JSON \(the line ends before its JSON does: Expecting ',' "
                                        r"delimiter after column 11\)"):
        convert_to_parquet(str(tmp_path / 'cut.jsonl'), str(tmp_path / 'out.parquet'), text_col='t')
    with pytest.raises(UserError, match=r"line 2: malformed JSON \(Expecting ':' delimiter at column 6\)"):
        convert_to_parquet(str(tmp_path / 'colon.jsonl'), str(tmp_path / 'out.parquet'), text_col='t')


def test_txt_one_document_a_line_blank_lines_skipped_and_counted(tmp_path):
    src = tmp_path / 'corpus.txt'
    lines = ['第一篇：今天天气很好。', '', '  第二篇，前后有空格  ', ' \t', '\u3000\u3000', '第三篇 GPU T5', '第一篇：今天天气很好。']
    # a BOM, CRLF and LF mixed, no newline at the end
    src.write_bytes(b'\xef\xbb\xbf' + '\r\n'.join(lines[:4]).encode() + b'\n' + '\n'.join(lines[4:]).encode())
    result = convert_file(str(src), str(tmp_path / 'out.parquet'))
    assert (result.rows, result.kind, result.blank_lines) == (4, 'text', 3)
    assert read_texts(tmp_path / 'out.parquet') == [lines[0], lines[2], lines[5], lines[6]]


@pytest.mark.parametrize('name,content,needle', [
    ('empty.txt', b'', 'no rows to convert;'),
    ('blank.txt', b'\n \r\n\t\n', r'no rows to convert \(3 blank line\(s\) skipped\)'),
    ('empty.jsonl', b'\n\n', r'no rows to convert \(2 blank line\(s\) skipped\)'),
    ('header.csv', b'prompt,response\n', 'no rows to convert'),
    ('zero.csv', b'', 'no rows to convert'),
    ('empty.json', b'[]', 'no rows to convert'),
    ('blank.json', b' \n', 'no rows to convert'),
    ('spaces.csv', b'prompt,response\n" ","\t"\n,\n', 'none of its 2 rows has text in every column'),
    ('half.jsonl', b'{"prompt": "a", "response": " "}\n', 'its one row lacks text in a column'),
])
def test_an_input_without_rows_is_refused_and_nothing_written(tmp_path, name, content, needle):
    # an empty training file would only fail later, at train time, far from its cause
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=needle + '.*nothing written to'):
        convert_file(str(tmp_path / name), str(tmp_path / 'new' / 'sub' / 'out.parquet'))
    assert os.listdir(tmp_path) == [name]  # not even the folders it would have gone into
    # a file this toolkit wrote before stays as it was
    write_records(tmp_path / 'ok.jsonl', [{'text': '一篇'}], 'jsonl')
    convert_file(str(tmp_path / 'ok.jsonl'), str(tmp_path / 'out.parquet'))
    with pytest.raises(UserError, match=needle):
        convert_file(str(tmp_path / name), str(tmp_path / 'out.parquet'))
    assert read_texts(tmp_path / 'out.parquet') == ['一篇']


def test_txt_streams_in_batches(tmp_path, monkeypatch):
    from model.prep import output as prep_output, readers as prep_readers

    monkeypatch.setattr(prep_readers, 'BATCH_ROWS', 64)
    monkeypatch.setattr(prep_output, 'ROW_GROUP_ROWS', 100)
    texts = chinese_texts(450, seed=4)
    (tmp_path / 'c.txt').write_text('\n'.join(texts) + '\n', encoding='utf-8')
    assert convert_to_parquet(str(tmp_path / 'c.txt'), str(tmp_path / 'c.parquet')) == 450
    md = pq.ParquetFile(tmp_path / 'c.parquet').metadata
    assert [md.row_group(i).num_rows for i in range(md.num_row_groups)] == [100, 100, 100, 100, 50]
    assert read_texts(tmp_path / 'c.parquet') == texts


def test_txt_line_over_the_record_limit_is_refused_unheld(tmp_path, monkeypatch):
    import tracemalloc

    monkeypatch.setattr(read_guard, 'MAX_RECORD_BYTES', 64 << 10)
    src = tmp_path / 'big.txt'
    src.write_text('短\n\n' + '长' * (3 << 20) + '\n短\n', encoding='utf-8')  # line 3: 9 MiB
    tracemalloc.start()
    try:
        with pytest.raises(UserError, match=r'big\.txt: line 3 is longer than 64 KiB \(read_guard\.MAX_RECORD_BYTES\)'):
            convert_to_parquet(str(src), str(tmp_path / 'out.parquet'))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak
    assert not (tmp_path / 'out.parquet').exists()


def parquet_bytes() -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({'text': ['中文']}), sink)
    return sink.getvalue().to_pybytes()


def rows(encoding: str) -> list[bytes]:
    texts = ['今天天气很好，我们一起去公园散步吧。', '请问这个问题应该怎么解决？', '机器学习是人工智能的一个重要分支。']
    return [f'{texts[i % 3]},{texts[(i + 1) % 3]}\n'.encode(encoding) for i in range(20)]


def test_txt_not_utf8_and_jsonl_saved_as_txt_are_one_line(tmp_path):
    (tmp_path / 'gbk.txt').write_bytes('第一行\n'.encode() + '第二行'.encode('gbk') + b'\n')
    with pytest.raises(UserError, match=r'gbk\.txt: line 2: byte 0x\w+ at offset 10 is not UTF-8'):
        convert_to_parquet(str(tmp_path / 'gbk.txt'), str(tmp_path / 'out.parquet'))
    # the hint follows the file: iconv of the whole file only where the whole file reads as GBK
    cases = {'late.txt': ('好\n' * 1000).encode() + '坏'.encode('gbk') + b'\n',  # UTF-8 text, then one line not
             'all_gbk.txt': '第一行\n第二行\n'.encode('gbk'),
             'stray.txt': b'\xff abc\n',  # 0xff is in no GBK character; UTF-8 after it: a stray byte
             'gb18030.txt': '第一行\n表情 😀 䶮\n'.encode('gb18030'),  # four-byte characters: GBK's superset
             'big5.txt': '這是一個測試的資料\n第二行\n'.encode('big5'),  # reads as GB18030 only into private use
             # a GBK file holding characters of GBK's user-defined area (Python reads them as private use)
             'gbk with private use.txt': ('这是一个测试\ue19b的资料\n' * 3).encode('gb18030'),
             'hkscs.txt': '香港的資料\n\u4f60\u54cb好\n'.encode('big5hkscs'),  # 咋: in HKSCS, not in Big5
             'sjis.txt': 'これは日本語のテキストです。東京都に住んでいます。\n'.encode('shift_jis'),
             'gbk line in utf8.txt': ('好\n' * 10).encode() + '這是一個測試'.encode('big5') + b'\n',
             'packed.txt': gzip.compress('第一行\n'.encode()),
             'packed.jsonl': gzip.compress(b'{"text": "x"}\n'),  # not "malformed JSON"
             'parquet.csv': parquet_bytes(),  # not "a CSV parse error"
             'latin1.txt': 'caf\xe9 au lait, cr\xe8me br\xfbl\xe9e\n'.encode('latin-1'),
             # GBK whose first character reads as UTF-8 (台 = CC A8, a two-byte UTF-8 character): still the file's
             'tw.txt': ('台湾是一个美丽的地方。\n' + '今天天气很好，我们一起去公园散步吧。\n' * 30).encode('gbk'),
             'bom gbk.txt': codecs.BOM_UTF8 + ('今天天气很好，我们一起去公园散步吧。\n' * 30).encode('gbk'),
             'traditional gbk.txt': ('經濟發展與環境保護問題讓當局頭疼，議員們認為應該儘快調查。\n' * 20).encode('gbk'),
             'gbk then utf8.txt': '今天天气很好，散步吧。\n'.encode('gbk') + '今天天气很好，散步吧。\n'.encode() * 20,
             'big5 past 1 MiB.txt': '今天天气很好。\n'.encode() * 50_000 + '這是一個測試的資料\n'.encode('big5'),
             'cp936.csv': ('商品,价格\r\n' + '商品,\x80 5\r\n' * 30).replace('\x80', 'EUR').encode('gbk').replace(
                 b'EUR', b'\x80'),  # CP936's euro sign: GB18030 stops at it
             'cp932.txt': 'これは①②③のテストです。\n'.encode('cp932') * 10,
             'two readings.txt': '謝謝\n'.encode('big5'),  # reads as GBK (谅谅) and as Big5 alike: both named
             'random.txt': bytes(range(256)) * 20,
             'program.txt': b'\x7fELF\x02\x01\x01' + bytes(200),
             'sheet.csv': b'\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1' + bytes(500),  # an old .xls
             # a GBK file with a damaged byte, a field cut inside a character: still a GBK file
             'damaged gbk.csv': b'prompt,response\n' + b''.join(rows('gbk')[:9]) + b'\xff' + b''.join(rows('gbk')[9:]),
             'cut utf8.csv': b'prompt,response\n' + b''.join(rows('utf-8')[:8]) + '机器学习'.encode()[:4] + b',ok\n'
                             + b''.join(rows('utf-8')[8:]),  # a character cut inside a UTF-8 line: not GBK
             'quotes.csv': b'prompt,response\n' + b''.join(rows('utf-8')[:7]) + '他说'.encode() + b'\x93hi\x94,' +
                           '好\n'.encode() + b''.join(rows('utf-8')[7:]),  # Windows' quotes in a UTF-8 line
             'utf8 then gbk.csv': b'prompt,response\n' + b''.join(rows('utf-8')[:5]) + b''.join(rows('gbk')[5:]),
             'bom header gbk.csv': codecs.BOM_UTF8 + b'prompt,response\n' + b''.join(rows('gbk')),
             'emoji.csv': ('prompt,response\n' + '哈哈😂😂,赞🎉🎉\n' * 10).encode('gb18030'),
             'one char then gbk.csv': 'prompt,response\n问,ok\n'.encode() + rows('gbk')[0] + b'hello,world\n' * 5,
             'utf32le.txt': '这是一行中文文本，一二三。\n'.encode('utf-32-le') * 5,
             'utf32be.txt': 'plain English text\n'.encode('utf-32-be') * 5,
             'utf16le.txt': '这是一行中文文本，一二三。\n'.encode('utf-16-le') * 5,  # no byte-order mark
             'utf16be.txt': 'plain English text\n'.encode('utf-16-be') * 5,
             'with nuls.txt': ('好' * 100 + '\n').encode() + b'ab\x00cd\x00ef\x00gh\x00\n',  # UTF-8: converts
             'letters with a nul.txt': (b'acgtacgtta' * 7 + b'\n') * 28 + b'ac\x00gt\n',  # as UTF-16: CJK; UTF-8 it is
             'utf16 bom.txt': '\ufeff第一行\n'.encode('utf-16-le')}
    said = {}
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        if 'nul' in name:
            convert_to_parquet(str(tmp_path / name), str(tmp_path / f'{name}.parquet'))
            continue
        with pytest.raises(UserError) as e:
            convert_to_parquet(str(tmp_path / name), str(tmp_path / 'out.parquet'))
        said[name] = str(e.value)
    assert 'line 1001' in said['late.txt'] and 'though the text around it is' in said['late.txt']
    # GB18030 converts GBK files too (its superset), and a GBK file with one four-byte character in it;
    # one character reads as GBK and as Big5 alike: both named
    see = f"sed -n '1001p' {tmp_path / 'late.txt'}"
    assert f'{see} | iconv -f GB18030 -t UTF-8, or {see} | iconv -f BIG5 -t UTF-8)' in said['late.txt']
    assert 'file?' not in said['late.txt']
    for name in ('all_gbk.txt', 'gb18030.txt'):
        assert 'a GBK / GB18030 file?' in said[name] and 'iconv -f GB18030 -t UTF-8' in said[name], said[name]
    assert 'a stray byte or a damaged (cut) character' in said['stray.txt'] and 'iconv' not in said['stray.txt']
    # the encoding whose reading holds everyday characters, of those the file decodes in
    for name, label, iconv in (('big5.txt', 'Big5', 'BIG5'), ('gbk with private use.txt', 'GBK / GB18030', 'GB18030'),
                               ('hkscs.txt', 'Big5-HKSCS', 'BIG5-HKSCS'), ('sjis.txt', 'Shift-JIS', 'SHIFT_JIS')):
        assert f'(a {label} file?)' in said[name] and f'iconv -f {iconv} -t UTF-8' in said[name], said[name]
    assert "(Big5?) or damaged" in said['gbk line in utf8.txt'], said['gbk line in utf8.txt']
    assert "| iconv -f BIG5 -t UTF-8" in said['gbk line in utf8.txt'], said['gbk line in utf8.txt']
    for name in ('packed.txt', 'packed.jsonl'):
        assert 'the file is gzip-compressed, not text; unpack it first' in said[name], said[name]
    assert 'the file is Parquet, not text; give it a name ending in .parquet' in said['parquet.csv']
    assert 'nor GBK / GB18030, Big5 or Shift-JIS / EUC-JP' in said['latin1.txt'], said['latin1.txt']
    def quoted(name):  # noqa: E306
        return shlex.quote(str(tmp_path / name))

    def utf8(name):  # noqa: E306
        return shlex.quote(str(tmp_path / name.replace('.', '.utf8.')))

    for name, label, command in (
            ('tw.txt', 'GBK / GB18030', f'iconv -f GB18030 -t UTF-8 {quoted("tw.txt")} > {utf8("tw.txt")}'),
            ('bom gbk.txt', 'GBK / GB18030 file behind a UTF-8 byte-order mark',
             f'tail -c +4 {quoted("bom gbk.txt")} | iconv -f GB18030 -t UTF-8 > {utf8("bom gbk.txt")}'),
            ('traditional gbk.txt', 'GBK / GB18030', 'iconv -f GB18030 -t UTF-8'),
            ('cp936.csv', 'GBK (Windows CP936)', 'iconv -f CP936 -t UTF-8'),
            ('cp932.txt', 'Shift-JIS (Windows CP932)', 'iconv -f CP932 -t UTF-8'),
            ('two readings.txt', 'GBK / GB18030 or Big5',
             f'iconv -f GB18030 -t UTF-8 {quoted("two readings.txt")} > {utf8("two readings.txt")}; if that reads '
             f'wrong: iconv -f BIG5 -t UTF-8 {quoted("two readings.txt")} > {utf8("two readings.txt")}')):
        assert f'(a {label}' in said[name] and command in said[name], said[name]
        if name != 'two readings.txt':
            assert 'line 1' in said[name] and 'that line' not in said[name], said[name]
    # one line of another encoding among UTF-8 text: that line, wherever it is (its encoding read from it)
    assert "line 1: byte 0xbd at offset 0 is not UTF-8, though the text around it is" in said['gbk then utf8.txt']
    assert f"sed -n '1p' {quoted('gbk then utf8.txt')} | iconv -f GB18030 -t UTF-8" in said['gbk then utf8.txt']
    assert f"sed -n '50001p' {quoted('big5 past 1 MiB.txt')} | iconv -f BIG5 -t UTF-8" in said['big5 past 1 MiB.txt']
    for name, label in (('damaged gbk.csv', 'GBK / GB18030'), ('emoji.csv', 'GBK / GB18030')):
        assert f'(a {label} file?)' in said[name], said[name]
    assert 'with damaged bytes that read in no encoding (1 in the part read' in said['damaged gbk.csv']
    assert 'e.g. iconv -c -f GB18030 -t UTF-8' in said['damaged gbk.csv'] and ' -c ' not in said['emoji.csv']
    assert 'tail -c +4 ' in said['bom header gbk.csv'] and 'behind a UTF-8 byte-order mark' in said['bom header gbk.csv']
    assert 'line 10: byte 0xe5' in said['cut utf8.csv'] and 'a stray byte or a damaged (cut) character' in said['cut utf8.csv']
    assert 'line 9: byte 0x93' in said['quotes.csv'] and 'Windows quotes' in said['quotes.csv'], said['quotes.csv']
    assert 'line 3' in said['one char then gbk.csv'] and 'that line is in another encoding (GBK / GB18030?)' in said[
        'one char then gbk.csv']
    # UTF-8, then another encoding from a line on (two files put together): the command converts that part
    said_cat = said['utf8 then gbk.csv']
    assert 'line 7: byte 0xbb at offset' in said_cat and 'the lines before it are UTF-8, the text from it on is not (GBK' \
        in said_cat, said_cat
    command = said_cat[said_cat.index('e.g. ') + 5:]
    done = subprocess.run(['bash', '-c', command], capture_output=True, text=True)
    assert done.returncode == 0, (command, done.stderr)
    convert_to_parquet(str(tmp_path / 'utf8 then gbk.utf8.csv'), str(tmp_path / 'cat.parquet'))
    assert [r['prompt'] for r in pq.read_table(tmp_path / 'cat.parquet').to_pylist()] == [
        r.decode('gbk').split(',')[0] for r in rows('gbk')]
    assert 'random.txt: not a text file (' in said['random.txt'], said['random.txt']
    assert 'the file is a program (ELF), not text' in said['program.txt']
    assert 'an Office document (.xls / .doc), not text; save it as CSV UTF-8' in said['sheet.csv']
    assert 'iconv -f <ENCODING> -t UTF-8' in said['latin1.txt'], said['latin1.txt']
    for name, order in (('utf16le.txt', 'UTF-16LE'), ('utf16be.txt', 'UTF-16BE'), ('utf32le.txt', 'UTF-32LE'),
                        ('utf32be.txt', 'UTF-32BE')):
        assert f'is {order} without a byte-order mark' in said[name] and f'iconv -f {order} -t UTF-8' in said[name]
    quoted = f"'{tmp_path / 'utf16 bom.txt'}' > '{tmp_path / 'utf16 bom.utf8.txt'}'"  # a command that runs as shown
    assert 'UTF-16 byte-order mark' in said['utf16 bom.txt'] and quoted in said['utf16 bom.txt'], said['utf16 bom.txt']
    assert not (tmp_path / 'out.parquet').exists()
    (tmp_path / 'lines.txt').write_text('\n{"prompt": "问", "response": "答"}\n', encoding='utf-8')
    with pytest.raises(UserError, match=r'lines\.txt: line 2 is a JSON object.*--format=jsonl'):
        convert_to_parquet(str(tmp_path / 'lines.txt'), str(tmp_path / 'out.parquet'))
    assert convert_file(str(tmp_path / 'lines.txt'), str(tmp_path / 'out.parquet'), input_format='txt').kind == 'text'
    assert convert_file(str(tmp_path / 'lines.txt'), str(tmp_path / 'p.parquet'), input_format='jsonl').kind == 'pairs'


def test_the_encoding_hint_looks_past_its_window_and_long_lines(tmp_path):
    """UTF-8 again past the lines judged one by one: mixed, not two files put together; a line too
    long to show: shown from the bad byte; line 1 behind a byte-order mark: shown without it."""
    utf8 = '今天天气很好，我们一起去公园散步吧。\n'.encode()
    gbk = '机器学习是人工智能的一个重要分支。\n'.encode('gbk')
    (tmp_path / 'sandwich.txt').write_bytes(utf8 * 100 + gbk * (300_000 // len(gbk)) + utf8 * 100)
    record = '{"text": "今天天气很好，我们一起去公园散步吧。"}, '
    head = ('[' + record * 20_000).encode()
    (tmp_path / 'long.json').write_bytes(head + record.encode('gbk') * 20 + (record * 10 + '{}]').encode())
    (tmp_path / 'bom.txt').write_bytes(codecs.BOM_UTF8 + gbk + utf8 * 20)
    (tmp_path / 'no final newline.txt').write_bytes(utf8 * 3 + gbk + utf8.rstrip(b'\n'))  # its last line is judged
    (tmp_path / 'junction.txt').write_bytes(utf8.rstrip(b'\n') + gbk * 5)  # a first file without a final newline
    (tmp_path / 'stray at the end.txt').write_bytes(utf8 * 3 + b'\xff')  # not a character cut short
    said = {}
    for name in ('sandwich.txt', 'long.json', 'bom.txt', 'no final newline.txt', 'junction.txt', 'stray at the end.txt'):
        with pytest.raises(UserError) as e:
            convert_to_parquet(str(tmp_path / name), str(tmp_path / 'out.parquet'))
        said[name] = str(e.value)
    first_utf8_again = 101 + 300_000 // len(gbk)
    assert f'lines of UTF-8 (e.g. line {first_utf8_again}) and lines of another encoding (GBK / GB18030?) are mixed' in \
        said['sandwich.txt'] and 'two files' not in said['sandwich.txt'], said['sandwich.txt']
    assert f'byte 0x{record.encode("gbk")[10]:02x} at offset {len(head) + 10}' in said['long.json'], said['long.json']
    assert 'that line is in another encoding (GBK / GB18030?)' in said['long.json'], said['long.json']
    assert f"see it: tail -c +{len(head) + 11} {tmp_path / 'long.json'} | head -c 300 | iconv" in said['long.json']
    see = said['bom.txt'][said['bom.txt'].index('see it: ') + 8:-1]
    assert see.startswith(f"tail -c +4 {tmp_path / 'bom.txt'} | sed -n '1p' | iconv -f GB18030"), said['bom.txt']
    shown = subprocess.run(['bash', '-c', see], capture_output=True, text=True)
    assert shown.returncode == 0 and shown.stdout == gbk.decode('gbk'), (see, shown)
    assert 'line 4: byte' in said['no final newline.txt'] and 'that line is in another encoding (GBK' in said[
        'no final newline.txt'], said['no final newline.txt']
    junction = said['junction.txt']
    assert 'the text before it in its line is UTF-8, the text from it on is not (GBK' in junction, junction
    assert f'{{ head -c {len(utf8) - 1} ' in junction, junction  # split at the byte, not the line
    done = subprocess.run(['bash', '-c', junction[junction.index('e.g. ') + 5:]], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / 'junction.utf8.txt').read_text(encoding='utf-8') == utf8.decode().rstrip('\n') + gbk.decode(
        'gbk') * 5
    assert 'cut short' not in said['stray at the end.txt'] and 'line 4: byte 0xff' in said['stray at the end.txt']
    (tmp_path / 'one byte.csv').write_bytes(b'\xff')  # pyarrow calls it an empty CSV: it is not UTF-8 first
    with pytest.raises(UserError, match=r'one byte\.csv: line 1: byte 0xff at offset 0 is not UTF-8'):
        convert_to_parquet(str(tmp_path / 'one byte.csv'), str(tmp_path / 'out.parquet'))
    (tmp_path / 'names.csv').write_text('BZhang San,ok\nGIF8 et cetera,ok\n', encoding='utf-8')  # text, not packed
    assert convert_file(str(tmp_path / 'names.csv'), str(tmp_path / 'names.parquet'), text_col='BZhang San').rows == 1  # a header and a row


# --- clean, split, check ------------------------------------------------------


def flawed_texts() -> list:
    good = chinese_texts(20, seed=5)
    return good + [None, '', ' \t', '\u3000', good[0], good[7], '长' * 201]


def test_clean_a_text_file_counts_each_reason_and_writes_text(tmp_path):
    texts = flawed_texts()
    src = write_text_parquet(tmp_path / 'flawed.parquet', texts)
    counts = clean_parquet(src, str(tmp_path / 'clean.parquet'), max_chars=200)
    assert counts == {'rows': 27, 'null': 1, 'blank': 3, 'too_long': 1, 'duplicate': 2, 'kept': 20}
    assert read_texts(tmp_path / 'clean.parquet') == texts[:20]


@pytest.mark.parametrize('in_memory', [True, False])
def test_split_a_text_file(tmp_path, in_memory):
    texts = chinese_texts(1000, seed=6)
    src = write_text_parquet(tmp_path / 'all.parquet', texts, row_group_size=300)

    def run(name, seed=42):
        return split_parquet(src, str(tmp_path / f't{name}.parquet'), str(tmp_path / f'v{name}.parquet'),
                             valid_ratio=0.1, seed=seed, max_in_memory_rows=2000 if in_memory else 10)

    result = run('a')
    train, valid = read_texts(tmp_path / 'ta.parquet'), read_texts(tmp_path / 'va.parquet')
    assert collections.Counter(train) + collections.Counter(valid) == collections.Counter(texts)
    if in_memory:
        from sklearn.model_selection import train_test_split  # the same rows as a pairs file's split
        assert (result.method, result.valid_rows) == ('sklearn', 100)
        assert (train, valid) == tuple(map(list, train_test_split(texts, test_size=0.1, random_state=42)))
    else:
        assert result.method == 'streaming' and 50 <= result.valid_rows <= 150
    assert run('b') == result and read_texts(tmp_path / 'vb.parquet') == valid
    run('c', seed=7)
    assert read_texts(tmp_path / 'vc.parquet') != valid


def test_check_a_text_file(tmp_path, tokenizer_dir, tokenizer):
    texts = flawed_texts()
    src = write_text_parquet(tmp_path / 'flawed.parquet', texts)
    report = build_report(src)
    assert (report['kind'], report['shape'], report['columns']) == ('text', (27, 1), ['text'])
    assert report['nulls'] == {'text': 1}
    assert (report['null_rows'], report['blank_rows'], report['duplicate_rows']) == (1, 3, 2)
    lengths = [len(t) for t in texts if t is not None]
    assert report['text_chars']['count'] == len(lengths) and report['text_chars']['max'] == max(lengths)
    text = format_report(report)
    assert 'kind: raw text' in text and 'duplicate rows (same text):' in text and 'text length (characters)' in text
    tokens = build_report(src, tokenizer_dir=tokenizer_dir, max_seq_len=12)['tokens']
    over = sum(len(tokenizer(t)['input_ids']) > 12 for t in texts if t is not None)
    assert 0 < over < len(lengths) and tokens['truncated_rows'] == over
    assert 'none is truncated' in format_report(build_report(src, tokenizer_dir, max_seq_len=12))


def test_check_says_when_one_document_is_most_of_a_text_corpus(tmp_path):
    """A book saved as one line among 300 short documents was 98% of the tokens, and stage 1 learned
    mostly it; check showed only the length table. Now a note says so; documents of like length,
    few or many, get none."""
    short = [f'第{i}篇短文，讲一件小事。' for i in range(300)]
    giant = write_text_parquet(tmp_path / 'giant.parquet', short + ['很长的句子' * 20000])
    text = format_report(build_report(giant))
    assert 'note: the longest document (100,000 characters) holds' in text and '--max_chars=' in text, text
    for name, texts in (('like.parquet', short), ('few.parquet', ['一篇文章。' * 50, '另一篇文章。' * 40])):
        assert 'note: the longest document' not in format_report(build_report(write_text_parquet(tmp_path / name, texts)))


def test_check_says_when_train_would_refuse_the_files_or_the_tokenizer(tmp_path, tokenizer_dir):
    """check printed NaN statistics and exited 0 for a file train refuses (no usable row), said
    nothing of a tokenizer span corruption refuses, and ignored --max_seq_len without a tokenizer."""
    nulls = write_text_parquet(tmp_path / 'nulls.parquet', [None, '  ', None])
    good = write_text_parquet(tmp_path / 'good.parquet', chinese_texts(20, seed=3))
    from conftest import tokenizer_without_sentinels

    plain = tokenizer_without_sentinels(tokenizer_dir, tmp_path / 'no_sentinels')
    out = run_parallel([('nulls', ['check', nulls], 'prepare_data.py'),
                        ('good', ['check', good, f'--tokenizer_dir={tokenizer_dir}'], 'prepare_data.py'),
                        ('plain', ['check', good, f'--tokenizer_dir={plain}'], 'prepare_data.py'),
                        ('len', ['check', good, '--max_seq_len=64'], 'prepare_data.py')])
    code, err, report = out['nulls']
    assert code == 2 and 'usable rows (text in every column, as train reads them): 0 of 3' in report
    assert [line for line in err.splitlines() if line.strip()] == [
        f'error: {nulls}: no row has text in every column (2 with a null field, 1 blank, of 3): train refuses it; '
        f'convert or clean the source again']
    code, err, report = out['good']
    assert code == 0 and ': 20 of 20' in report and 'refuses this tokenizer' not in report, err[-2000:]
    code, err, report = out['plain']
    assert code == 0 and 'note: --objective=span_corruption refuses this tokenizer: ' in report and 'train_tokenizer' in report
    code, err, report = out['len']
    assert code == 2 and 'give --tokenizer_dir too' in err


def test_mixed_kinds_are_refused(tmp_path):
    folder = tmp_path / 'mixed'
    folder.mkdir()
    write_parquet(folder / 'a.parquet', make_texts(5, seed=7))
    write_text_parquet(folder / 'b.parquet', chinese_texts(5, seed=8))
    with pytest.raises(UserError, match=r'a\.parquet holds prompt/response pairs but .*b\.parquet holds raw text'):
        clean_parquet(str(folder), str(tmp_path / 'out.parquet'))
    assert not (tmp_path / 'out.parquet').exists()


# --- the real CLI -----------------------------------------------------------


def test_cli_text_mistakes_are_one_line_and_leave_nothing(tmp_path):
    d = tmp_path / 'work'
    d.mkdir()
    write_text_source(d / 'a.jsonl', chinese_texts(5, seed=9), 'jsonl')
    write_text_source(d / 'a.csv', chinese_texts(5, seed=9), 'csv')
    (d / 'gbk.txt').write_bytes('好\n\n'.encode() + '坏'.encode('gbk') + b'\n')
    (d / 'c.txt').write_text('文本\n', encoding='utf-8')
    os.symlink(d / 'gone.txt', tmp_path / 'dangling.txt')  # beside d: snapshot() cannot read it
    before = snapshot(d)
    results = run_parallel([
        ('both flags', ['convert', d / 'a.jsonl', d / 'o1.parquet', '--text_col=content', '--prompt_col=q'], PY),
        ('missing text_col', ['convert', d / 'a.jsonl', d / 'o2.parquet', '--text_col=body'], PY),
        ('missing csv text_col', ['convert', d / 'a.csv', d / 'o3.parquet', '--text_col=body'], PY),
        ('no column of either kind', ['convert', d / 'a.jsonl', d / 'o4.parquet'], PY),
        ('txt not utf-8', ['convert', d / 'gbk.txt', d / 'o5.parquet'], PY),
        ('txt with text_col', ['convert', d / 'c.txt', d / 'o6.parquet', '--text_col=x'], PY),
        ('empty text_col', ['convert', d / 'a.jsonl', d / 'o7.parquet', '--text_col='], PY),
        ('dangling link', ['convert', tmp_path / 'dangling.txt', d / 'o8.parquet'], PY),
    ])
    assert_user_error(results['both flags'], '--text_col', '--prompt_col', 'not both')
    assert_user_error(results['missing text_col'], 'a.jsonl', 'line 1', "'body'", '--text_col')
    assert_user_error(results['missing csv text_col'], 'a.csv', "'body'", 'content', '--text_col')
    assert_user_error(results['no column of either kind'], "'prompt'", '--text_col')
    assert_user_error(results['txt not utf-8'], 'gbk.txt', 'line 3', 'not UTF-8', 'iconv')
    assert_user_error(results['txt with text_col'], 'c.txt', 'no columns', '--text_col')
    assert_user_error(results['empty text_col'], '--text_col')
    assert_user_error(results['dangling link'], 'dangling.txt', 'a link to nothing', 'gone.txt')
    assert snapshot(d) == before


def test_cli_text_corpus_convert_clean_split_check(tmp_path):
    texts = chinese_texts(300, seed=10)
    (tmp_path / 'corpus.txt').write_text('\n'.join(texts[:150]) + '\n\n\n' + '\n'.join(texts[150:] + texts[:5]) + '\n',
                                         encoding='utf-8')
    t = tmp_path
    results = {}
    for name, args in [
        ('convert', ['convert', t / 'corpus.txt', t / 'all.parquet']),
        ('clean', ['clean', t / 'all.parquet', t / 'clean.parquet']),
        ('split', ['split', t / 'clean.parquet', f'--train_out={t / "train.parquet"}',
                   f'--valid_out={t / "valid.parquet"}']),
        ('check', ['check', t / 'valid.parquet']),
        ('help', ['convert', '--help']),
    ]:
        results.update(run_parallel([(name, args, PY)]))
        assert results[name][0] == 0, (name, results[name][1])
    out = {name: r[2] + r[1] for name, r in results.items()}
    assert f'wrote 305 rows to {t / "all.parquet"} (raw text, one text column; 2 blank line(s) skipped)' in out['convert']
    assert 'duplicate 5' in out['clean'] and 'kept 300 rows' in out['clean']
    assert 'train: 270 rows' in out['split'] and 'valid: 30 rows' in out['split']
    assert 'kind: raw text' in out['check'] and 'shape: (30, 1)' in out['check']
    help_lines = [line for line in out['help'].splitlines() if line.startswith('  --text_col=')]
    assert len(help_lines) == 1 and 'raw text' in help_lines[0]
    for name in ('all', 'clean', 'train', 'valid'):
        assert inspect_parquet(str(t / f'{name}.parquet')).kind == 'text'
    assert sorted(read_texts(t / 'train.parquet') + read_texts(t / 'valid.parquet')) == sorted(texts)
    assert not [n for n in os.listdir(t) if 'tmp' in n]


def test_a_refused_convert_removes_only_the_folders_it_made_never_a_users_or_a_links(tmp_path):
    # atomic_file makes the output's missing folders and removes them again when nothing is written:
    # only those, only while empty -- not a folder of the user's, not through or on a link
    (tmp_path / 'empty.jsonl').write_bytes(b'')
    src = str(tmp_path / 'empty.jsonl')
    mine = tmp_path / 'mine'
    mine.mkdir()  # the user's own folder, empty
    target = tmp_path / 'elsewhere'
    target.mkdir()
    (tmp_path / 'link').symlink_to(target)  # a link to a folder of the user's
    (tmp_path / 'dangling').symlink_to(tmp_path / 'nowhere')  # a link to nothing
    for out in (mine / 'out.parquet', mine / 'a' / 'b' / 'out.parquet', tmp_path / 'link' / 'c' / 'out.parquet',
                tmp_path / 'dangling' / 'out.parquet'):
        with pytest.raises(UserError, match='no rows to convert'):
            convert_file(src, str(out))
    assert sorted(os.listdir(tmp_path)) == ['dangling', 'elsewhere', 'empty.jsonl', 'link', 'mine']
    assert os.listdir(mine) == [] and os.listdir(target) == []
    assert os.path.islink(tmp_path / 'link') and os.path.islink(tmp_path / 'dangling')
    assert not os.path.exists(tmp_path / 'nowhere')  # made through the dangling link, and removed again
