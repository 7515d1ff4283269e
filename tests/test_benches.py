"""The benchmark scripts still run (a benchmark that rots is worse than none): each on a tiny
configuration, on the CPU."""

from __future__ import annotations

import json
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
