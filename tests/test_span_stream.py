"""Span corruption on raw text as the loader serves it (model/data/span_stream.py): the examples
rebuild the packed text, fit the sequence, follow the settings' noise, do not depend on the
number of ranks or workers, and resume exactly; the CLI refuses what it cannot train on."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cli_runner
from conftest import (ENV, ROOT, assert_same_weights, assert_user_error, cli, logged_losses, run_logs, make_texts, run_parallel,
                      run_train, tiny_flags, torchrun, train_cmd)
from model.data import span_corruption as sc
from model.data.loader import LoaderSettings, StreamingLoader
from model.errors import UserError

MAX_LEN = 32


def write_text(path, n, seed, row_group_size=50, blank_every=0) -> str:
    texts = [p + '\n' + r for p, r in make_texts(n, seed=seed, max_len=60)]
    if blank_every:
        texts = [None if i % blank_every == 0 else t for i, t in enumerate(texts)]
    pq.write_table(pa.table({'text': texts}), str(path), row_group_size=row_group_size)
    return str(path)


@pytest.fixture(scope='module')
def text_data(tmp_path_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp('text')
    return {'train': write_text(d / 'train.parquet', 300, seed=21, blank_every=17),
            'valid': write_text(d / 'valid.parquet', 40, seed=22), 'tok': tokenizer_dir}


def loader(files, tokenizer, rank=0, world=1, combine_counts=None, saved_counts=None, **kw):
    settings = dict(max_seq_len=MAX_LEN, batch_size=8, objective='span_corruption', shuffle_window_rows=120,
                    mix_row_groups=2, seed=5)
    settings.update(kw)
    return StreamingLoader(files, tokenizer, LoaderSettings(**settings), rank, world, return_row_index=True,
                           combine_counts=combine_counts, saved_counts=saved_counts)


def test_each_rank_counts_a_share_of_the_tokens_and_the_shares_sum_to_the_whole(text_data, tokenizer):
    whole = loader(text_data['train'], tokenizer).dataset.row_tokens()
    shares = {}

    def keep(rank):
        def combine(counts, error):  # what Collectives.combine_counts sums over the ranks
            assert error is None
            shares[rank] = counts.copy()
            return counts
        return combine
    for r in (0, 1):
        loader(text_data['train'], tokenizer, rank=r, world=2, combine_counts=keep(r)).dataset.row_tokens()
    assert np.array_equal(shares[0] + shares[1], whole)
    assert 0 < (shares[0] > 0).sum() < (whole > 0).sum() and not ((shares[0] > 0) & (shares[1] > 0)).any()


def epoch(ld) -> list[dict]:
    return [{k: v.clone() if hasattr(v, 'clone') else v for k, v in b.items()} for b in ld]


def examples(batches) -> dict[int, tuple[list, list]]:
    """example index -> (input ids, target ids), padding removed."""
    out = {}
    for b in batches:
        for i, k in enumerate(b['row_index'].tolist()):
            x = b['input_ids'][i][b['attention_mask'][i].bool()].tolist()
            out[k] = (x, [t for t in b['labels'][i].tolist() if t != -100])
    return out


def test_the_examples_rebuild_the_documents_packed_in_the_epoch_order(text_data, tokenizer):
    ld = loader(text_data['train'], tokenizer, shuffle=False, drop_last=False)
    ex = examples(epoch(ld))
    assert sorted(ex) == list(range(ld.num_positions))
    sentinels = np.array([tokenizer.convert_tokens_to_ids(sc.sentinel_token(i)) for i in range(100)])
    rebuilt = np.concatenate([sc.uncorrupt(np.array(x), np.array(y), sentinels, tokenizer.eos_token_id)
                              for _, (x, y) in sorted(ex.items())])
    # unshuffled: windows of 120 rows in file order, blank rows left out, each text then eos
    texts = pq.read_table(text_data['train']).column('text').to_pylist()
    expected = []
    for w in range(0, len(texts), 120):
        flat = [t for text in texts[w:w + 120] if text is not None for t in tokenizer(text).input_ids]
        raw = sc.lengths_for(MAX_LEN, 0.15, 3.0)[0]
        runs = [flat[i:i + raw] for i in range(0, len(flat), raw)]
        expected += [t for run in runs if len(run) >= 2 for t in run]
    assert rebuilt.tolist() == expected


def test_inputs_fill_the_sequence_and_the_noise_follows_the_settings(text_data, tokenizer):
    for density, span, length in ((0.15, 3.0, MAX_LEN), (0.15, 3.0, 128), (0.3, 5.0, 128)):
        ld = loader(text_data['train'], tokenizer, noise_density=density, mean_noise_span_length=span,
                    max_seq_len=length)
        ex = examples(epoch(ld))
        lengths = [len(x) for x, _ in ex.values()]
        assert max(lengths) == length and sum(n == length for n in lengths) >= 0.8 * len(lengths)
        assert all(len(y) <= sc.lengths_for(length, density, span)[1] for _, y in ex.values())
        if length == MAX_LEN:
            continue  # two or three spans an example: the means below need longer ones
        sentinel_ids = {tokenizer.convert_tokens_to_ids(sc.sentinel_token(i)) for i in range(100)}
        noise = spans = raw = 0
        for x, y in ex.values():
            s = [t for t in y if t in sentinel_ids]
            assert s == [tokenizer.convert_tokens_to_ids(sc.sentinel_token(i)) for i in range(len(s))]  # in order
            spans += len(s)
            noise += len(y) - 1 - len(s)
            raw += noise_free(x, sentinel_ids) + len(y) - 1 - len(s)
        assert abs(noise / raw - density) < 0.01, (noise / raw, density)
        assert abs(noise / spans - span) < 0.15 * span, (noise / spans, span)


def noise_free(x, sentinel_ids) -> int:
    return sum(1 for t in x[:-1] if t not in sentinel_ids)


def test_two_ranks_and_workers_serve_the_examples_of_one_rank(text_data, tokenizer):
    one = epoch(loader(text_data['train'], tokenizer, batch_size=8))
    ranks = [epoch(loader(text_data['train'], tokenizer, rank=r, world=2, batch_size=4)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(one)
    for i, b in enumerate(one):
        assert ranks[0][i]['row_index'].tolist() + ranks[1][i]['row_index'].tolist() == b['row_index'].tolist()
        for key in ('input_ids', 'labels'):
            joined = [row for r in (0, 1) for row in ranks[r][i][key].tolist()]
            assert [[t for t in row if t not in (0, -100)] for row in joined] == \
                   [[t for t in row if t not in (0, -100)] for row in b[key].tolist()]
    workers = epoch(loader(text_data['train'], tokenizer, batch_size=8, num_workers=2))
    assert all(np.array_equal(a['input_ids'], b['input_ids']) and np.array_equal(a['labels'], b['labels'])
               for a, b in zip(one, workers)) and len(workers) == len(one)


def test_the_masks_depend_on_the_seed_and_epoch_and_the_size_is_counted_right(text_data, tokenizer):
    a = loader(text_data['train'], tokenizer)
    first = examples(epoch(a))
    second = examples(epoch(a))  # epoch 1: other windows, other masks
    assert a.epoch == 2 and first != second
    assert first == examples(epoch(loader(text_data['train'], tokenizer)))
    assert first != examples(epoch(loader(text_data['train'], tokenizer, seed=6)))
    b = loader(text_data['train'], tokenizer)
    sizes = [len(list(b)) for _ in range(3)]
    assert sizes[0] == len(b) and sum(sizes) == b.total_steps(3)  # every epoch's own count


@pytest.mark.parametrize('new_world', [1, 2])
def test_resume_mid_epoch_continues_with_the_same_examples(text_data, tokenizer, new_world):
    whole = examples(epoch(loader(text_data['train'], tokenizer, rank=0, world=2, batch_size=4))
                     + epoch(loader(text_data['train'], tokenizer, rank=1, world=2, batch_size=4)))
    ld = loader(text_data['train'], tokenizer, rank=0, world=2, batch_size=4)
    it = iter(ld)
    seen = examples([next(it) for _ in range(5)])
    state = json.loads(json.dumps(ld.state_dict()))  # as a saved state holds it
    assert state['objective'] == 'span_corruption' and state['rows_consumed'] == 40
    rest = []
    for r in range(new_world):
        again = loader(text_data['train'], tokenizer, rank=r, world=new_world, batch_size=8 // new_world)
        again.load_state_dict(state)
        rest += epoch(again)
    got = {**examples(rest)}
    for k in seen:  # rank 0's first five batches; rank 1 held the others of those global batches
        assert whole[k] == seen[k]
    assert set(got) == set(range(40, max(whole) + 1)) and all(got[k] == whole[k] for k in got)


def test_a_resume_takes_the_token_counts_its_state_kept(text_data, tokenizer, monkeypatch):
    """The data position carries the rows' token counts: a loader given them counts nothing and
    serves the same examples; the counts survive JSON as a state holds them."""
    first = loader(text_data['train'], tokenizer)
    part = json.loads(json.dumps(first.state_dict()))['row_tokens']  # as a saved state holds it
    assert part['rows'] == first.num_rows and part['tokens'] == int(first.dataset.row_tokens().sum())

    def no_counting(*a, **k):
        raise AssertionError('counted again')
    monkeypatch.setattr(type(first.dataset), '_count_row_group', no_counting)
    again = loader(text_data['train'], tokenizer, saved_counts=part)
    assert np.array_equal(again.dataset.row_tokens(), first.dataset.row_tokens())
    assert examples(epoch(again)) == examples(epoch(loader(text_data['train'], tokenizer, saved_counts=part)))
    assert again.num_positions == first.num_positions and again.state_dict()['row_tokens']['of'] == part['of']


def test_token_counts_for_other_files_or_damaged_are_counted_again(text_data, tokenizer, tmp_path):
    """Kept counts are taken only for the very files, tokenizer and rule they were counted from;
    other files under the same names (another folder), a changed tokenizer or a damaged part:
    counted again, the same numbers as a first start."""
    part = json.loads(json.dumps(loader(text_data['train'], tokenizer).state_dict()))['row_tokens']
    other_dir = tmp_path / 'other'
    other_dir.mkdir()
    other = write_text(other_dir / os.path.basename(text_data['train']), 300, seed=99, blank_every=17)
    fresh = loader(other, tokenizer).dataset.row_tokens()
    assert not np.array_equal(fresh, loader(text_data['train'], tokenizer).dataset.row_tokens())
    assert np.array_equal(loader(other, tokenizer, saved_counts=part).dataset.row_tokens(), fresh)

    def changed(**how):
        bad = json.loads(json.dumps(part))
        for key, value in how.items():
            if key in bad['of']:
                bad['of'][key] = value
            else:
                bad[key] = value
        return bad
    # the same size and rows, another footer (a rewrite): not taken, though here the counts would agree
    table = pq.read_table(text_data['train'])
    for tag in ('a', 'b'):
        (tmp_path / tag).mkdir()
        pq.write_table(table.replace_schema_metadata({'tag': tag}), str(tmp_path / tag / 'train.parquet'),
                       row_group_size=50)
    a, b = str(tmp_path / 'a' / 'train.parquet'), str(tmp_path / 'b' / 'train.parquet')
    assert os.path.getsize(a) == os.path.getsize(b)
    kept = json.loads(json.dumps(loader(a, tokenizer).state_dict()))['row_tokens']
    assert loader(b, tokenizer, saved_counts=kept).dataset._row_tokens is None
    assert loader(a, tokenizer, saved_counts=kept).dataset._row_tokens is not None

    counts = loader(text_data['train'], tokenizer).dataset.row_tokens()
    for bad in (changed(tokenizer_sha256='0' * 64), changed(rule=0), changed(tokens=part['tokens'] + 1),
                changed(int32_zlib_base64='not base64!'), changed(int32_zlib_base64=''), changed(rows=1),
                {k: v for k, v in part.items() if k != 'int32_zlib_base64'}, 'not a dict', None):
        ld = loader(text_data['train'], tokenizer, saved_counts=bad)
        assert ld.dataset._row_tokens is None  # nothing taken: counted as at a first start
        assert np.array_equal(ld.dataset.row_tokens(), counts)
    assert loader(text_data['train'], tokenizer, saved_counts=part).dataset._row_tokens is not None


def test_kept_counts_without_a_footer_digest_are_never_taken(text_data, tokenizer, monkeypatch):
    from model.data import span_stream

    monkeypatch.setattr(span_stream, 'FOOTER_BYTES', 1)  # no footer digested: names and sizes alone never suffice
    part = json.loads(json.dumps(loader(text_data['train'], tokenizer).state_dict()))['row_tokens']
    assert part['of']['files'][0]['footer_sha256'] is None
    assert loader(text_data['train'], tokenizer, saved_counts=part).dataset._row_tokens is None


def test_a_file_changed_in_place_under_kept_counts_says_how_to_count_again(tokenizer, tmp_path):
    """The same size and footer, other text (an in-place edit of an uncompressed file): the kept
    counts are taken, and the first window that disagrees stops the run with the flag that makes
    it count again; a dropped take (another rank could not take them) counts again, together."""
    texts = [p + r for p, r in make_texts(200, seed=4, max_len=60)]
    path = str(tmp_path / 'train.parquet')
    pq.write_table(pa.table({'text': texts}), path, row_group_size=50, compression='none', use_dictionary=False,
                   write_statistics=False)
    part = json.loads(json.dumps(loader(path, tokenizer).state_dict()))['row_tokens']
    raw = open(path, 'rb').read()
    edited = raw
    for t in texts[:100]:
        old = t.encode('utf-8')
        new = b''.join(b'xyz' if len(ch.encode('utf-8')) == 3 else ch.encode('utf-8') for ch in t)
        edited = edited.replace(old, new, 1)
    assert len(edited) == len(raw) and edited != raw
    open(path, 'wb').write(edited)
    ld = loader(path, tokenizer, saved_counts=part)
    assert ld.dataset.counts_taken  # nothing outside the data tells the edit
    with pytest.raises(UserError) as e:
        epoch(ld)
    assert 'changed in place' in e.value.message and '--allow_data_change=True' in e.value.fix
    shares = []

    def combine(counts, error):  # what Collectives.combine_counts does, one rank's share kept
        shares.append(counts)
        return counts
    ld = loader(path, tokenizer, rank=0, world=2, combine_counts=combine, saved_counts=part)
    assert ld.dataset.counts_taken and not shares
    ld.dataset.drop_taken_counts()
    assert not ld.dataset.counts_taken and ld.dataset._row_tokens is None
    ld.dataset.row_tokens()
    assert len(shares) == 1  # counted again, through the ranks' sum


def test_a_tokenizer_without_sentinels_and_the_wrong_kind_of_data_are_refused(text_data, tokenizer_dir, tmp_path,
                                                                             data):
    from conftest import tokenizer_without_sentinels

    old = tmp_path / 'old_tokenizer'
    tokenizer_without_sentinels(tokenizer_dir, old)
    from tokenizers import Tokenizer

    with pytest.raises(UserError, match='no T5 sentinel tokens'):
        StreamingLoader(text_data['train'], Tokenizer.from_file(str(old / 'tokenizer.json')),
                        LoaderSettings(max_seq_len=MAX_LEN, batch_size=8, objective='span_corruption'))
    r = run_train(tiny_flags({**text_data, 'tok': str(old)}, tmp_path / 'run', objective='span_corruption'))
    assert_user_error(r, 'no T5 sentinel tokens', 'train_tokenizer', f'--train_file={text_data["train"]}',
                      '--vocab_size=', '--tokenizer_dir=NEW_FOLDER')  # the run's own data: a command that runs
    r = run_train(tiny_flags(data, tmp_path / 'run', objective='span_corruption'))
    assert_user_error(r, 'holds prompt/response pairs', '--text_col')
    r = run_train(tiny_flags(text_data, tmp_path / 'run'))
    assert_user_error(r, 'holds raw text', '--objective=span_corruption')
    assert not os.path.exists(tmp_path / 'run' / 'state')


SPAN = {'objective': 'span_corruption', 'epochs': 1, 'max_eval_rows': 16, 'eval_steps': 10, 'save_steps': 1000,
        'dropout_rate': 0.0}


@pytest.mark.slow
def test_a_stop_mid_run_resumes_bit_exactly_and_two_ranks_equal_one(text_data, data, tmp_path):
    ref = tmp_path / 'ref'
    r = run_train(tiny_flags(text_data, ref, **SPAN))
    assert r.returncode == 0, r.stderr[-3000:]
    assert '--show_samples=1 has no effect on this run' in open(run_logs(ref)[0], encoding='utf-8').read()
    steps = max(logged_losses(ref))
    cut = tmp_path / 'cut'
    env = {**ENV, 'CHAT_SMALL_T5_FAULT': f'train-step@{steps // 2}:sigterm'}
    import subprocess
    import sys

    stopped = subprocess.run([sys.executable, 'train_low_mem.py', 'train', *tiny_flags(text_data, cut, **SPAN)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    dry = run_train(tiny_flags(text_data, cut, **SPAN), '--is_keep_training=True', '--dry_run=True')
    assert dry.returncode == 0 and 'kept by the saved state: not counted again' in dry.stdout, dry.stdout[-3000:]
    # tiny_flags' --bleu_samples=4 does nothing under span corruption: the dry run says so
    assert 'note: --bleu_samples=4 has no effect on this run: span corruption is evaluated' in dry.stdout
    dry = run_train(tiny_flags(text_data, cut, **SPAN), '--is_keep_training=True', '--dry_run=True',
                    '--allow_data_change=True')  # the data said to have changed: counted again
    assert dry.returncode == 0 and 'counted by tokenizing them' in dry.stdout, dry.stdout[-3000:]
    r = run_train(tiny_flags(text_data, cut, **SPAN), '--is_keep_training=True')
    assert r.returncode == 0, r.stderr[-3000:]
    ref_losses, losses = logged_losses(ref), logged_losses(cut)
    assert ref_losses == losses  # every step's loss, before and after the stop
    resumed_log = open(sorted(glob.glob(f'{cut}/logs/*.log'))[-1], encoding='utf-8').read()
    assert 'taken from the saved state' in resumed_log  # the resume did not count the corpus again
    assert_same_weights(f'{ref}/final/model.safetensors', f'{cut}/final/model.safetensors')
    # its state resumed as pairs (stage 2 by mistake): refused before anything starts
    r = run_train(tiny_flags(data, cut, allow_data_change=True), '--is_keep_training=True')
    assert_user_error(r, 'trained --objective=span_corruption', '--init_from')
    two = tmp_path / 'two'
    r = torchrun(tiny_flags(text_data, two, **{**SPAN, 'batch_size_per_gpu': 4}), 2)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    for s, v in logged_losses(two).items():
        assert abs(v - ref_losses[s]) < 1e-4, (s, v, ref_losses[s])
    # the sums' order differs between 1 and 2 ranks: AdamW moves a weight by up to about lr (3e-3) a step, and
    # a gradient element near 0 moves it by as much either way; over ~50 steps this CPU's drift read 1.5e-4
    # (another's under 1e-4): a tenth of one step's update is allowed; the losses above tie the data position
    assert_same_weights(f'{ref}/final/model.safetensors', f'{two}/final/model.safetensors', atol=3e-4)
    log = open(glob.glob(f'{ref}/logs/*.log')[0], encoding='utf-8').read()
    assert 'validation loss' in log and 'BLEU-4' not in log  # the denoising loss, no answers


@pytest.mark.slow
def test_two_stages_span_corruption_then_pairs_and_generate_fills_sentinels(text_data, data, tmp_path):
    stage1 = tmp_path / 'stage1'
    r = run_train(tiny_flags(text_data, stage1, objective='span_corruption', max_steps=8))
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli('test', f'--model_dir={stage1}/final', f'--test_file={text_data["valid"]}')
    assert_user_error(r, 'holds raw text', 'prompt/response pairs')
    stage2 = tmp_path / 'stage2'
    r = run_train(tiny_flags(data, stage2, max_steps=8, init_from=f'{stage1}/final'))
    assert r.returncode == 0, r.stderr[-3000:]
    log = open(glob.glob(f'{stage2}/logs/*.log')[0], encoding='utf-8').read()
    assert f'warm start: weights from {stage1}/final' in log and 'BLEU-4' in log
    # resumed with the warm start still given: it is not used, and said so
    dry = run_train(tiny_flags(data, stage2, max_steps=8, init_from=f'{stage1}/final'), '--is_keep_training=True',
                    '--dry_run=True')
    assert f'note: --init_from={stage1}/final is not used: the run continues from its saved state' in dry.stdout, \
        dry.stdout[-3000:]
    # scored on pairs, the stage-1 model answers nothing: test says why; the stage-2 model gets no such note
    for model, noted in ((stage1, True), (stage2, False)):
        r = cli('test', f'--model_dir={model}/final', f'--test_file={data["valid"]}', '--max_test_rows=4',
                '--max_new_tokens=2', f'--out={tmp_path}/{model.name}.jsonl')
        assert r.returncode == 0 and ('note: test scores answers to prompts, and this model was pretrained with '
                                      '--objective=span_corruption' in r.stderr) == noted, r.stderr[-2000:]
    r = cli('generate', f'--model_dir={stage1}/final', '--prompts=你好<extra_id_0>世界', '--max_new_tokens=8')
    assert r.returncode == 0, r.stderr[-2000:]
    line = [x for x in r.stdout.splitlines() if '->' in x][0]
    answer = line.split('->', 1)[1].strip().replace(' ', '')  # the prompt, filled where the model wrote a span
    assert '</s>' not in answer and answer.startswith('你好') and answer.endswith('世界'), answer
    # <extra_id_0> first, alone: as the model learned it; one it wrote nothing for (8 steps) is said to be so
    unfilled = 'note: 你好<extra_id_0>世界: the model wrote nothing for <extra_id_0> (left as written)'
    assert ('<extra_id_0>' in answer) == (unfilled in r.stderr) and r.stderr.count('note:') <= 1, (answer, r.stderr)
    r = cli('generate', f'--model_dir={stage1}/final', '--prompts=["你好<extra_id_100>世界", "你好＜extra_id_0＞世界"]',
            '--max_new_tokens=2')
    assert r.returncode == 0 and 'note: 你好<extra_id_100>世界: <extra_id_100> is not a sentinel' in r.stderr, r.stderr
    # a sentinel written almost right: said so, not that the model answers nothing but sentinels
    assert "note: 你好＜extra_id_0＞世界: '＜extra_id_0＞' is read as plain text, not a sentinel; write it <extra_id_0>" \
        in r.stderr and 'answers nothing else' not in r.stderr, r.stderr
    # a plain question to the stage-1 model (it answered nothing, with no word why); the stage-2 model answers it
    said = 'this model was pretrained with --objective=span_corruption: it fills T5 sentinels'
    runs = run_parallel([(model, ['generate', f'--model_dir={model}', '--prompts=北京是哪个国家的首都？',
                                  '--max_new_tokens=2', f'--tokenizer_dir={text_data["tok"]}'], 'train_low_mem.py')
                         for model in (f'{stage1}/final', f'{stage1}/chat_small_t5.best.bin', f'{stage2}/final')])
    for model, (code, err, _) in runs.items():
        assert code == 0 and (said in err) == model.startswith(str(stage1)), (model, err[-2000:])
    # a piped chat says it once a session, not at every plain line
    r = subprocess.run([sys.executable, 'train_low_mem.py', 'chat', f'--model_dir={stage1}/final', '--max_new_tokens=2'],
                       cwd=ROOT, env=ENV, input='你好\n北京\n北京是<extra_id 0>的首都\n上海\n', capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stderr.count(said) == 1, r.stderr[-2000:]
    assert "note: '<extra_id 0>' is read as plain text, not a sentinel; write it <extra_id_0>" in r.stderr, r.stderr


def test_a_prompt_with_sentinels_the_model_never_learned_is_noted(tokenizer):
    from tokenizers import Tokenizer

    from model.net.chat_model import sentinel_note

    assert sentinel_note(tokenizer, '北京是中国的首都') is None
    assert sentinel_note(tokenizer, '北京<extra_id_0>首都<extra_id_1>') is None
    # not sentinels' text (the tokenizer reads them as plain text): said so, not counted in the order
    assert sentinel_note(tokenizer, '<extra_id_0>, extra_id_5 and <extra_id 3>') == (
        "'extra_id_5' is read as plain text, not a sentinel; write it <extra_id_5> (ASCII angle brackets, no spaces)"
        " -- and 1 more written so")
    long = '这是一段很长的文本' * 30 + '北京是<extra_id_0>的首都<extra_id_1>'  # its sentinels past 64 tokens
    assert sentinel_note(tokenizer, long, 64).startswith(
        "the prompt is cut to 64 tokens (the model's max_seq_len): <extra_id_0> and later sentinels fall outside it")
    assert sentinel_note(tokenizer, long, 4096) is None and sentinel_note(tokenizer, long) is None
    assert 'is not a sentinel of this tokenizer (<extra_id_0> to <extra_id_99>)' in sentinel_note(tokenizer, 'a<extra_id_100>')
    huge = '<extra_id_' + '1' * 5000 + '>'  # past int()'s 4300 digits: said, not a ValueError that ends a chat
    assert sentinel_note(tokenizer, f'a{huge}b<extra_id_100>').startswith('<extra_id_100> is not a sentinel')
    assert sentinel_note(tokenizer, f'a{huge}').startswith(f'{huge} is not a sentinel')
    assert sentinel_note(tokenizer, 'a<extra_id 1' + '1' * 5000 + '>').startswith(f"'<extra_id 1{'1' * 5000}>' is read")
    note = sentinel_note(tokenizer, '北京<extra_id_1>首都<extra_id_0>')
    assert note.startswith('sentinels <extra_id_1>, <extra_id_0>: span corruption numbers them from <extra_id_0> up')
    assert 'numbers them' in sentinel_note(tokenizer, '<extra_id_0>a<extra_id_0>')  # each once
    assert 'numbers them' in sentinel_note(tokenizer, '<extra_id_3>')
    without = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str().replace('<extra_id_', '<xtra_id_'))  # no sentinels
    assert sentinel_note(without, '北京<extra_id_0>').startswith(
        "this model's tokenizer has no T5 sentinels: <extra_id_0> is read as plain text")
    assert sentinel_note(without, '北京＜extra_id_0＞').startswith(
        "this model's tokenizer has no T5 sentinels: '＜extra_id_0＞' is read as plain text")


def test_a_sentinel_written_almost_right_is_named_with_its_exact_form(tokenizer):
    """Text meant as a sentinel but not written <extra_id_N> (an input method's ＜＞, a space, a
    full-width digit, ...) is plain text to the tokenizer: the note names what to write instead."""
    from model.net.chat_model import objective_note, sentinel_note, sentinel_set

    sentinels = sentinel_set(tokenizer)
    for written, exact in [('<extra_id_0 >', 0), ('< extra_id_0>', 0), ('<extra_id0>', 0), ('<extra-id-0>', 0),
                           ('<Extra_ID_0>', 0), ('＜extra_id_0＞', 0), ('<extra_id_０>', 0), ('<extra_id_1', 1),
                           ('[extra_id_0]', 0), ('［extra_id_0］', 0), ('《extra_id_0》', 0), ('【extra_id_2】', 2),
                           ('<extra id 0>', 0), ('<extraid0>', 0), ('<extra_id_01>', 1), ('ｅｘｔｒａ＿ｉｄ＿３', 3),
                           ('extra_id_4', 4), ('<extra_id_0/>', 0), ('<EXTRA ID 99>', 99), ('<extra_id_099>', 99),
                           ('（extra_id_3）', 3), ('{extra_id_0}', 0), ('<extra_id-1>', 1), ('<extra_id_+2>', 2)]:
        prompt = f'北京是{written}的首都'
        assert not sentinels & set(tokenizer(prompt).input_ids), written  # plain text to the tokenizer
        found = written.removesuffix('/>')
        assert sentinel_note(tokenizer, prompt) == (
            f"{found!r} is read as plain text, not a sentinel; write it <extra_id_{exact}> (ASCII angle brackets, "
            f"no spaces)"), written
    # before the order it may explain (<extra_id_1> alone), and whatever the model's objective: a span model's
    # note on a prompt without sentinels would say nothing of why
    note = sentinel_note(tokenizer, '北京<extra_id 0>首都<extra_id_1>')
    assert note.startswith("'<extra_id 0>' is read as plain text") and 'numbers them' not in note
    assert objective_note('span_corruption', '北京是<extra_id_０>的首都') is not None  # not read as <extra_id_0>
    # exact sentinels, plain text, words in a sentence and tags: nothing said
    for prompt in ['北京是<extra_id_0>的首都', '<<extra_id_0>>北京<extra_id_1>', '北京是中国的首都', 'an extra id 3 times',
                   'give me extra money', 'id_0 is a name', 'extra identification 0', 'the extraid', '<extra>',
                   '<b>粗体</b>和<i>斜体</i>', 'myextra_id_0', 'my_extra_id_1 的值', '变量 a_extra-id-2',
                   '额外的extra，编号id_0', 'my extra_id', '(an extra id here)']:
        assert sentinel_note(tokenizer, prompt) is None, prompt


def test_a_near_miss_with_no_sentinels_number_is_told_the_range_not_a_form_that_is_no_sentinel_either(tokenizer):
    """<extra id 100> was told to write <extra_id_100>, itself plain text (the sentinels are
    <extra_id_0> .. <extra_id_99>), and <extra_id_-1> was told nothing: a near miss whose number is
    past the sentinels, negative or missing is told the range instead."""
    from model.net.chat_model import sentinel_note, sentinel_set

    sentinels = sentinel_set(tokenizer)
    for written in ['<extra id 100>', '<extra_id_100 >', '＜extra_id_１００＞', '<extra_id_0100>', '<extra_id_-1>',
                    '<extra_id -1>', '<extra_id_−1>', '＜extra_id_－1＞', '<extra_id--3>', 'extra_id_-1', '<extra_id>',
                    '[extra id]', '<extra_id_' + '9' * 5000 + ' >', '<extra_id_1.5>', '<extra_id_--1>', '<extra_id_+-2>',
                    '<extra_id_1.>', '<extra_id_1,5>', '<extra_id_1e5>', '<extra_id_1_000>', '<extra_id_0x1>',
                    '<extra_id_1.5.6>']:
        prompt = f'北京是{written}的首都'
        assert not sentinels & set(tokenizer(prompt).input_ids), written
        assert sentinel_note(tokenizer, prompt) == (
            f"{written!r} is read as plain text, not a sentinel; this tokenizer's sentinels are <extra_id_0> to "
            f"<extra_id_99>, nothing else"), written
    # the first near miss is said, the others counted, whichever kind each is
    assert sentinel_note(tokenizer, '<extra id 100>和<extra id 1>').endswith('nothing else -- and 1 more written so')
    assert sentinel_note(tokenizer, '<extra id 1>和<extra id 100>') == (
        "'<extra id 1>' is read as plain text, not a sentinel; write it <extra_id_1> (ASCII angle brackets, no spaces)"
        " -- and 1 more written so")
    # long runs of spaces (a pasted document): read in one pass, not one per space (100,000 after 'extra_id-' took 78 s)
    from model.net.chat_model import near_sentinels
    assert near_sentinels('extra_id-' + ' ' * 100_000) == near_sentinels('<extra' + ' ' * 100_000) == []
    assert near_sentinels('<extra_id_1a' + ' ' * 50_000 + 'b') == [('<extra_id_1', '<extra_id_1>')]
    # after the number, text counts only inside brackets: a sentence's period in parentheses is no part of it
    assert sentinel_note(tokenizer, '(用 extra_id_1.)').startswith("'extra_id_1' is read as plain text, not a sentinel; "
                                                                 "write it <extra_id_1>")
    # no number, in round or curly brackets: code and prose, never a near miss (each was told the range)
    for text in ['请把 {extra_id} 换成编号', 'Use the (extra ID) field', 'print(f"{extra_id}")', '(extra_id)']:
        assert sentinel_note(tokenizer, text) is None, text


def test_generate_fills_each_sentinel_with_the_span_written_after_it(tokenizer):
    from model.net.chat_model import fill_sentinels

    ids = tokenizer('北京是<extra_id_0>的首都<extra_id_1>').input_ids
    s0, s1 = (tokenizer.convert_tokens_to_ids(sc.sentinel_token(i)) for i in (0, 1))
    china = tokenizer('中国', add_special_tokens=False).input_ids
    out = [0, s0, *china, s1, *tokenizer('。', add_special_tokens=False).input_ids, 1, 0]
    assert fill_sentinels(tokenizer, ids, out).replace(' ', '') == '北京是【中国】的首都【。】'
    assert fill_sentinels(tokenizer, ids, [0, s0, *china, 1]).replace(' ', '') == '北京是【中国】的首都<extra_id_1>'


def test_answers_are_filled_where_the_model_writes_sentinels_and_always_for_a_span_model(tokenizer):
    import torch

    from model.net.chat_model import answer, unfilled_note

    s0 = tokenizer.convert_tokens_to_ids(sc.sentinel_token(0))
    china = tokenizer('中国', add_special_tokens=False).input_ids

    class Writes(torch.nn.Module):  # a model that writes what it is told
        def __init__(self, ids):
            super().__init__()
            self.ids, self.weight = ids, torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, **kw):
            return torch.tensor([self.ids] * len(input_ids))
    prompt = ['北京是<extra_id_0>的首都']
    spans = Writes([0, s0, *china, 1])
    assert answer(spans, tokenizer, prompt, fill=True)[0].replace(' ', '') == '北京是【中国】的首都'
    assert answer(spans, tokenizer, prompt)[0].replace(' ', '') == '中国'  # test and evaluation: as written
    plain = Writes([0, *china, 1])  # a pairs model asked about the string: its answer, not the prompt
    assert answer(plain, tokenizer, prompt, fill=True)[0].replace(' ', '') == '中国'
    s53 = tokenizer.convert_tokens_to_ids(sc.sentinel_token(53))  # a pairs model's stray sentinel, not the prompt's:
    stray = Writes([0, s53, *china, 1])  # its answer as written, not the prompt echoed as if filled
    assert answer(stray, tokenizer, prompt, fill=True)[0].replace(' ', '') == '中国'
    # a span-corruption model that wrote no span (little training): the prompt, the sentinel left and said so,
    # not its words as if they answered something
    shown = answer(plain, tokenizer, prompt, fill='always')[0].replace(' ', '')
    assert shown == '北京是<extra_id_0>的首都' and 'wrote nothing for <extra_id_0>' in unfilled_note(shown)
    assert 'an answer cut by --max_new_tokens ends before the later ones' in unfilled_note(shown)  # the other cause
    assert answer(spans, tokenizer, prompt, fill='always')[0].replace(' ', '') == '北京是【中国】的首都'
    assert unfilled_note('北京是【中国】的首都') is None
    empty = answer(Writes([0, s0, 1]), tokenizer, prompt, fill='always')[0].replace(' ', '')  # a sentinel, no span
    assert empty == '北京是【】的首都' and '1 span(s) (shown empty: 【】)' in unfilled_note(empty, prompt[0])
    assert unfilled_note('书名号【】在此【x】', '书名号【】在此<extra_id_0>') is None  # the prompt's own 【】


def test_chat_in_a_terminal_answers_as_a_pipe_does_filled_and_seeded(tokenizer):
    """stream_answer (chat in a terminal) against answer (generate, a piped chat): a prompt with
    sentinels is shown filled, and sampling with one --sample_seed gives one answer (it printed
    the bare spans, and a new answer each time)."""
    import io

    import torch

    from config import DecodeConfig, T5ModelConfig
    from model.net.chat_model import answer, build_model, stream_answer

    torch.manual_seed(0)
    model = build_model(T5ModelConfig(d_model=32, num_heads=2, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1),
                        len(tokenizer)).eval()
    sampled = DecodeConfig(do_sample=True, temperature=2.0, top_p=1.0, top_k=0, max_new_tokens=8, sample_seed=7)
    for prompt in ('你好吗', '北京是<extra_id_0>的首都'):
        shown = []
        for _ in range(2):
            torch.manual_seed(len(shown))  # whatever the global generator holds before
            out = io.StringIO()
            text = stream_answer(model, tokenizer, prompt, sampled, 32, out=out)
            assert out.getvalue() == text + '\n'
            shown.append(text)
        assert shown[0] == shown[1] == answer(model, tokenizer, [prompt], max_seq_len=32, decode=sampled, fill=True)[0]
    s0 = tokenizer.convert_tokens_to_ids(sc.sentinel_token(0))

    class Writes(torch.nn.Module):  # a model that writes its span for <extra_id_0>
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, **kw):
            return torch.tensor([[0, s0, *tokenizer('中国', add_special_tokens=False).input_ids, 1]] * len(input_ids))
    out = io.StringIO()
    stream_answer(Writes(), tokenizer, '北京是<extra_id_0>的首都', sampled, 32, out=out)
    assert out.getvalue().replace(' ', '') == '北京是【中国】的首都\n'  # the prompt, its sentinel filled


def test_a_literal_sentinel_in_the_training_text_is_text(tokenizer):
    from model.data.batches import TokenEncoder

    s0 = tokenizer.convert_tokens_to_ids(sc.sentinel_token(0))
    ids = TokenEncoder(tokenizer, 64, truncate=False).encode(['写着<extra_id_0>的纸'])[0]
    assert s0 not in ids and s0 in tokenizer('写着<extra_id_0>的纸').input_ids  # a prompt typed by a user: a sentinel


def test_a_source_file_given_as_training_data_names_the_convert_command(tmp_path, text_data):
    src = tmp_path / 'corpus.txt'
    src.write_text('一篇文档\n', encoding='utf-8')
    r = run_train(tiny_flags({**text_data, 'train': str(src)}, tmp_path / 'run', objective='span_corruption'))
    assert_user_error(r, 'training reads Parquet', f'python prepare_data.py convert {src}')


def test_a_stop_while_the_tokens_are_counted_breaks_the_count_off_and_keeps_nothing(text_data, tokenizer, monkeypatch):
    """A training run only records a stop (model/stopping.py): the counting pass must look at it
    itself, or a SIGTERM waits for a count of hours. Every rank still meets at the sum."""
    from model import stopping

    whole = loader(text_data['train'], tokenizer).dataset.row_tokens()
    ds = loader(text_data['train'], tokenizer).dataset
    asked, counted, met = [], [], []
    monkeypatch.setattr(stopping, 'requested', lambda: asked.append(1) or (signal.SIGTERM if len(asked) > 2 else 0))
    count = ds._count_row_group
    monkeypatch.setattr(ds, '_count_row_group', lambda *a: counted.append(a) or count(*a))
    try:
        with pytest.raises(stopping.Stopped, match='SIGTERM'):
            ds.row_tokens()
        assert 2 <= len(counted) < len(ds.row_groups)  # broken off where the stop was seen
        assert ds._row_tokens is None  # an unfinished count is never kept
        with pytest.raises(stopping.Stopped):  # with a sum over ranks: this rank still gets there
            loader(text_data['train'], tokenizer, rank=0, world=2,
                   combine_counts=lambda c, e: met.append(e) or c).dataset.row_tokens()
        assert met == [None]
    finally:
        stopping.STOP.uninstall()
    monkeypatch.setattr(stopping, 'requested', lambda: 0)
    assert np.array_equal(ds.row_tokens(), whole)  # counted afresh, in full


def test_a_fresh_span_run_that_never_trains_takes_back_the_folders_it_made(text_data, tmp_path):
    """Refused once its examples are counted (only the run counts them), or stopped while it
    counts: the output folders it made go again; a folder that was there, and a user's file in
    it, stay. The stop is said as a start-up's, and comes at once."""
    import time

    tiny = tmp_path / 'tiny.parquet'
    pq.write_table(pa.table({'text': ['一二三']}), str(tiny))
    logs = tmp_path / 'logs'
    out = tmp_path / 'new' / 'run'
    r = run_train(tiny_flags({**text_data, 'train': str(tiny)}, out, **SPAN, log_dir=logs))
    assert_user_error(r, 'fewer than one optimizer step')
    assert not os.path.exists(tmp_path / 'new')
    mine = tmp_path / 'mine'
    os.makedirs(mine)
    (mine / 'notes.txt').write_text('mine')
    start = time.monotonic()
    r = cli_runner.run(train_cmd(tiny_flags(text_data, mine / 'run', **SPAN, log_dir=logs, output_dir=mine)), cwd=ROOT,
                       env={**ENV, 'CHAT_SMALL_T5_FAULT': 'token-count:sigterm'}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 143, r.stderr[-3000:]
    assert 'SIGTERM: the run is starting' in r.stderr and 'stopped by SIGTERM: during start-up' in r.stderr, r.stderr
    assert 'Traceback' not in r.stderr and time.monotonic() - start < 60
    assert sorted(os.listdir(mine)) == ['.chat_small_t5.lock', 'notes.txt']  # its lock file stays (released)
    assert (mine / 'notes.txt').read_text() == 'mine'


def test_a_span_run_notes_its_warmup_against_the_steps_it_takes(text_data, tmp_path):
    """Span corruption's steps are known only once the run counted its examples: the warmup note
    then judges the run that --max_steps cuts, as the dry run does, not the epochs'."""
    r = run_train(tiny_flags(text_data, tmp_path / 'run', **{**SPAN, 'epochs': 3}, warmup_steps=1024, max_steps=3))
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'warmup_steps=1024 warms up for 1024 optimizer steps, all of the run\'s 3:' in r.stderr, r.stderr[-3000:]
    assert '--warmup_ratio=0.33 (a share of any run) or --warmup_steps=1' in r.stderr
    # so is a step interval: SPAN's --save_steps=1000 and --eval_steps=10 never come round in those 3 steps
    assert "--save_steps=1000 is more than the run's 3 optimizer steps, so it never comes round" in r.stderr
    assert "--eval_steps=10 is more than the run's 3 optimizer steps, so it never comes round" in r.stderr


def test_a_long_document_is_tokenized_in_pieces_with_the_whole_texts_ids(tokenizer, monkeypatch):
    """A 15 MB one-line document made the tokenizer hold its records of every token at once (1.6 GB
    peak in a run): it is tokenized a piece at a time, seams before spaces -- the same ids as the
    whole text -- or, in a stretch without one, where it must be: a token or two apart a seam."""
    from model.data import batches
    from model.data.batches import TokenEncoder, document_pieces

    monkeypatch.setattr(batches, 'PIECE_CHARS', 300)
    monkeypatch.setattr(batches, 'SEAM_CHARS', 100)
    enc = TokenEncoder(tokenizer, MAX_LEN, truncate=False)
    whole = lambda text: enc._rust.encode(text, add_special_tokens=True).ids  # noqa: E731
    spaced = ' '.join(p + r for p, r in make_texts(200, seed=5, max_len=30))
    pieces = document_pieces(spaced, 300)
    assert len(pieces) > 5 and ''.join(pieces) == spaced and all(len(p) <= 300 for p in pieces)
    assert all(p.startswith(' ') for p in pieces[1:])  # every seam before a space
    short = '北京是中国的首都'
    ids = enc.encode([short, spaced, short])
    assert list(ids[1]) == whole(spaced) and ids[0] == ids[2] == whole(short)
    flat, lens = enc.encode_ragged([short, spaced])
    assert list(lens) == [len(whole(short)), len(whole(spaced))] and list(flat) == whole(short) + whole(spaced)
    assert list(enc.encode_lengths([short, spaced])) == list(lens)  # the counting pass: lengths alone
    unspaced = '北京是中国的首都也是一座历史悠久的城市' * 100  # no space: cut where it must be
    got = enc.encode([unspaced])[0]
    assert len(document_pieces(unspaced, 300)) == 7 and got[-1] == enc.eos_id
    assert abs(len(got) - len(whole(unspaced))) <= 2 * 6  # a token or two a seam


def test_the_convert_command_named_for_a_source_file_asks_for_column_flags_only_where_needed(tmp_path):
    from model.data.files import inspect_parquet

    sources = {'qa.csv': ('prompt,response\n问,答\n', ''), 'qa.tsv': ('"prompt"\tresponse\n问\t答\n', ''),
               'doc.tab': ('id\ttext\n1\t文\n', ''), 'qa.jsonl': ('{"prompt": "问", "response": "答"}\n', ''),
               'other.csv': ('question,answer\n问,答\n', ' --prompt_col=... --response_col=...'),
               'other.jsonl': ('not json\n', ' --prompt_col=...'), 'list.json': ('[{"text": "文"}]', ' --prompt_col=...')}
    for name, (text, flags) in sources.items():
        (tmp_path / name).write_text(text, encoding='utf-8')
        with pytest.raises(UserError) as raised:
            inspect_parquet(str(tmp_path / name))
        said = str(raised.value)
        command = f'python prepare_data.py convert {tmp_path / name} {tmp_path / name.split(".")[0]}.parquet'
        assert said.endswith(command + flags) if not flags else (command + flags) in said, (name, said)
