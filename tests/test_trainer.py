"""The trainer, end to end through the real CLI, on a tiny model (CPU, fp32)."""

from __future__ import annotations

import glob
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import cli_runner
from conftest import (ENV, ROOT, assert_same_weights, logged_losses, make_texts, run_train, state_folders,
                      tiny_flags, torchrun, weights, write_parquet)

# --- units ------------------------------------------------------------------

def test_schedule_step_count():
    from model.net.sizing import total_optimizer_steps

    # rows / (batch x processes x accumulation) x epochs
    assert total_optimizer_steps(10_000_000, 32, 3, 2, 3) == 10_000_000 // 192 * 3
    assert total_optimizer_steps(1000, 8, 2, 2, 3) == 31 * 3
    assert total_optimizer_steps(1000, 8, 1, 1, 3, max_steps=50) == 50
    assert total_optimizer_steps(100, 8, 1, 1, 1, max_steps=50) == 12


def test_lr_warmup_then_decay():
    from config import TrainConfigPretrainLarge
    from model.train.factory import build_scheduler

    def schedule(kind, warmup, total):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return build_scheduler(TrainConfigPretrainLarge(warmup_steps=warmup, lr_schedule=kind), opt,
                               total).lr_lambdas[0]

    f = schedule('cosine', 10, 110)  # transformers' schedules: linear warmup from 0 to the peak at step 10
    assert f(0) == 0.0 and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0, abs=1e-9)
    assert schedule('linear', 10, 110)(60) == pytest.approx(0.5)
    assert schedule('constant', 0, 100)(99) == 1.0


def test_warmup_ratio_replaces_warmup_steps_and_scales_with_the_run():
    from config import TrainConfigPretrainLarge
    from model.net.sizing import warmup_steps_of
    from model.train.factory import build_scheduler

    def peak_step(total, **fields):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        f = build_scheduler(TrainConfigPretrainLarge(lr_schedule='constant', **fields), opt, total).lr_lambdas[0]
        return next(step for step in range(total + 1) if f(step) == 1.0)

    assert peak_step(200, warmup_steps=50, warmup_ratio=0.0) == 50  # 0: warmup_steps as given
    assert peak_step(200, warmup_steps=50, warmup_ratio=0.05) == 10  # > 0: a fraction, warmup_steps ignored
    assert peak_step(2000, warmup_steps=50, warmup_ratio=0.05) == 100
    assert warmup_steps_of(1024, 0.05, 101) == 6  # rounded up, as transformers' warmup_ratio


@pytest.mark.parametrize('scale', [False, True])
def test_adafactor_parameter_scaling_follows_the_flag(scale):
    from config import TrainConfigPretrainLarge
    from model.train.factory import build_optimizer

    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(TrainConfigPretrainLarge(optimizer='adafactor', adafactor_scale_parameter=scale), model)
    assert opt.defaults['scale_parameter'] is scale and opt.defaults['relative_step'] is False


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    from model.train.run_support import cpu_supports_bf16

    def cpu(flags):
        (tmp_path / 'cpuinfo').write_text(f'processor\t: 0\nflags\t\t: fpu sse2 {flags}\n\n')
        return cpu_supports_bf16(str(tmp_path / 'cpuinfo'))

    assert cpu('avx2 avx512f avx512_bf16') and cpu('amx_tile amx_bf16')
    assert not cpu('avx2 avx512f avx512_vnni') and not cpu_supports_bf16(str(tmp_path / 'none'))


def test_precision_fallback_on_cpu_without_bf16(monkeypatch):
    from model.train import run_support as trainer

    monkeypatch.setattr(trainer, 'cpu_supports_bf16', lambda: False)
    precision, warning = trainer.resolve_precision('bf16', use_cpu=True)
    assert precision == 'no' and 'fp32' in warning
    monkeypatch.setattr(trainer, 'cpu_supports_bf16', lambda: True)
    assert trainer.resolve_precision('bf16', use_cpu=True) == ('bf16', None)
    assert trainer.resolve_precision('fp16', use_cpu=True)[0] == 'no'
    assert trainer.resolve_precision('no', use_cpu=True) == ('no', None)


def test_a_stop_that_would_outlast_the_grace_period_is_warned():
    from model.train.trainer import stop_outlasts_grace

    assert stop_outlasts_grace(10, 7.0, 2.0) is None  # a step and a save: 9 s, within
    text = stop_outlasts_grace(10, 9.0, 2.0)  # 11 s: a SIGKILL could cut the save
    assert 'stop_grace_s=10' in text and '--signal=B:TERM@' in text and '--save_steps' in text


def test_loss_at_init_is_about_ln_vocab(tokenizer):
    from config import T5ModelConfig
    from model.net.chat_model import build_model
    torch.manual_seed(0)
    model = build_model(T5ModelConfig(d_model=32, num_heads=2, d_kv=16, d_ff=64, num_layers=1,
                                      num_decoder_layers=1, dropout_rate=0.0), len(tokenizer))
    labels = torch.tensor(tokenizer(['今天天气很好'] * 4)['input_ids'])
    inputs = torch.tensor(tokenizer(['你好，世界'] * 4)['input_ids'])
    decoder_inputs = model.prepare_decoder_input_ids_from_labels(labels=labels)
    assert (decoder_inputs[:, 0] == 0).all() and torch.equal(decoder_inputs[:, 1:], labels[:, :-1])
    padded = model.prepare_decoder_input_ids_from_labels(labels=torch.tensor([[5, 6, -100, -100]]))
    assert padded.tolist() == [[0, 5, 6, 0]]  # the label pad becomes the pad id
    with torch.no_grad():
        logits = model(input_ids=inputs, decoder_input_ids=decoder_inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    assert abs(loss.item() - math.log(len(tokenizer))) < 0.75  # 6.44 vs ln 1100 = 7.00 here: near uniform


# --- end to end -------------------------------------------------------------

@pytest.mark.slow
def test_end_to_end_writes_models_states_and_logs(data, tmp_path):
    out = tmp_path / 'run'
    flags = tiny_flags(data, out, save_steps=4, mixed_precision='bf16', epochs=2)
    r = run_train(flags)
    assert r.returncode == 0, r.stderr[-3000:]
    total = 480 // 8 * 2
    logs = glob.glob(f'{out}/logs/chat_trainer_low_mem_*.log')
    assert len(logs) == 1
    text = open(logs[0], encoding='utf-8').read()
    assert f'step {total}/{total}' in text
    assert 'validation loss' in text and 'BLEU-4' in text
    if not __import__('model.train.run_support', fromlist=['x']).cpu_supports_bf16():
        assert 'mixed_precision=bf16 is not supported natively' in text  # fp32 fallback, logged
    assert re.search(r'samples/s \| \d+ tokens/s \| \d+% filled \| eta', text)
    # keep_latest_n_ckp=2 step files, plus best; HF folders load
    steps = sorted(int(re.search(r'\.(\d+)\.bin$', p).group(1)) for p in glob.glob(f'{out}/chat_small_t5.*.bin')
                   if re.search(r'\.\d+\.bin$', p))
    assert steps == [116, total]
    assert os.path.isfile(f'{out}/chat_small_t5.best.bin')
    states = state_folders(f'{out}/state')
    assert states == ['state-000000116', f'state-{total:09d}']
    from transformers import T5ForConditionalGeneration

    for name in ('best', 'final'):
        T5ForConditionalGeneration.from_pretrained(f'{out}/{name}')
    losses = logged_losses(out)
    assert sorted(losses) == list(range(1, total + 1))
    assert losses[total] < losses[1]


def test_intervals_longer_than_the_run_are_noted_by_the_dry_run_and_the_log_and_what_it_does_instead(data, tmp_path):
    """480 rows, 32 a step: 15 optimizer steps an epoch, 30 in all. --eval_steps=100 and
    --save_steps=100 never come round: the run evaluates at each epoch's end (step 15) and its last
    step (30), and saves its state at its end only -- as the notes say, in the dry run and the log."""
    out = tmp_path / 'run'
    flags = tiny_flags(data, out, batch_size_per_gpu=32, epochs=2, eval_steps=100, save_steps=100)
    said = ["--eval_steps=100 is more than the run's 30 optimizer steps, so it never comes round: it evaluates only "
            "at the end of each epoch and at its last step, as with --eval_steps=0; e.g. --eval_steps=7",
            "--save_steps=100 is more than the run's 30 optimizer steps, so it never comes round: it saves its state "
            "only at its end or when a signal stops it (a crash before then loses every step); e.g. --save_steps=7"]
    dry = run_train(flags, '--dry_run=True')
    assert dry.returncode == 0 and all(f'note: {note}\n' in dry.stdout for note in said), dry.stdout
    r = run_train(flags)
    assert r.returncode == 0, r.stderr[-3000:]
    (log,) = glob.glob(f'{out}/logs/chat_trainer_low_mem_*.log')
    text = open(log, encoding='utf-8').read()
    assert all(f'WARNING {note}' in text or f' {note}\n' in text for note in said), text[:3000]
    assert re.findall(r'eval at step (\d+)', text) == ['15', '30']
    assert state_folders(f'{out}/state') == ['state-000000030']


def test_nan_loss_stops_and_keeps_the_last_good_state(data, tmp_path):
    out = tmp_path / 'run'
    r = run_train(tiny_flags(data, out, learn_rate=1e9, max_grad_norm=0, warmup_steps=0, save_steps=1,
                             logging_steps=5, optimizer='adamw'))
    assert r.returncode == 1, r.stderr[-3000:]
    m = re.search(r'loss became NaN/inf at optimizer step (\d+)', r.stderr)
    assert m, r.stderr[-3000:]
    bad = int(m.group(1))
    for p in glob.glob(f'{out}/state/state-*'):
        assert int(p.rsplit('-', 1)[1]) < bad
        for v in weights(f'{p}/model.safetensors').values():
            assert torch.isfinite(v).all()
    for p in glob.glob(f'{out}/chat_small_t5.*.bin'):
        for v in weights(p).values():
            assert torch.isfinite(v).all()
    assert 'aux_learn_rate' not in r.stderr  # one group: the advice names only what the run has
    # the --aux_learn_rate group alone diverging: the advice names it too
    r = run_train(tiny_flags(data, tmp_path / 'aux', learn_rate=1e-3, aux_learn_rate=1e9, max_grad_norm=0,
                             warmup_steps=0, save_steps=1, logging_steps=5, optimizer='adamw'))
    assert r.returncode == 1 and 'Try a lower --learn_rate (now 0.001), a lower --aux_learn_rate (now 1000000000.0)' \
        in r.stderr, r.stderr[-3000:]


def test_resume_refuses_changed_shape_missing_state_and_changed_data(data, tmp_path):
    out = tmp_path / 'run'
    r = run_train(tiny_flags(data, out), '--is_keep_training=True')
    assert r.returncode == 2 and 'no complete saved state' in r.stderr
    assert run_train(tiny_flags(data, out, max_steps=10)).returncode == 0
    r = run_train(tiny_flags(data, out, d_ff=128), '--is_keep_training=True')
    assert r.returncode == 2 and ('different model shape (d_ff: saved 64 -> now 128); resume with the same shape: '
                                  '--d_ff=64, or') in r.stderr
    other = write_parquet(tmp_path / 'other.parquet', make_texts(240, seed=99))
    r = run_train(tiny_flags(data, out, train_file=other), '--is_keep_training=True')
    assert r.returncode == 2 and '--allow_data_change=True' in r.stderr


def test_fresh_run_archives_instead_of_overwriting(data, tmp_path):
    out = tmp_path / 'run'
    assert run_train(tiny_flags(data, out, max_steps=10)).returncode == 0
    first = weights(f'{out}/chat_small_t5.10.bin')
    assert run_train(tiny_flags(data, out, max_steps=5, seed=8)).returncode == 0
    archived = glob.glob(f'{out}/previous_runs/*/chat_small_t5.10.bin')
    assert len(archived) == 1
    assert all(torch.equal(first[k], v) for k, v in weights(archived[0]).items())
    assert glob.glob(f'{out}/previous_runs/*/state/state-000000010/chat_small_t5.json')
    assert state_folders(f'{out}/state') == ['state-000000005']


@pytest.mark.slow
def test_two_ranks_equal_one_rank_and_accumulation(data, tmp_path):
    common = {'dropout_rate': 0.0, 'group_by_length': False, 'max_steps': 12, 'save_steps': 12}
    one = tmp_path / 'one_b8'
    r = run_train(tiny_flags(data, one, batch_size_per_gpu=8, **common))
    assert r.returncode == 0, r.stderr[-3000:]
    acc = tmp_path / 'one_b4_acc2'
    r = run_train(tiny_flags(data, acc, batch_size_per_gpu=4, gradient_accumulation_steps=2, **common))
    assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / 'two_b4'
    r = torchrun(tiny_flags(data, two, batch_size_per_gpu=4, **common), 2)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert '2 process(es)' in open(glob.glob(f'{two}/logs/*.log')[0]).read()
    base = logged_losses(one)
    for other in (acc, two):
        losses = logged_losses(other)
        assert sorted(losses) == sorted(base)
        for s in base:
            assert abs(losses[s] - base[s]) < 1e-4, (other.name, s, losses[s], base[s])
        assert_same_weights(f'{one}/chat_small_t5.12.bin', f'{other}/chat_small_t5.12.bin', atol=1e-4)


@pytest.mark.slow
def test_start_script_checks_inputs_and_launches_on_cpu(data, tmp_path):
    env = cli_runner.script_env({**ENV, 'PATH': '/usr/bin:/bin'})  # no nvidia-smi on this PATH
    missing = subprocess.run(['bash', 'start_pretrain_large.sh', f'--train_file={tmp_path}/none.parquet'],
                             cwd=ROOT, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                             timeout=120)
    assert missing.returncode == 1, missing.stderr
    assert 'train_file:' in missing.stderr and 'no such file' in missing.stderr
    assert 'python prepare_data.py convert' in missing.stderr
    out = tmp_path / 'run'
    r = subprocess.run(['bash', 'start_pretrain_large.sh', *tiny_flags(data, out, max_steps=4)], cwd=ROOT,
                       env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'no GPU found' in r.stderr and '4 optimizer steps' in r.stdout
    assert os.path.isfile(f'{out}/chat_small_t5.4.bin')
    bad = subprocess.run(['bash', 'start_pretrain_large.sh', '--batch_size_per_gpu=abc'], cwd=ROOT, env=env,
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert bad.returncode == 2 and 'expected an integer for batch_size_per_gpu' in bad.stderr



def test_a_requeued_job_that_finds_no_state_says_so_before_it_starts_over(data, tmp_path):
    """A requeue (SLURM_RESTART_COUNT > 0) whose output link now points at an empty folder trained
    from step 0 without a word; a first start, or a requeue that finds its state, says nothing."""
    env = cli_runner.script_env({**ENV, 'PATH': '/usr/bin:/bin', 'RESUME': 'auto', 'NUM_GPUS': '0'})
    out = tmp_path / 'run'
    script = ['bash', 'start_pretrain_large.sh', *tiny_flags(data, out, save_steps=2, eval_steps=100)]

    def start(steps, extra=(), **variables):
        r = subprocess.run(script + [f'--max_steps={steps}', *extra], cwd=ROOT, env={**env, **variables},
                           capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stderr

    assert 'finds no saved state' not in start(2)  # a first start
    assert 'finds no saved state' not in start(4, SLURM_RESTART_COUNT='1')  # a requeue that resumes
    # one that resumes as told (--is_keep_training=True: the script does not look for the state itself)
    said = start(5, SLURM_RESTART_COUNT='1', extra=['--is_keep_training=True'])
    assert 'finds no saved state' not in said, said
    shutil.rmtree(out)  # the scratch behind the link is another, empty one
    said = start(2, SLURM_RESTART_COUNT='2')
    assert 'warning: this job was restarted 2 time(s)' in said and 'trains from step 0' in said, said


def test_the_start_script_with_resume_auto_resumes_where_only_a_fresh_run_is_refused(data, tmp_path):
    """A requeue (RESUME=auto) checked a fresh run first and stopped at what only a fresh run meets
    (an earlier state it cannot move aside: damaged), though the newest state resumed fine; and
    --is_keep_training=False beside RESUME=auto started afresh at every requeue."""
    env = cli_runner.script_env({**ENV, 'PATH': '/usr/bin:/bin', 'RESUME': 'auto', 'NUM_GPUS': '0'})
    out = tmp_path / 'run'
    flags = tiny_flags(data, out, save_steps=2, keep_latest_n_ckp=2, eval_steps=100)
    assert run_train(flags, '--max_steps=6').returncode == 0
    os.remove(out / 'state' / 'state-000000004' / 'counters.json')  # the older state damaged
    script = ['bash', 'start_pretrain_large.sh', *flags]
    r = subprocess.run(script + ['--max_steps=8'], cwd=ROOT, env=env, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'note: a fresh run would not be ready:' in r.stderr and 'state-000000004' in r.stderr
    log = open(sorted(glob.glob(f'{out}/logs/*.log'))[-1], encoding='utf-8').read()
    assert 'resumed from' in log and 'state-000000006' in log and 'step 8/8' in log
    spellings = (['--is_keep_training=False'], ['--is_keep_training', 'no'], ['--is-keep-training=false'],
                 ['--nois_keep_training'], ['--is_keep_training=00'])  # as the trainer's own parser reads them
    cases = [*spellings, ['--dry_run', 'True'], ['--is_keep_training=None']]
    procs = [subprocess.Popen(script + extra, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, stdin=subprocess.DEVNULL) for extra in cases]  # start-up dominates: at once
    (*refused, dry, none) = [(p, *p.communicate(timeout=180)) for p in procs]
    for spelling, (p, _, err) in zip(spellings, refused):
        assert p.returncode == 2 and 'given as false with RESUME=auto: every requeue of this job would start afresh' \
            in err, (spelling, err[-1000:])
    p, out_, _ = dry  # the user's own check: of the resume it would run
    assert p.returncode == 0 and 'this command would resume it; the check of that resume:' in out_
    assert 'path.resume_from=' in out_ and 'state-000000008' in out_, out_[-2000:]
    p, _, err = none  # Fire's None is a value, never "not given"
    assert p.returncode == 2 and 'expected true or false for is_keep_training' in err, err[-1000:]
    assert not os.path.exists(out / 'previous_runs')  # nothing moved aside


def start_script(args: list, env: dict, answer: bytes | None = None) -> subprocess.Popen:
    """The start script, started (several run at once: their start-up checks dominate); with
    ``answer``, on a terminal (it asks only there) that answers it."""
    stdin = subprocess.DEVNULL
    if answer is not None:
        controller, stdin = os.openpty()
        os.write(controller, answer)
    proc = subprocess.Popen(['bash', 'start_pretrain_large.sh', *args], cwd=ROOT, env=env, stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if answer is not None:
        proc.terminal = (controller, stdin)  # closed by finished()
    return proc


def finished(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=300)
    for fd in getattr(proc, 'terminal', ()):
        os.close(fd)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_the_start_script_with_resume_auto_checks_the_resume_it_runs(data, tmp_path):
    """A fresh run was ready but the resume RESUME=auto runs was not (the model's shape changed): the
    script went on, and the trainer refused it only after the launcher had started every rank. On
    a terminal (RESUME=ask) the question offered that resume, and refused its own default answer."""
    env = cli_runner.script_env({**ENV, 'PATH': '/usr/bin:/bin', 'RESUME': 'auto', 'NUM_GPUS': '0'})
    ask = {**env, 'RESUME': 'ask'}
    out = tmp_path / 'run'
    flags = tiny_flags(data, out, save_steps=2, eval_steps=100)
    assert run_train(flags, '--max_steps=2').returncode == 0
    logs = sorted(glob.glob(f'{out}/logs/*.log'))
    changed = [('--d_ff=96' if a.startswith('--d_ff=') else a) for a in flags]
    auto, *asked = [finished(p) for p in [start_script([*changed, '--max_steps=4'], env),
                                          start_script([*changed, '--max_steps=4'], ask, b'\n')]]
    assert auto.returncode == 1, auto.stderr[-3000:]
    assert 'not ready as a resume of the saved state (' in auto.stderr and 'RESUME=auto resumes' in auto.stderr
    assert 'd_ff: saved 64 -> now 96' in auto.stderr and 'same shape: --d_ff=64' in auto.stderr, auto.stderr[-2000:]
    assert 'not ready as a fresh run' not in auto.stderr
    for r in asked:  # the resume's reasons first, and a fresh run offered instead, no by default
        assert r.returncode == 1, r.stderr[-3000:]
        assert 'note: the saved state (' in r.stderr and 'cannot be resumed:' in r.stderr
        assert 'd_ff: saved 64 -> now 96' in r.stderr and 'Start afresh, moving it to previous_runs/?' in r.stderr
        assert '要从头训练' in r.stderr and '[y/N]' in r.stderr
        assert 'Resume it?' not in r.stderr and 'nothing started' in r.stderr
    assert sorted(glob.glob(f'{out}/logs/*.log')) == logs  # nothing started
    assert not os.path.exists(out / 'previous_runs')  # nothing moved aside (a fresh run would have)
    # both ready: the question (in both languages), a resume by default; what a fresh run moves is the question's
    r = finished(start_script([*flags, '--max_steps=6'], ask, b'\n'))
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'Resume it? (n: start afresh, moving it to previous_runs/)' in r.stderr and '要续训吗' in r.stderr
    assert 'note: a previous run saved' not in r.stdout + r.stderr and not os.path.exists(out / 'previous_runs')
    assert 'step 6/6' in open(sorted(glob.glob(f'{out}/logs/*.log'))[-1], encoding='utf-8').read()
    r = finished(start_script([*changed, '--max_steps=4'], ask, '是\n'.encode()))  # answered in the question's Chinese
    assert r.returncode == 0 and os.path.isdir(out / 'previous_runs'), r.stderr[-3000:]  # afresh, as answered


def test_the_start_script_names_the_signal_that_ended_its_launcher(data, tmp_path):
    """A launcher killed by SIGKILL: its ranks are sent SIGTERM by the kernel and cannot tell what
    ended it (their logs say their launcher ended); the start script, which waits for it, can: it
    names SIGKILL, not SIGTERM, and exits with the launcher's code."""
    launcher = tmp_path / 'accelerate'
    # a launcher SIGKILLed from outside, its rank (here a stand-in) still saving: the script waited for nothing
    # (without RANK_OUTCOME_DIR's records) and returned while the rank saved; it now waits for it, then exits
    launcher.write_text('#!/bin/bash\n( sleep "$RANK_SAVES_S"; echo saved > "$MARK" ) &\nkill -KILL $$\n')
    launcher.chmod(0o755)
    env = {**ENV, 'PYTHON': sys.executable, 'NUM_GPUS': '2', 'ACCELERATE_USE_CPU': '1', 'ACCELERATE': str(launcher),
           'RANK_SAVES_S': '2', 'MARK': str(tmp_path / 'saved')}
    r = subprocess.run(['bash', 'start_pretrain_large.sh', *tiny_flags(data, tmp_path / 'run', max_steps=4)],
                       cwd=ROOT, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert r.returncode == 137, r.stderr[-3000:]
    assert f'warning: the launcher ({launcher} launch) was ended by SIGKILL (exit 137); each rank it had started saves ' \
           f'its last step and stops' in r.stderr, r.stderr[-3000:]
    assert 'SIGTERM' not in r.stderr
    assert 'note: the launcher has ended; waiting up to ' in r.stderr and (tmp_path / 'saved').exists(), r.stderr[-3000:]
    # one that outlasts the grace period is killed at its end, as torchrun would have; only its own: another
    # launch's rank (another mark) and a process without the mark live on
    others = [subprocess.Popen(['sleep', '60'], env={**ENV, **mark}) for mark in
              ({'CHAT_SMALL_T5_LAUNCH': 'another-host-1-2'}, {})]
    try:
        r = subprocess.run(['bash', 'start_pretrain_large.sh', *tiny_flags(data, tmp_path / 'run', max_steps=4)],
                           cwd=ROOT, env={**env, 'RANK_SAVES_S': '60', 'MARK': str(tmp_path / 'late'),
                                          'TORCH_ELASTIC_SHUTDOWN_TIMEOUT': '1'},
                           capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
        assert r.returncode == 137 and 'did not end within the grace period: killed' in r.stderr, r.stderr[-3000:]
        time.sleep(0.5)
        assert not (tmp_path / 'late').exists()
        assert [p.poll() for p in others] == [None, None]  # not this launch's: never waited for, never killed
        assert not any(str(p.pid) in r.stderr for p in others), r.stderr[-3000:]
    finally:
        for p in others:
            p.kill()
            p.wait()
    # a launcher that ends well (exit 0) saw its ranks end: a process one of them left on purpose (detached, the
    # mark inherited) is not a rank saving -- it was waited for the whole grace period, then killed
    launcher.write_text('#!/bin/bash\nsetsid sleep 60 </dev/null >/dev/null 2>&1 &\necho $! > "$MARK"\nexit 0\n')
    r = subprocess.run(['bash', 'start_pretrain_large.sh', *tiny_flags(data, tmp_path / 'run', max_steps=4)],
                       cwd=ROOT, env={**env, 'MARK': str(tmp_path / 'detached')}, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=300)
    detached = int((tmp_path / 'detached').read_text())
    try:
        assert r.returncode == 0 and 'waiting up to' not in r.stderr, r.stderr[-3000:]
        os.kill(detached, 0)  # alive
    finally:
        os.kill(detached, signal.SIGKILL)


@pytest.mark.slow
def test_start_script_launches_two_processes_with_accelerate(data, tmp_path):
    """NUM_GPUS=2 takes the guide's `accelerate launch --multi_gpu` path (on CPU here)."""
    env = {**ENV, 'PYTHON': sys.executable, 'NUM_GPUS': '2', 'ACCELERATE_USE_CPU': '1'}
    out = tmp_path / 'run'
    r = subprocess.run(['bash', 'start_pretrain_large.sh',
                        *tiny_flags(data, out, max_steps=4, batch_size_per_gpu=4)],
                       cwd=ROOT, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    log = open(glob.glob(f'{out}/logs/*.log')[0], encoding='utf-8').read()
    assert '2 process(es)' in log and 'step 4/4' in log


def test_the_logged_learning_rate_is_the_one_each_step_used(tmp_path, data):
    # warmup from 0 over 1 step: step 1 is taken at rate 0, step 2 at the peak (the rate after the
    # scheduler's step would read one step ahead: the peak at step 1)
    from conftest import run_logs, tiny_flags

    out = tmp_path / 'run'
    r = run_train(tiny_flags(data, out, max_steps=2, warmup_steps=1, learn_rate=3e-3, logging_steps=1, save_steps=2))
    assert r.returncode == 0, r.stderr[-2000:]
    log = open(run_logs(out)[-1], encoding='utf-8').read()
    rates = dict(re.findall(r'step (\d+)/2 \| .*? \| lr ([0-9.e+-]+)', log))
    assert rates == {'1': '0.000e+00', '2': '3.000e-03'}, rates


def test_perplexity_is_printed_as_it_is_not_capped():
    """exp(loss), one rule for the log and `test`: an untrained model's loss of 61.43 printed
    perplexity 5184705528587072045056.00, exp(50), as if exact."""
    import math

    from model.train.evaluation import EvalResult
    from model.use.scoring import TestResult

    for loss, shown in ((0.0403, '1.04'), (61.43, f'{math.exp(61.43):.3g}'), (800.0, 'inf')):
        assert f'(ppl {shown})' in EvalResult(loss=loss).describe(1)
        assert f'| perplexity {shown} |' in TestResult(10, 0, loss, 0.0, 0.0, 'p.jsonl').describe()
    assert f'{math.exp(61.43):.3g}' == '4.77e+26'


def test_the_start_scripts_questions_take_whole_words_of_either_language():
    """Answers were matched by their first letter: 是不是 ("is it?") or 好不 started afresh, moving the
    state aside, and 要 ("yes" to 要从头训练吗) was taken as no. Whole words now; others: the default."""
    script = open(f'{ROOT}/start_pretrain_large.sh', encoding='utf-8').read()
    function = re.search(r'^yes_or_no\(\) \{.*?^\}$', script, re.S | re.M).group(0)
    cases = {'y': 'y', 'Yes': 'y', ' 是 ': 'y', '是的': 'y', '要': 'y', '好': 'y', 'n': 'n', 'NO': 'n', '否': 'n',
             '不要': 'n', '不': 'n', '': 'DEFAULT', '是不是': 'DEFAULT', '好不': 'DEFAULT', '不知道': 'DEFAULT', 'x': 'DEFAULT'}
    for default in ('y', 'n'):
        for answer, meant in cases.items():
            r = subprocess.run(['bash', '-c', f'{function}\nyes_or_no "$1" {default}', '_', answer],
                               capture_output=True, text=True)
            assert r.stdout.strip() == (default if meant == 'DEFAULT' else meant), (answer, default, r.stdout)
            assert ('not understood' in r.stderr) == (meant == 'DEFAULT' and answer != ''), (answer, r.stderr)


def test_a_batch_job_of_the_start_script_resumes_and_never_restarts_over_an_earlier_run(data, tmp_path):
    """Without a terminal (a batch job, its requeues) RESUME's default, ask, started afresh over a
    saved state, moving the job's progress aside at every requeue: it now resumes, the question's
    own default. And a resume that finds no state while the output holds an earlier run (its states
    behind a link to node-local scratch this node lacks) stops instead of starting over at step 0."""
    env = cli_runner.script_env({**ENV, 'PATH': '/usr/bin:/bin', 'NUM_GPUS': '0'})
    out, scratch = tmp_path / 'run', tmp_path / 'scratch'
    os.makedirs(scratch / 'states')
    os.makedirs(out)
    os.symlink(scratch / 'states', out / 'state')
    flags = tiny_flags(data, out, save_steps=2, eval_steps=100)
    assert run_train(flags, '--max_steps=2').returncode == 0
    r = finished(start_script([*flags, '--max_steps=4'], env))  # no RESUME, stdin not a terminal
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'there is no terminal to ask on: resuming it' in r.stderr
    log = open(sorted(glob.glob(f'{out}/logs/*.log'))[-1], encoding='utf-8').read()
    assert 'resumed from' in log and 'step 4/4' in log and not os.path.exists(out / 'previous_runs')
    shutil.rmtree(scratch / 'states')  # requeued onto a node whose scratch lacks the run's folder
    logs = sorted(glob.glob(f'{out}/logs/*.log'))
    for extra in ({}, {'RESUME': 'auto'}):
        r = finished(start_script([*flags, '--max_steps=6'], {**env, **extra}))
        assert r.returncode == 1, r.stderr[-3000:]
        assert 'holds none, while' in r.stderr and 'a fresh run would move aside, starting over at step 0' in r.stderr
        assert 'RESUME=no' in r.stderr and 'note: a previous run saved' in r.stderr, r.stderr[-2000:]
    # on a terminal (RESUME=ask): asked, with why it may be, no by default (it started over at step 0 unasked)
    r = finished(start_script([*flags, '--max_steps=6'], env, b'\n'))
    assert r.returncode == 1 and 'nothing started' in r.stderr, r.stderr[-3000:]
    assert 'holds an earlier run (if its states lie on storage this machine lacks' in r.stderr and '[y/N]' in r.stderr
    assert '要从头训练' in r.stderr and 'note: a previous run saved' in r.stderr, r.stderr[-3000:]
    assert sorted(glob.glob(f'{out}/logs/*.log')) == logs and not os.path.exists(out / 'previous_runs')
    r = finished(start_script([*flags, '--max_steps=2'], {**env, 'RESUME': 'no'}))  # afresh, as asked
    assert r.returncode == 0 and os.path.isdir(out / 'previous_runs'), r.stderr[-3000:]


def test_aux_learn_rate_trains_resumes_exactly_and_a_change_of_its_groups_is_refused(data, tmp_path):
    """--aux_learn_rate: a run stopped by SIGTERM mid-run resumes to the uninterrupted run's weights
    bit for bit (the Adam group's state is saved and loaded); a resume that would turn the second
    group on or off is refused in the dry run, a changed rate is applied and said."""
    from conftest import run_logs, train_cmd

    aux = dict(optimizer='adafactor', adafactor_scale_parameter=True, learn_rate=3e-2, aux_learn_rate=0.05,
               save_steps=25, dropout_rate=0.0)
    whole, cut = tmp_path / 'whole', tmp_path / 'cut'
    assert run_train(tiny_flags(data, whole, **aux)).returncode == 0
    stopped = cli_runner.run(train_cmd(tiny_flags(data, cut, **aux)), cwd=ROOT, capture_output=True, text=True,
                             timeout=300, env={**ENV, 'CHAT_SMALL_T5_FAULT': 'train-step@12:sigterm'})
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    resumed = run_train(tiny_flags(data, cut, **aux), '--is_keep_training=True')
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_weights(f'{whole}/final/model.safetensors', f'{cut}/final/model.safetensors')
    # a resume of the finished run trains nothing and says so; plot joins the cut run's three logs (one per
    # start, one run id) into the uninterrupted run's curve, both rates in it
    again = run_train(tiny_flags(data, cut, **aux), '--is_keep_training=True')
    assert again.returncode == 0 and 'nothing left to train: the state resumed is at step' in again.stderr, \
        again.stderr[-2000:]
    from model.use import plotting

    starts = plotting.run_logs(f'{cut}/logs', run_logs(cut)[-1])
    assert len(starts) == 3 and len({plotting.run_id_of_log(p) for p in starts}) == 1, starts
    joined, unbroken = plotting.read_curves(starts), plotting.read_curves(run_logs(whole)[-1])
    assert joined.step == unbroken.step and (joined.lr, joined.aux_lr) == (unbroken.lr, unbroken.aux_lr), \
        (joined.step, unbroken.step)
    assert len(joined.aux_lr) == len(joined.step) > 10 and joined.eval_step == unbroken.eval_step
    # both groups' rates in the log, each on the schedule: warmup 5 steps from 0, so step 1 runs at 0
    log = open(run_logs(whole)[-1], encoding='utf-8').read()
    rates = re.findall(r'step (\d+)/\d+ \| .*? \| lr ([0-9.e+-]+) \| aux_lr ([0-9.e+-]+) \|', log)
    assert rates[0] == ('1', '0.000e+00', '0.000e+00') and len(rates) >= 20, rates[:3]
    assert all(abs(float(aux) / float(lr) - 0.05 / 3e-2) < 1e-3 for _, lr, aux in rates if float(lr)), rates
    off = run_train(tiny_flags(data, cut, **{**aux, 'aux_learn_rate': 0}), '--is_keep_training=True', '--dry_run=True')
    assert off.returncode != 0 and '--aux_learn_rate=0.0 but the saved run trained with aux_learn_rate=0.05' in \
        off.stdout + off.stderr, (off.stdout + off.stderr)[-2000:]
    changed = run_train(tiny_flags(data, cut, **{**aux, 'aux_learn_rate': 0.02}), '--is_keep_training=True',
                        '--dry_run=True')
    assert changed.returncode == 0 and 'aux_learn_rate 0.05 -> 0.02' in changed.stdout + changed.stderr, \
        (changed.stdout + changed.stderr)[-2000:]
