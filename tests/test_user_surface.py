"""The user's surface, through the real CLI: test, generate (every decoding option), chat from a
pipe, warm start, TensorBoard curves, the plot, and the two READMEs."""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

import cli_runner
from conftest import ENV, ROOT, logged_losses, run_train, tiny_flags

PROMPTS = ['法国的首都是哪里？', '小狗怎么叫？', '香蕉是什么颜色的？', '大的反义词是什么？', '请重复：今天天气很好',
           '把cat变成大写', '计算：23+45=', '倒序输出：春夏秋冬', '日本的首都是？', '猫是怎么叫的？', '草是什么颜色？',
           '跟我说：我们今天去公园']


def cli(*args, stdin=None, timeout=300, runner=cli_runner):
    """runner=subprocess: the real interpreter (a command's smoke test), else forked from the zygote."""
    return runner.run([sys.executable, 'train_low_mem.py', *map(str, args)], cwd=ROOT, env=ENV,
                      capture_output=True, text=True, timeout=timeout, input=stdin)


def parallel(*commands):
    procs = [cli_runner.Popen([sys.executable, 'train_low_mem.py', *map(str, c)], cwd=ROOT, env=ENV, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in commands]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def answers(result) -> list[str]:
    assert result.returncode == 0, result.stderr[-2000:]
    return [line.split('  ->  ', 1)[1] if '  ->  ' in line else '' for line in result.stdout.splitlines()
            if line.startswith('  ')]


@pytest.fixture(scope='module')
def run(tmp_path_factory, data):
    """A tiny model trained for 360 steps on the demo corpus (so it answers something), with
    TensorBoard on."""
    from model.prep.demo_corpus import write_demo
    from model.data.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp('surface')
    write_demo(str(d / 'demo'), rows=534, seed=5)  # 480 train rows: 60 steps an epoch
    write_demo(str(d / 'text'), rows=3000, seed=6)
    train_tokenizer(str(d / 'text' / 'train.parquet'), str(d / 'tok'), vocab_size=900, num_threads=2)
    demo = {'tok': str(d / 'tok'), 'train': str(d / 'demo' / 'train.parquet'),
            'valid': str(d / 'demo' / 'valid.parquet')}
    out = d / 'run'
    flags = tiny_flags(demo, out, epochs=6, save_steps=180, eval_steps=180, logging_steps=5, log_with='tensorboard',
                       dropout_rate=0.0, learn_rate=5e-3, d_model=64, d_kv=32, d_ff=128)
    r = run_train(flags)
    assert r.returncode == 0, r.stderr[-3000:]
    return {'out': out, 'flags': flags, 'valid': demo['valid']}


def model_flags(run):
    return [f for f in run['flags'] if f.split('=')[0] in ('--output_dir', '--tokenizer_dir', '--max_seq_len')]


@pytest.mark.slow
def test_test_command_reports_loss_perplexity_bleu_exact_match_and_writes_predictions(run, data):
    out = run['out']
    r = cli('test', *model_flags(run), f'--model_dir={out}/final', f'--test_file={run["valid"]}',
            '--max_test_rows=32', runner=subprocess)
    assert r.returncode == 0, r.stderr[-2000:]
    m = re.search(r'rows (\d+) \(skipped (\d+) blank\) \| loss ([0-9.]+) \| perplexity ([0-9.]+) \| '
                  r'BLEU-4 ([0-9.]+) \| exact match ([0-9.]+)%', r.stdout)
    assert m, r.stdout
    rows, loss, ppl, bleu, exact = int(m.group(1)), float(m.group(3)), float(m.group(4)), float(m.group(5)), \
        float(m.group(6))
    assert rows == 32 and ppl == pytest.approx(math.exp(loss), rel=1e-3)
    # the loss is the trainer's validation loss of the same model on the same rows
    log = open(glob.glob(f'{out}/logs/*.log')[0], encoding='utf-8').read()
    assert loss == pytest.approx(float(re.findall(r'eval at step 360 \([0-9.]+ s\): validation loss ([0-9.]+)', log)[-1]), abs=2e-4)
    path = f'{out}/final.predictions.valid.jsonl'
    lines = open(path, encoding='utf-8').read().splitlines()
    header, records = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
    assert header['made_by'] == 'chat_small_t5' and header['rows'] == rows == len(records)
    valid = pq.read_table(run['valid']).to_pydict()
    assert [r['prompt'] for r in records] == valid['prompt'][:32]
    assert [r['reference'] for r in records] == valid['response'][:32]
    import sacrebleu

    hyps, refs = [r['answer'] for r in records], [r['reference'] for r in records]
    assert bleu == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs], tokenize='zh').score, abs=0.01)
    assert exact == pytest.approx(100 * sum(h.strip() == x.strip() for h, x in zip(hyps, refs)) / rows, abs=0.05)
    # the same command again replaces its own file; a mistake is one line
    assert cli('test', *model_flags(run), f'--model_dir={out}/final', f'--test_file={run["valid"]}',
               '--max_test_rows=4').returncode == 0
    bad = cli('test', *model_flags(run), f'--model_dir={out}/final', f'--test_file={out}/none.parquet')
    assert bad.returncode == 2 and bad.stderr.strip().startswith('error: ') and 'no such file' in bad.stderr


def test_generate_decoding_options(run):
    base = ['generate', *model_flags(run), f'--prompts={json.dumps(PROMPTS, ensure_ascii=False)}']
    greedy, beam, sample_a, sample_b, sample_c, short, no_repeat, bin_file = parallel(
        base, [*base, '--num_beams=4'],
        [*base, '--do_sample=True', '--sample_seed=1', '--temperature=1.3', '--top_k=20', '--top_p=0.95'],
        [*base, '--do_sample=True', '--sample_seed=1', '--temperature=1.3', '--top_k=20', '--top_p=0.95'],
        [*base, '--do_sample=True', '--sample_seed=2', '--temperature=1.3', '--top_k=20', '--top_p=0.95'],
        [*base, '--max_new_tokens=2', '--no_repeat_ngram_size=0'],
        [*base, '--no_repeat_ngram_size=1', '--repetition_penalty=1.3'],
        [*base, f'--model_dir={run["out"]}/chat_small_t5.best.bin'])
    g, b = answers(greedy), answers(beam)
    assert len(g) == len(PROMPTS)
    assert answers(sample_a) == answers(sample_b) != answers(sample_c)  # seeded: reproducible
    assert answers(sample_a) != g
    assert g != b  # beam search finds other answers than greedy on some prompts ...
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(f'{run["out"]}/final')
    assert all(len(tok(a, add_special_tokens=False)['input_ids']) <= 2 for a in answers(short))
    for a in answers(no_repeat):
        ids = tok(a, add_special_tokens=False)['input_ids']
        assert len(ids) == len(set(ids)), a  # no token twice
    assert answers(bin_file) == g  # a step .bin with the tokenizer answers like the HF folder
    assert_beam_scores_at_least_greedy(run, g, b)


def assert_beam_scores_at_least_greedy(run, greedy, beam):
    """... and where they differ, beam's answer is at least as likely (length-normalised)."""
    import torch
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    model = T5ForConditionalGeneration.from_pretrained(f'{run["out"]}/final').eval()
    tok = AutoTokenizer.from_pretrained(f'{run["out"]}/final')

    def score(prompt, text):
        enc = tok([prompt], return_tensors='pt', truncation=True, max_length=32)
        labels = tok([text], return_tensors='pt')['input_ids']
        with torch.no_grad():
            logits = model(**enc, labels=labels).logits
        logp = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).sum()
        return float(logp) / labels.shape[1]

    differ = [(p, g, b) for p, g, b in zip(PROMPTS, greedy, beam) if g != b]
    assert differ
    assert sum(score(p, b) >= score(p, g) - 1e-4 for p, g, b in differ) >= len(differ) / 2


def test_chat_reads_a_pipe_and_answers_like_generate(run):
    prompts = PROMPTS[:3]
    r = cli('chat', *model_flags(run), stdin='\n'.join([prompts[0], '', prompts[1], prompts[2], 'exit', 'unread']) + '\n')
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [line for line in r.stdout.splitlines() if not line.startswith('model: ')]
    want = answers(cli('generate', *model_flags(run), f'--prompts={json.dumps(prompts, ensure_ascii=False)}'))
    assert lines == want


def test_sigint_at_a_piped_chats_prompt_ends_it_with_130_and_one_line(run):
    import signal

    proc = subprocess.Popen([sys.executable, 'train_low_mem.py', 'chat', *model_flags(run)], cwd=ROOT, env=ENV,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdin.write(PROMPTS[0] + '\n')
    proc.stdin.flush()
    while proc.stdout.readline().startswith('model: '):  # then its answer: the chat waits at the prompt
        pass
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    lines = [line for line in stderr.splitlines() if line.strip() and ' INFO ' not in line]
    assert proc.returncode == 130 and 'Traceback' not in stderr and len(lines) == 1, stderr[-2000:]


class _RunsCode:
    def __reduce__(self):
        return (os.system, ('touch /tmp/chat_small_t5_code_ran',))


def test_pickled_weights_in_a_model_folder_are_one_line_in_every_command(run, tmp_path):
    """A model folder whose weights need unpickling (a pytorch_model.bin) is never loaded: one line
    in generate, test and chat, as under --init_from."""
    import shutil

    import torch

    folder = tmp_path / 'pickled'
    shutil.copytree(run['out'] / 'best', folder)
    os.remove(folder / 'model.safetensors')
    torch.save({'shared.weight': _RunsCode()}, folder / 'pytorch_model.bin')
    if os.path.exists('/tmp/chat_small_t5_code_ran'):
        os.remove('/tmp/chat_small_t5_code_ran')
    flags = [f'--model_dir={folder}', '--max_new_tokens=4']
    results = parallel(['generate', *flags, '--prompts=你好'], ['test', *flags, f'--test_file={run["valid"]}'])
    results.append(cli('chat', *flags, stdin='你好\n'))
    for r in results:
        lines = [line for line in r.stderr.splitlines() if line.startswith('error: ')]
        assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-2000:]
        assert len(lines) == 1 and 'holds more than tensors' in lines[0], r.stderr[-2000:]
    assert not os.path.exists('/tmp/chat_small_t5_code_ran')


def test_warm_start_begins_lower_and_a_mismatch_is_one_line(run, tmp_path):
    from model.prep.demo_corpus import write_demo

    scratch, warm = tmp_path / 'scratch', tmp_path / 'warm'
    write_demo(str(tmp_path / 'new'), rows=300, seed=77)  # other rows of the same tasks
    data = {'tok': [f for f in run['flags'] if f.startswith('--tokenizer_dir=')][0].split('=', 1)[1],
            'train': str(tmp_path / 'new' / 'train.parquet'), 'valid': str(tmp_path / 'new' / 'valid.parquet')}
    extra = dict(max_steps=3, logging_steps=1, dropout_rate=0.0, warmup_steps=0, d_model=64, d_kv=32, d_ff=128)
    r1, r2, bad_shape, bad_resume = parallel(
        ['train', *tiny_flags(data, scratch, **extra)],
        ['train', *tiny_flags(data, warm, init_from=f'{run["out"]}/final', **extra)],
        ['train', *tiny_flags(data, tmp_path / 'x', init_from=f'{run["out"]}/final', **{**extra, 'd_ff': 256})],
        ['train', *tiny_flags(data, tmp_path / 'y', init_from=f'{run["out"]}/chat_small_t5.best.bin',
                              **{**extra, 'd_model': 128, 'num_heads': 4}), '--dry_run=True'])
    assert r1.returncode == 0 and r2.returncode == 0, (r1.stderr + r2.stderr)[-3000:]
    assert logged_losses(warm)[1] < logged_losses(scratch)[1] - 0.5
    assert 'warm start: weights from' in open(glob.glob(f'{warm}/logs/*.log')[0], encoding='utf-8').read()
    assert bad_shape.returncode == 2 and 'Traceback' not in bad_shape.stderr
    line = [x for x in bad_shape.stderr.splitlines() if x.startswith('error: ')]
    assert len(line) == 1 and '--init_from' in line[0] and 'd_ff 128' in line[0] and '256 in this run' in line[0]
    assert bad_resume.returncode == 1 and 'd_model 64' in bad_resume.stdout, bad_resume.stdout


def test_tensorboard_records_the_named_scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = glob.glob(f'{run["out"]}/logs/tensorboard/*')
    assert len(runs) == 1
    events = EventAccumulator(runs[0])
    events.Reload()
    tags = set(events.Tags()['scalars'])
    assert {'train/loss', 'train/lr', 'train/grad_norm', 'train/tokens_per_s', 'eval/loss', 'eval/bleu4'} <= tags
    steps = [e.step for e in events.Scalars('train/loss')]
    assert steps == list(range(5, 361, 5))
    assert [e.step for e in events.Scalars('eval/loss')] == [60, 120, 180, 240, 300, 360]  # epoch ends


def test_plot_draws_three_curves_from_the_log(run, tmp_path):
    out = tmp_path / 'loss.png'
    r = cli('plot', f'--log_dir={run["out"]}/logs', f'--out={out}', runner=subprocess)
    assert r.returncode == 0, r.stderr[-2000:]
    assert '72 training points, 6 evaluations' in r.stdout
    import matplotlib.image

    img = matplotlib.image.imread(out)
    assert img.shape[0] > 600 and img.shape[1] > 600 and img.std() > 0.05
    assert cli('plot', f'--log_dir={run["out"]}/logs', f'--out={out}').returncode == 0  # its own PNG: replaced
    foreign = tmp_path / 'mine.png'
    foreign.write_bytes(open(out, 'rb').read()[:100])
    bad = cli('plot', f'--log_dir={run["out"]}/logs', f'--out={foreign}')
    assert bad.returncode == 2 and 'not written by this toolkit' in bad.stderr


def test_plot_draws_the_newest_log_of_the_run_asked_for_not_of_another_preset(tmp_path):
    """Every preset logs into one log_dir: `plot --use_large_config=True` drew a demo run's newer
    log (and, that one stopped before its first logged step, said it was no training log)."""
    from model.errors import UserError
    from model.use.plotting import newest_log, plot_log

    def log(name, outputs, age, steps=True):
        path = tmp_path / f'chat_trainer_low_mem_{name}.log'
        lines = ['2026-12-06 07:22:57 [rank 0] INFO run: 1 process(es), device cpu, precision no, log x']
        lines += [f'2026-12-06 07:22:57 [rank 0] INFO outputs: {outputs}'] if outputs else []
        lines += ['2026-12-06 07:22:59 [rank 0] INFO step 5/9 | epoch 0 | loss 7.39 | lr 1.0e-03 | grad_norm 1.2'] * steps
        path.write_text('\n'.join(lines) + '\n')
        os.utime(path, (1e9 - age, 1e9 - age))
        return str(path)

    large = log('large', f'{tmp_path}/model_save/pretrain_large', age=30)
    demo = log('demo', f'{tmp_path}/model_save/demo/', age=10, steps=False)  # the newest, stopped early
    assert newest_log(str(tmp_path), f'{tmp_path}/model_save/pretrain_large/') == (large, '')
    assert newest_log(str(tmp_path), f'{tmp_path}/model_save/demo') == (demo, '')
    with pytest.raises(UserError, match='its run stopped before its first logged step'):
        plot_log(demo, str(tmp_path / 'demo.png'))
    found, note = newest_log(str(tmp_path), f'{tmp_path}/elsewhere')  # none of its own: the newest, said
    assert found == demo and note.startswith(f'note: no log in {tmp_path} is of a run with output_dir '), note
    # the command: a run named by its --output_dir (or preset) gets its own newest log; none named, the newest
    r = cli('plot', f'--log_dir={tmp_path}', f'--output_dir={tmp_path}/model_save/pretrain_large',
            f'--out={tmp_path}/large.png')
    assert r.returncode == 0 and f'from {large}' in r.stdout, r.stdout + r.stderr
    one_line(cli('plot', f'--log_dir={tmp_path}', f'--out={tmp_path}/newest.png'), 'its run stopped before')
    older = log('older', '', age=20)  # from before logs named their outputs: any run's, as before
    assert newest_log(str(tmp_path), f'{tmp_path}/elsewhere') == (older, '')
    assert newest_log(str(tmp_path)) == (demo, '')
    os.symlink(tmp_path / 'nowhere', tmp_path / 'chat_trainer_low_mem_20990101-000000.log')  # a traceback before
    assert newest_log(str(tmp_path)) == (demo, '')


def test_plot_joins_the_logs_of_one_runs_starts_and_drops_the_work_a_kill_lost(tmp_path):
    """A preempted, requeued run writes one log per start: plot drew only the newest (the curve began at
    the step resumed from; a resume that trained nothing had no step lines: exit 2). Its starts' logs
    name one run id: joined, the points an earlier start logged past the step the next resumed from
    dropped (done again), another run's logs in the same folder and output_dir left out; the aux rate
    drawn where logged."""
    from model.use.plotting import read_curves, run_logs

    out = f'{tmp_path}/model_save/demo'

    def log(name, age, run_id, lines, outputs=out):
        path = tmp_path / f'chat_trainer_low_mem_{name}.log'
        began = f'2026-12-06 07:{59 - age // 10:02d}:00'  # each start's own time, as its log's lines have it
        head = [f'{began} [rank 0] INFO run: 1 process(es), device cpu, precision no, log x',
                f'{began} [rank 0] INFO outputs: {outputs}']
        head += [f'{began} [rank 0] INFO run id: {run_id}'] if run_id else []
        path.write_text('\n'.join(head + [f'2026-12-06 07:23:00 [rank 0] INFO {x}' for x in lines]) + '\n')
        os.utime(path, (1e9 - age, 1e9 - age))
        return str(path)

    def step(n, loss, aux=True):
        return (f'step {n}/30 | epoch 0 | loss {loss} | lr {n / 1000:.3e}' + (f' | aux_lr {n / 500:.3e}' if aux else '')
                + ' | grad_norm 1.0 | 600 samples/s')

    other = log('0other', 50, '20261206-070000-aaaaaaaa', [step(5, 9.0), step(10, 8.0)])  # the run moved aside
    first = log('1first', 40, '20261206-072257-0123abcd',
                [step(5, 7.0), step(10, 6.0), 'eval at step 10 (0.1 s): validation loss 6.5 (ppl 665)',
                 step(15, 5.0), step(20, 4.0), 'eval at step 20 (0.1 s): validation loss 3.9 (ppl 49)'])  # killed at
    # 22, its last state at step 10: what it did past 10 was done again, its evaluation at 20 was not
    second = log('2second', 30, '20261206-072257-0123abcd',
                 ['resumed from /x/state/state-000000010: step 10, epoch 0, 640 rows into the epoch',
                  step(15, 5.5), 'eval at step 15 (0.1 s): validation loss 5.2 (ppl 181)'])  # killed at 17: state 15
    stopped = log('3stopped', 20, None, [])  # SIGTERM in its start-up: before its run id
    third = log('4third', 10, '20261206-072257-0123abcd',
                ['resumed from /x/state/state-000000015: step 15, epoch 0, 960 rows into the epoch',
                 step(20, 4.5), step(25, 4.2), 'eval at step 25 (0.1 s): validation loss 4.4 (ppl 81)'])
    assert run_logs(str(tmp_path), third) == [first, second, third]
    assert run_logs(str(tmp_path), stopped) == [stopped] and run_logs(str(tmp_path), other) == [other]
    # the order is the starts' own, never the files' times: the killed first log touched (or copied) last is
    # still first (read last, its steps past 10 would come back and the later starts' resumes would drop theirs)
    os.utime(first, (1e9, 1e9))
    assert run_logs(str(tmp_path), third) == [first, second, third] == run_logs(str(tmp_path), first)
    shutil.copy(second, tmp_path / 'chat_trainer_low_mem_2second.bak.log')  # a copy beside it: one start
    os.symlink(third, tmp_path / 'chat_trainer_low_mem_9link.log')
    os.mkfifo(tmp_path / 'chat_trainer_low_mem_9fifo.log')  # never opened (it would block)
    fork = log('6fork', 5, '20261206-072257-0123abcd', [step(30, 1.0)], outputs=f'{tmp_path}/copy_of_demo')
    link = str(tmp_path / 'chat_trainer_low_mem_9link.log')
    assert run_logs(str(tmp_path), third) == [first, second, third] == run_logs(str(tmp_path), link)
    assert run_logs(str(tmp_path), fork) == [fork]  # the run's folder copied and resumed elsewhere: not joined
    # a requeue onto a node whose clock reads an hour earlier (another zone, daylight saving): still after the first
    skew = tmp_path / 'skew'
    skew.mkdir()
    for name, path in (('a', first), ('b', second)):
        text = open(path, encoding='utf-8').read()
        (skew / f'chat_trainer_low_mem_{name}.log').write_text(text.replace('07:56:00', '06:56:00'))
    pair = [str(skew / 'chat_trainer_low_mem_a.log'), str(skew / 'chat_trainer_low_mem_b.log')]
    assert run_logs(str(skew), pair[1]) == pair and read_curves(pair).loss[2] == 5.5  # step 15: the resume's
    with open(pair[1], 'a', encoding='utf-8') as f:  # a last line cut mid-write (a kill, a full disk): not read
        f.write('2026-12-06 06:56:09 [rank 0] INFO ' + step(20, 4.0)[:40])
    assert read_curves(pair).step == [5, 10, 15]
    c = read_curves([first, second, third])
    assert (c.step, c.loss) == ([5, 10, 15, 20, 25], [7.0, 6.0, 5.5, 4.5, 4.2])  # 15: the second's, 20: the third's
    assert (c.eval_step, c.eval_loss) == ([10, 15, 25], [6.5, 5.2, 4.4])
    assert (c.aux_step, c.aux_lr) == ([5, 10, 15, 20, 25], [0.01, 0.02, 0.03, 0.04, 0.05])
    assert read_curves(first).step == [5, 10, 15, 20]  # one log: as it is
    assert read_curves(log('5noaux', 60, None, [step(5, 1.0, aux=False)])).aux_lr == []
    # the command: the run named is drawn whole and says from which logs; --log_file: that log alone
    os.utime(third, (1e9 - 5, 1e9 - 5))  # the newest log of the run (the stopped start-up is older)
    r = cli('plot', f'--log_dir={tmp_path}', f'--output_dir={out}', f'--out={tmp_path}/run.png')
    assert r.returncode == 0, r.stderr[-2000:]
    assert f'5 training points, 3 evaluations from {third} and 2 earlier start(s) of its run: {first}, {second}' \
        in r.stdout, r.stdout
    r = cli('plot', f'--log_file={third}', f'--out={tmp_path}/third.png')
    assert r.returncode == 0 and '2 training points, 1 evaluations from' in r.stdout, r.stdout + r.stderr


def test_a_stop_after_plot_wrote_its_png_leaves_the_exit_code_0(tmp_path):
    """A SIGTERM or Ctrl-C landing once the PNG was renamed into place exited 143 / 130 after
    printing success: `plot ... && next` skipped its next step for work that was done. The last
    output written (writes.atomic_file(last=True)), a stop changes nothing."""
    log = tmp_path / 'chat_trainer_low_mem_1.log'
    log.write_text('2026-12-06 07:22:57 [rank 0] INFO step 5/9 | epoch 0 | loss 7.39 | lr 1.0e-03 | grad_norm 1.2\n')
    for signal_name in ('sigterm', 'sigint'):
        out = tmp_path / f'{signal_name}.png'
        r = cli_runner.run([sys.executable, 'train_low_mem.py', 'plot', f'--log_file={log}', f'--out={out}'], cwd=ROOT,
                           env={**ENV, 'CHAT_SMALL_T5_FAULT': f'written:{signal_name}'}, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0 and out.stat().st_size > 1000, (r.returncode, r.stderr[-2000:])
        assert 'after the work was done: nothing to stop' in r.stderr and f'plot: {out}' in r.stdout, r.stderr


def one_line(r, needle):
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: ') and needle in lines[0], \
        (r.returncode, r.stderr[-2000:])


@pytest.mark.slow
def test_odd_input_is_answered_and_outputs_stay_out_of_the_toolkits_folders(run, tmp_path):
    out, flags = run['out'], model_flags(run)
    # bytes that are not UTF-8 on a pipe, a closed stdin, a reader that goes away: no traceback
    r = cli_runner.run([sys.executable, 'train_low_mem.py', 'chat', *flags], cwd=ROOT, env=ENV, capture_output=True,
                       input=b'\xff\xfe' + PROMPTS[1].encode() + b'\n', timeout=300)
    assert r.returncode == 0 and b'Traceback' not in r.stderr, r.stderr[-2000:]
    assert len([x for x in r.stdout.splitlines() if not x.startswith(b'model: ')]) == 1
    closed = subprocess.run(f'{sys.executable} train_low_mem.py chat {" ".join(flags)} <&-', shell=True, cwd=ROOT,
                            env=ENV, capture_output=True, text=True, timeout=300)
    assert closed.returncode == 0 and 'Traceback' not in closed.stderr, closed.stderr[-2000:]
    many = json.dumps(PROMPTS * 40, ensure_ascii=False)
    piped = subprocess.run(f"{sys.executable} train_low_mem.py generate {' '.join(flags)} --prompts='{many}' | head -c 1",
                           shell=True, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert 'Traceback' not in piped.stderr and 'Error' not in piped.stderr, piped.stderr[-2000:]
    # test: a folder that does not exist yet is made; a glob's '*' never lands in a file name
    deep = tmp_path / 'new' / 'sub' / 'p.jsonl'
    r = cli('test', *flags, f'--model_dir={out}/final', f'--test_file={run["valid"]}', '--max_test_rows=4',
            f'--out={deep}')
    assert r.returncode == 0 and deep.is_file(), r.stderr[-2000:]
    pattern = os.path.join(os.path.dirname(run['valid']), '*.parquet')
    r = cli('test', *flags, f'--model_dir={out}/final', f'--test_file={pattern}', '--max_test_rows=4')
    assert r.returncode == 0, r.stderr[-2000:]
    made = [p for p in os.listdir(out) if 'predictions' in p]
    assert made and not any(ch in p for p in made for ch in '*?['), made
    # an output inside a tokenizer or model folder would block that folder's replacement
    tok = [f for f in run['flags'] if f.startswith('--tokenizer_dir=')][0].split('=', 1)[1]
    before = sorted(os.listdir(tok)), sorted(os.listdir(f'{out}/final'))
    one_line(cli('test', *flags, f'--model_dir={out}/final', f'--test_file={run["valid"]}',
                 f'--out={tok}/p.jsonl'), 'a tokenizer folder of this toolkit')
    one_line(cli('plot', f'--log_dir={out}/logs', f'--out={out}/final/sub/loss.png'), 'a model folder of this toolkit')
    assert (sorted(os.listdir(tok)), sorted(os.listdir(f'{out}/final'))) == before


def test_weights_with_another_tokenizer_of_the_same_size_are_refused(run, tmp_path):
    from model.prep.demo_corpus import write_demo
    from model.data.tokenizer import train_tokenizer

    tok = [f for f in run['flags'] if f.startswith('--tokenizer_dir=')][0].split('=', 1)[1]
    write_demo(str(tmp_path / 'text'), rows=3000, seed=99)
    other = train_tokenizer(str(tmp_path / 'text' / 'train.parquet'), str(tmp_path / 'tok'), vocab_size=900,
                            num_threads=2)
    from transformers import AutoTokenizer

    assert len(other) == len(AutoTokenizer.from_pretrained(tok))  # the same size: only the pieces differ
    weights = f'--model_dir={run["out"]}/chat_small_t5.best.bin'
    rest = [f for f in model_flags(run) if not f.startswith('--tokenizer_dir=')]
    # each says which tokenizer it was: the one train left beside the weights (best/), not "train a new one"
    own = f'give --tokenizer_dir={run["out"]}/best'
    for command in ('generate', 'chat', 'test'):
        one_line(cli(command, *rest, weights, f'--tokenizer_dir={tmp_path / "tok"}', stdin=''), 'another tokenizer')
        one_line(cli(command, *rest, weights, f'--tokenizer_dir={tmp_path / "tok"}', stdin=''), own)
        one_line(cli(command, *rest, weights, f'--tokenizer_dir={tmp_path / "none"}', stdin=''), own)
    # a damaged warm-start file is found by the dry run, not after the run started
    damaged = tmp_path / 'damaged.bin'
    damaged.write_bytes(open(f'{run["out"]}/chat_small_t5.best.bin', 'rb').read()[:50_000])
    w = str(tmp_path / 'w')
    flags = [f.replace(str(run['out']), w) if not f.startswith(('--train_file', '--validation_file')) else f
             for f in run['flags']]
    r = cli('train', *flags, f'--init_from={damaged}', '--dry_run=True')
    assert r.returncode == 1 and 'not a readable weights file' in r.stdout, r.stdout[-2000:]
    # a warm start without its tokenizer: pointed at the one the model folder holds, not at a new one
    no_tok = [f for f in flags if not f.startswith('--tokenizer_dir=')] + [f'--tokenizer_dir={tmp_path / "none"}']
    r = cli('train', *no_tok, f'--init_from={run["out"]}/best', '--dry_run=True')
    assert r.returncode == 1 and f'give --tokenizer_dir={run["out"]}/best' in r.stdout, r.stdout[-2000:]


def fenced_commands(path) -> list[str]:
    """The command lines of a README's fenced shell blocks (comments and output left out)."""
    text = open(path, encoding='utf-8').read()
    out = []
    for block in re.findall(r'```bash\n(.*?)```', text, flags=re.S):
        for line in block.splitlines():
            line = line.split('  #')[0].rstrip()
            if line and not line.lstrip().startswith('#'):
                out.append(line)
    return out


def test_both_readmes_carry_the_same_commands():
    zh, en = fenced_commands(os.path.join(ROOT, 'README.md')), fenced_commands(os.path.join(ROOT, 'README_en.md'))
    assert len(zh) > 20 and zh == en
    assert zh[:2] == ['bash scripts/demo.sh', 'bash scripts/test.sh']  # the two quick-start commands first


def test_the_tokenizer_beside_a_model_is_looked_for_without_a_traceback(tmp_path):
    """tokenizer_beside reads places the user never named (best/, final/ beside a weights file):
    whatever lies there -- not a tokenizer, JSON of another shape, nesting deep enough to recurse --
    it is no hint, never a traceback; a tokenizer of another fingerprint is no hint either."""
    from model.net.model_source import tokenizer_beside

    weights = tmp_path / 'chat_small_t5.best.bin'
    weights.write_bytes(b'')
    for text in ('[]', '{"added_tokens": [1]}', '[' * 100000, 'not json'):
        (tmp_path / 'best').mkdir(exist_ok=True)
        (tmp_path / 'best' / 'tokenizer.json').write_text(text)
        assert tokenizer_beside(str(weights), 'abcdef0123456789') is None
    assert tokenizer_beside(str(weights)) == str(tmp_path / 'best')  # no fingerprint recorded: the one there
