"""Prepare prompt/response Parquet for pretraining (all logic in model/data_prep.py).

Examples:
    # CSV / JSON (a list of objects) / JSONL / Parquet -> Parquet, renaming the columns
    python prepare_data.py convert raw/qa.jsonl data/all.parquet --prompt_col=question --response_col=answer
    python prepare_data.py convert raw/qa.csv data/all.parquet
    python prepare_data.py convert raw/export.txt data/all.parquet --format=jsonl

    # drop null, empty, duplicate and over-long rows
    python prepare_data.py clean data/all.parquet data/clean.parquet --max_chars=2000

    # quality report; with a tokenizer also token lengths and what max_seq_len truncates
    python prepare_data.py check data/clean.parquet
    python prepare_data.py check data/clean.parquet --tokenizer_dir=model_save/my_tokenizer_sp/ --max_seq_len=192

    # 90% train / 10% validation
    python prepare_data.py split data/clean.parquet --train_out=data/pretrain_train_10m.parquet \\
        --valid_out=data/pretrain_valid_100k.parquet --valid_ratio=0.1 --seed=42

    # a small built-in Chinese corpus a tiny T5 learns on a CPU (data/demo/train.parquet, valid.parquet)
    python prepare_data.py demo

A mistake in the input (missing file or column, not UTF-8, malformed JSON)
prints one line, ``error: ...``, and exits with status 2.
"""

from __future__ import annotations

import sys

import fire

from config import UserError
from model import data_prep

COMMANDS = {
    'convert': data_prep.convert_command,
    'split': data_prep.split_command,
    'check': data_prep.check_command,
    'clean': data_prep.clean_command,
    'demo': data_prep.demo_command,
}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if any(a in ('-h', '--help') for a in args) and '--' not in args:
        # the commands take **flags (to name the nearest flag on a typo), which would
        # swallow --help; after '--' Fire reads it as its own flag
        args = [a for a in args if a not in ('-h', '--help')] + ['--', '--help']
    try:
        fire.Fire(COMMANDS, command=args, name='prepare_data.py')
    except UserError as e:
        # one line, whatever a library put into the message
        print(f"error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
