"""model/README.md, the map a newcomer reads first, stays true to the files it maps."""

from __future__ import annotations

import os
import re

from conftest import ROOT

MODEL = os.path.join(ROOT, 'model')
ROW = re.compile(r'^\| (?:`(\w+)/`)? ?\| `([\w.]+)` \|.*\| (\d+) \|$')


def table_rows() -> dict[str, int]:
    """{model/<folder>/<file>: lines the table gives}; a folder is named on its first row only."""
    rows, folder = {}, None
    for line in open(os.path.join(MODEL, 'README.md'), encoding='utf-8'):
        m = ROW.match(line.rstrip('\n'))
        if m:
            folder = m.group(1) or folder
            rows[f'model/{folder}/{m.group(2)}'] = int(m.group(3))
    return rows


def test_the_file_table_names_every_module_with_its_size():
    """Every module in model/'s six folders has its row, every row its file, and the line counts
    are near the files' own (within a tenth, or 20 lines): they had drifted to half of a file."""
    rows = table_rows()
    files = {f'model/{folder}/{name}' for folder in os.listdir(MODEL) if os.path.isdir(os.path.join(MODEL, folder))
             for name in os.listdir(os.path.join(MODEL, folder)) if name.endswith('.py') and name != '__init__.py'}
    assert sorted(files - set(rows)) == [], 'modules without a row in model/README.md'
    assert sorted(set(rows) - files) == [], 'rows of model/README.md without a module'
    off = {}
    for path, given in rows.items():
        actual = sum(1 for _ in open(os.path.join(ROOT, path), encoding='utf-8'))
        if abs(actual - given) > max(20, actual // 10):
            off[path] = (given, actual)
    assert not off, f'line counts in model/README.md (given, actual): {off}'


def test_pyflakes_finds_nothing_in_the_projects_python():
    """Unused imports, undefined names, shadowed variables: none in the faces, model/, bench/,
    scripts/ or tests/ (bench/ held two unused imports for sessions)."""
    import subprocess
    import sys

    places = ['config.py', 'train_low_mem.py', 'prepare_data.py', 'model', 'bench', 'scripts', 'tests']
    r = subprocess.run([sys.executable, '-m', 'pyflakes', *places], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout == '' and r.stderr == '', r.stdout + r.stderr
