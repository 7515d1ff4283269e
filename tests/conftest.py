"""Shared fixtures: everything is generated here, offline, in seconds."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys

import pytest

import cli_runner

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), 'shared', 'data')
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

_CHARS = ('的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面'
          '而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处队南给色光门即保治北造百规热领七海口东导器压志世金增争济阶油思术极交受联什认六共权收证改清己美再采转更单风切打白教速花带安场身车例真务具万每目至达走积示议声报斗完类八离华名确才科张信马节话米整空元况今集温传土许步群广石记需段研界拉林律叫且究观越织装影算低持音众书布复容儿须际商非验连断深难近矿千周委素技备半办青省列习响约支般史感劳便团往酸历市克何除消构府称太准精值号率族维划选标写存候毛亲快效斯院查江型眼王按格养易置派层片始却专状育厂京识适属圆包火住调满县局照参红细引听该铁价严')
_PUNCT = '，。！？、：；（）'


def make_texts(n: int, seed: int = 0, min_len: int = 4, max_len: int = 60) -> list[tuple[str, str]]:
    """Random Chinese-looking prompt/response pairs with punctuation, digits and Latin."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        def sentence(lo, hi):
            k = rng.randint(lo, hi)
            s = ''.join(rng.choice(_CHARS) for _ in range(k))
            if rng.random() < 0.5:
                s += rng.choice(_PUNCT)
            if rng.random() < 0.2:
                s += str(rng.randint(0, 9999))
            if rng.random() < 0.1:
                s += rng.choice(['abc', 'GPU', 'Python', 'T5'])
            return s
        out.append((sentence(min_len, max_len // 3), sentence(min_len, max_len)))
    return out


def write_parquet(path, pairs, row_group_size: int | None = None) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({'prompt': [p for p, _ in pairs], 'response': [r for _, r in pairs]})
    pq.write_table(table, str(path), row_group_size=row_group_size)
    return str(path)


def write_records(path, records: list[dict], fmt: str) -> str:
    """records as a prepare_data.py source: csv, json (multi-line, like real exports), jsonl or parquet."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(path)
    if fmt == 'csv':
        import pyarrow.csv as pcsv
        pcsv.write_csv(pa.Table.from_pylist(records), path)
    elif fmt == 'json':
        with open(path, 'w', encoding='utf-8') as f:
            json.dump(records, f, ensure_ascii=False, indent=2)
    elif fmt == 'jsonl':
        with open(path, 'w', encoding='utf-8') as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + '\n' for r in records)
    else:
        pq.write_table(pa.Table.from_pylist(records), path)
    return path


@pytest.fixture(scope='session')
def tokenizer_dir(tmp_path_factory) -> str:
    """A small real sentencepiece tokenizer trained on generated text."""
    from model.data.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp('tok')
    src = write_parquet(d / 'text.parquet', make_texts(3000, seed=1))
    out = str(d / 'tokenizer')
    train_tokenizer(src, out, vocab_size=1000, max_rows=10_000, num_threads=2)  # + 100 sentinels
    return out


def tokenizer_without_sentinels(tokenizer_dir, folder) -> str:
    """A copy of the tokenizer without T5's sentinels (as one trained before them), in folder."""
    import json

    os.makedirs(folder)
    spec = json.load(open(os.path.join(tokenizer_dir, 'tokenizer.json'), encoding='utf-8'))
    spec['added_tokens'] = [t for t in spec['added_tokens'] if not t['content'].startswith('<extra_id_')]
    with open(os.path.join(folder, 'tokenizer.json'), 'w', encoding='utf-8') as f:
        json.dump(spec, f)
    for name in ('tokenizer_config.json', 'special_tokens_map.json', '.chat_small_t5.json'):
        if os.path.exists(os.path.join(tokenizer_dir, name)):
            with open(os.path.join(tokenizer_dir, name), 'rb') as src, open(os.path.join(folder, name), 'wb') as dst:
                dst.write(src.read())
    return str(folder)


@pytest.fixture(scope='session')
def tokenizer(tokenizer_dir):
    from model.data.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


# --- the training CLI in a subprocess, on a tiny model (CPU, fp32) -----------

ENV = {**os.environ, 'HF_HUB_OFFLINE': '1', 'TOKENIZERS_PARALLELISM': 'false', 'OMP_NUM_THREADS': '1'}
STEP_RE = re.compile(r'step (\d+)/(\d+) \| epoch \d+ \| loss ([0-9.naninf]+)')


def write_data(d, tokenizer_dir) -> dict[str, str]:
    train = write_parquet(d / 'train.parquet', make_texts(480, seed=11, max_len=40), row_group_size=100)
    valid = write_parquet(d / 'valid.parquet', make_texts(64, seed=12, max_len=40))
    return {'train': train, 'valid': valid, 'tok': tokenizer_dir}


@pytest.fixture(scope='module')
def data(tmp_path_factory, tokenizer_dir):
    return write_data(tmp_path_factory.mktemp('data'), tokenizer_dir)


# Two CPU ranks, 120 optimizer steps (60 an epoch), evaluated every 20: long enough that a SIGTERM
# from outside lands mid-run on a loaded machine. The preemption and SLURM tests resume to it.
TWO_RANKS = {'epochs': 2, 'save_steps': 1000, 'batch_size_per_gpu': 4, 'eval_steps': 20, 'stop_grace_s': 60}
TWO_RANK_STEPS = 120


@pytest.fixture(scope='session')
def two_rank_reference(tmp_path_factory, tokenizer_dir):
    """(output folder, log text) of the uninterrupted two-rank run, on data equal to `data`'s. Read
    only. Under pytest-xdist the workers of one session share it: the first to need it runs it, a
    worker that needs it meanwhile waits, and one whose tokenizer differs in a byte runs its own."""
    import fcntl

    worker = os.environ.get('PYTEST_XDIST_WORKER')
    if not worker:
        return _two_rank_run(tmp_path_factory.mktemp('two_rank_reference'), tokenizer_dir)
    from model.data.tokenizer import tokenizer_fingerprint

    key = hashlib.sha256(tokenizer_fingerprint(tokenizer_dir).encode()).hexdigest()[:16]  # what a run checks
    # the session's base folder holds one folder per worker (popen-gw0, ...): its parent is this session's
    place = tmp_path_factory.getbasetemp().parent / f'two_rank_reference-{key}'
    with open(f'{place}.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the run fails
        if not (place / 'done').exists():
            shutil.rmtree(place, ignore_errors=True)  # what a failed run in another worker left
            place.mkdir()
            _two_rank_run(place, tokenizer_dir)
            (place / 'done').touch()
    out = place / 'run'
    return out, open(glob.glob(f'{out}/logs/*.log')[0], encoding='utf-8').read()


def _two_rank_run(folder, tokenizer_dir):
    (folder / 'data').mkdir()
    data, out = write_data(folder / 'data', tokenizer_dir), folder / 'run'
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        'train_low_mem.py', 'train', *tiny_flags(data, out, **TWO_RANKS)], cwd=ROOT,
                       env={**ENV, 'ACCELERATE_USE_CPU': '1'}, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return out, open(glob.glob(f'{out}/logs/*.log')[0], encoding='utf-8').read()


def tiny_flags(data, out, **extra) -> list[str]:
    flags = {
        'train_file': data['train'], 'validation_file': data['valid'], 'tokenizer_dir': data['tok'],
        'model_file': f'{out}/chat_small_t5.{{}}.bin', 'train_state_dir': f'{out}/state',
        'output_dir': f'{out}', 'log_dir': f'{out}/logs',
        'd_model': 32, 'num_heads': 2, 'd_kv': 16, 'd_ff': 64, 'num_layers': 1, 'num_decoder_layers': 1,
        'dropout_rate': 0.1, 'max_seq_len': 32, 'batch_size_per_gpu': 8, 'gradient_accumulation_steps': 1,
        'epochs': 1, 'learn_rate': 3e-3, 'optimizer': 'adamw', 'warmup_steps': 5, 'logging_steps': 1,
        'save_steps': 10, 'keep_latest_n_ckp': 2, 'mixed_precision': 'no', 'max_eval_rows': 32,
        'bleu_samples': 4, 'show_samples': 1, 'seed': 7,
    }
    flags.update(extra)
    return [f'--{k}={v}' for k, v in flags.items()]


def train_cmd(flags, *extra):
    return [sys.executable, 'train_low_mem.py', 'train', *flags, *extra]


def run_train(flags, *extra, timeout=300):
    return cli_runner.run(train_cmd(flags, *extra), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def run_logs(out) -> list[str]:
    """The training logs under out, oldest first. By time written, not by name: a run started in
    the same second as the previous one gets a suffix ('...-1.log') that sorts before its name."""
    return sorted(glob.glob(f'{out}/logs/chat_trainer_low_mem_*.log'), key=os.path.getmtime)


def logged_losses(out) -> dict[int, float]:
    losses = {}
    for log in run_logs(out):
        for m in STEP_RE.finditer(open(log, encoding='utf-8').read()):
            losses[int(m.group(1))] = float(m.group(3))
    return losses


def is_temp_name(name: str) -> bool:
    """A temporary name of the toolkit (model/state/writes.temp_path), or of a state save in progress."""
    return 'chat_small_t5-tmp' in name or name.startswith('.tmp-') or name.endswith('.tmp')


def leftover_temps(folder) -> list[str]:
    """Temporaries left anywhere under folder (hidden names included)."""
    found = []
    for root, dirs, files in os.walk(folder):
        found += [os.path.join(root, n) for n in dirs + files if is_temp_name(n)]
    return sorted(found)


def state_folders(state_dir) -> list[str]:
    return sorted(n for n in os.listdir(state_dir) if n.startswith('state-'))


def weights(path) -> dict:
    from model.state.model_files import load_weights_file

    return load_weights_file(str(path))


def assert_same_weights(a, b, atol=0.0):
    import torch

    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=atol, rtol=0), (k, (wa[k] - wb[k]).abs().max())


def torchrun(flags, nproc):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
           'train_low_mem.py', 'train', *flags]
    env = {**ENV, 'ACCELERATE_USE_CPU': '1'}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)


# the files that take longest, longest first (pytest --durations=0, summed by file: benches 200 s, trainer
# 193, preemption 144, slurm 130, nothing_lost 73 ...): the workers (--dist loadfile: a file on one) take
# files in this order, so none is left running a long file alone at the end. Within a file, the order is kept.
LONGEST_FIRST = ('test_benches.py', 'test_trainer.py', 'test_preemption.py', 'test_slurm.py', 'test_nothing_lost.py',
                 'test_user_surface.py', 'test_span_stream.py', 'test_engines.py', 'test_ownership.py')


def pytest_addoption(parser):
    parser.addoption('--bench_smoke', action='store_true',
                     help="only the benchmarks' whole quick runs (marked bench_smoke): the tier beside the suite")


def pytest_collection_modifyitems(config, items):
    # the benchmarks' whole runs are a tier of their own (benchmarks live outside the suite); CI runs both
    smoke = config.getoption('--bench_smoke')
    kept = [item for item in items if (item.get_closest_marker('bench_smoke') is not None) == smoke]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.path)), len(LONGEST_FIRST)))


def pytest_collection_finish(session):
    # the zygote imports on the other core while the first tests run
    modules = {getattr(item, 'module', None) for item in session.items}
    if any(hasattr(m, 'cli_runner') or hasattr(m, 'run_train') for m in modules):
        cli_runner.prestart(ENV)


def pytest_sessionfinish(session, exitstatus):
    cli_runner.close_all()


# --------------------------------------------------------------------------- the CLI as a user runs it


def cli(*args, script='train_low_mem.py', env=None, stdin=None, timeout=300):
    return cli_runner.run([sys.executable, script, *map(str, args)], cwd=ROOT, env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout, input=stdin)


def start(*args, script='train_low_mem.py'):
    return cli_runner.Popen([sys.executable, script, *map(str, args)], cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def snapshot(folder) -> dict[str, str]:
    """Every file under folder with a hash of its content (hidden files and .git included)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            with open(p, 'rb') as f:
                out[os.path.relpath(p, folder)] = hashlib.sha256(f.read()).hexdigest()
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), folder) + '/'] = 'dir'
    return out


def assert_user_error(r, *words):
    stderr = r.stderr if isinstance(r, subprocess.CompletedProcess) else r[1]
    code = r.returncode if isinstance(r, subprocess.CompletedProcess) else r[0]
    lines = [line for line in stderr.splitlines() if line.strip() and ' INFO ' not in line
             and ' WARNING ' not in line]
    assert code == 2, stderr[-3000:]
    assert 'Traceback' not in stderr, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith('error: '), stderr[-3000:]
    for word in words:
        assert word in lines[0], (word, lines[0])
    if os.environ.get('RECORD_USER_ERRORS'):  # the case -> line table of a release note
        with open(os.environ['RECORD_USER_ERRORS'], 'a', encoding='utf-8') as f:
            f.write(json.dumps({'test': os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0],
                                'words': words, 'line': lines[0]}, ensure_ascii=False) + '\n')
    return lines[0]


def run_parallel(cases):
    """[(name, args, script)] started at once (start-up dominates), -> {name: (code, stderr, stdout)}."""
    procs = {name: start(*args, script=script) for name, args, script in cases}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        out[name] = (proc.returncode, stderr, stdout)
    return out
