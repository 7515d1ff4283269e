"""The benchmark scripts still run (a benchmark that rots is worse than none): each on a tiny
configuration, on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ENV, ROOT


@pytest.mark.slow
def test_bench_gpu_runs_on_the_cpu():
    tiny = json.dumps(dict(d_model=32, num_heads=2, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1))
    r = subprocess.run([sys.executable, 'bench/bench_gpu.py', '--device=cpu', '--steps=2', '--batch=4', '--max_len=256',
                        '--variants=eager', f'--model={tiny}', '--vocab=1000'], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.split('RESULT ', 1)[1])[0]
    assert result['variant'] == 'eager' and result['rows_per_s'] > 0 and 0 < result['mfu'] < result['padded_mfu']
    assert 0 < result['pad_fraction'] < 0.5 and result['steps'] == 2


def test_bench_resume_removes_only_its_own_work(tmp_path):
    """Its --dir is new or one it made (stamped); a user's folder, a link to one, or a link
    planted where it removes its copies is refused and left as it was."""
    import importlib.util

    spec = importlib.util.spec_from_file_location('bench_resume', f'{ROOT}/bench/bench_resume.py')
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    user = tmp_path / 'user'
    os.makedirs(user / 'resume')
    (user / 'resume' / 'thesis.txt').write_text('mine')
    os.symlink(user, tmp_path / 'link')
    for given in (user, tmp_path / 'link'):
        with pytest.raises(SystemExit, match='holds files this benchmark did not make'):
            bench.claim_work_dir(str(given))
    work = bench.claim_work_dir(str(tmp_path / 'work'))
    assert bench.claim_work_dir(work) == work  # its own folder again
    os.symlink(user / 'resume', f'{work}/resume')
    with pytest.raises(SystemExit, match='is a link this benchmark did not make'):
        bench.claim_work_dir(work)
    assert (user / 'resume' / 'thesis.txt').read_text() == 'mine' and not os.path.exists(user / bench.STAMP)
