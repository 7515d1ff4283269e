"""Tokenizer: trained from text, loaded offline as a fast tokenizer, lossless."""

import os

import pytest

from model.errors import UserError
from conftest import SHARED_DATA, make_texts, write_parquet
from model.data.tokenizer import EOS_ID, PAD_ID, UNK_ID, load_tokenizer, train_tokenizer


def round_trip(tok, text):
    return tok.decode(tok(text)['input_ids'], skip_special_tokens=True)


def test_loads_as_fast_tokenizer_with_fixed_ids(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tok.is_fast
    assert len(tok) == 1000 + 100  # the pieces, then T5's sentinels
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (PAD_ID, EOS_ID, UNK_ID) == (0, 1, 2)
    sentinels = [f'<extra_id_{i}>' for i in range(100)]
    assert tok.convert_tokens_to_ids(sentinels) == list(range(1000, 1100))
    assert set(sentinels) <= set(tok.all_special_tokens)  # additional special tokens, as AutoTokenizer loads them
    ids = tok('北京<extra_id_7>首都').input_ids
    assert 1007 in ids and tok.decode(ids, skip_special_tokens=True).replace(' ', '') == '北京首都'


@pytest.mark.parametrize('text', [
    '你好，世界！这是（测试）：分号；顿号、问号？',
    '数字 0123456789 和 3.14，Latin ABC xyz, GPU T5',
    '第一行\n第二行\n\n第四行',
    '生僻字：龘靐齉爩 与 emoji 😀🚀，全角数字１２３',
    'tabs\tand  double  spaces',
])
def test_round_trip_is_exact(tokenizer, text):
    assert round_trip(tokenizer, text) == text


def test_rare_characters_fall_back_to_bytes_not_unk(tokenizer):
    ids = tokenizer('龘')['input_ids']
    assert UNK_ID not in ids
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert [p for p in pieces if p.startswith('<0x')] == ['<0xE9>', '<0xBE>', '<0x98>']  # UTF-8 bytes


def test_eos_appended_and_kept_by_truncation(tokenizer):
    ids = tokenizer('你好' * 100, truncation=True, max_length=16)['input_ids']
    assert len(ids) == 16 and ids[-1] == EOS_ID


def test_vocab_too_small_names_the_minimum(tmp_path):
    src = write_parquet(tmp_path / 't.parquet', make_texts(800, seed=3))
    with pytest.raises(UserError, match=r'too small.*--vocab_size=\d+ or more'):
        train_tokenizer(src, str(tmp_path / 'tok'), vocab_size=300, num_threads=2)
    assert not os.path.exists(tmp_path / 'tok')


def test_vocab_too_large_for_the_text_names_a_size_that_trains(tmp_path):
    """sentencepiece's own line (src/trainer_interface.cc(...) ... Vocabulary size too high) became
    the error: now a --vocab_size this text supports (sentencepiece's bound), which then trains;
    and a row cap of 100 or less, which sentencepiece refused with its own line, is not refused so."""
    import re

    src = write_parquet(tmp_path / 'd.parquet', make_texts(60, seed=2))
    with pytest.raises(UserError) as raised:
        train_tokenizer(src, str(tmp_path / 'tok'), vocab_size=20000, num_threads=2)
    m = re.search(r'vocab_size=20000 is more than this text supports \(sentencepiece allows at most (\d+) when '
                  r'asked for 20000\); use --vocab_size=\1, or train on more text', str(raised.value))
    assert m and 'trainer_interface' not in str(raised.value), str(raised.value)
    assert len(train_tokenizer(src, str(tmp_path / 'tok'), vocab_size=int(m.group(1)), num_threads=2)) > int(m.group(1))
    try:  # 40 rows: sentencepiece's own "input_sentence_size() > 100" is not met, whatever else is said
        train_tokenizer(src, str(tmp_path / 'tok2'), vocab_size=int(m.group(1)), max_rows=40, num_threads=2)
    except UserError as e:
        assert 'input_sentence_size' not in str(e) and 'trainer_interface' not in str(e), str(e)


def test_missing_tokenizer_names_the_command(tmp_path):
    with pytest.raises(UserError, match='train_low_mem.py train_tokenizer'):
        load_tokenizer(str(tmp_path / 'nothing'))


def test_sampling_caps_rows(tmp_path):
    from model.data.tokenizer import iter_training_texts

    src = write_parquet(tmp_path / 't.parquet', make_texts(5000, seed=4), row_group_size=1000)
    n = sum(1 for _ in iter_training_texts([src], max_rows=1000, seed=0)) / 2
    assert 800 < n < 1200


REAL_DATA = pytest.mark.skipif(not os.path.exists(os.path.join(SHARED_DATA, 'real_train_3k.parquet')),
                               reason='shared real data not present')


@pytest.fixture(scope='module')
def real(tmp_path_factory):
    """A tokenizer trained on the real train texts, and the real validation texts."""
    import pyarrow.parquet as pq

    tok = train_tokenizer(os.path.join(SHARED_DATA, 'real_train_3k.parquet'), str(tmp_path_factory.mktemp('real') / 'tok'),
                          vocab_size=8000, num_threads=2)
    valid = pq.read_table(os.path.join(SHARED_DATA, 'real_valid_1k.parquet')).to_pydict()
    return tok, [t for t in valid['prompt'] + valid['response'] if t]


@pytest.mark.slow
@REAL_DATA
def test_real_validation_texts_round_trip(real):
    tok, texts = real
    same = sum(round_trip(tok, t).replace(' ', '') == t.replace(' ', '') for t in texts)
    assert same / len(texts) >= 0.999, f'{len(texts) - same} of {len(texts)} texts changed'


@REAL_DATA
@pytest.mark.parametrize('max_seq_len', [16, 32])
def test_a_cut_text_keeps_the_tokens_of_the_whole_real_text(real, max_seq_len):
    """Each real validation text repeated past the cut (tokenizer.text_cut_chars), so the cut
    lands at a different place in each: the kept tokens equal those of the uncut text."""
    from model.data.batches import TokenEncoder

    tok, texts = real
    encoder = TokenEncoder(tok, max_seq_len)
    cut = encoder._cut_chars
    longs = [(t + '\n') * (cut // (len(t) + 1) + 2) for t in texts]
    assert min(map(len, longs)) > cut
    whole = [e.ids for e in encoder._rust.encode_batch_fast(longs)]  # the same truncation, uncut
    kept = encoder.encode(longs)
    assert kept == whole, sum(a != b for a, b in zip(kept, whole))
    assert {len(ids) for ids in kept} == {max_seq_len}
