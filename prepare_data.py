"""Prepare prompt/response (or raw-text) Parquet for pretraining (the logic lives in model/prep/).

Examples:
    # CSV / TSV / JSON (a list of objects) / JSONL / Parquet -> Parquet, renaming the columns
    python prepare_data.py convert raw/qa.jsonl data/all.parquet --prompt_col=question --response_col=answer
    python prepare_data.py convert raw/qa.csv data/all.parquet
    python prepare_data.py convert raw/qa.tsv data/all.parquet    # or --delimiter='\\t' (';', '|', ...)
    python prepare_data.py convert raw/export.txt data/all.parquet --format=jsonl

    # raw text -> Parquet with one `text` column: a column of any format, or a .txt (one document a line)
    python prepare_data.py convert raw/wiki.jsonl data/wiki.parquet --text_col=content
    python prepare_data.py convert raw/news.txt data/news.parquet

    # drop null, empty, duplicate and over-long rows (clean, check and split take either kind)
    python prepare_data.py clean data/all.parquet data/clean.parquet --max_chars=2000

    # quality report; with a tokenizer also token lengths and what max_seq_len truncates
    python prepare_data.py check data/clean.parquet
    python prepare_data.py check data/clean.parquet --tokenizer_dir=model_save/my_tokenizer_sp/ --max_seq_len=192

    # 90% train / 10% validation
    python prepare_data.py split data/clean.parquet --train_out=data/pretrain_train_10m.parquet \\
        --valid_out=data/pretrain_valid_100k.parquet --valid_ratio=0.1 --seed=42

    # a small built-in Chinese corpus a tiny T5 learns on a CPU (data/demo/train.parquet, valid.parquet)
    python prepare_data.py demo

    # every option of a command, with its meaning
    python prepare_data.py convert --help

A mistake (missing file or column, not UTF-8, malformed JSON, an output that is an input or a
file this toolkit did not write) prints one line, ``error: ...``, and exits with status 2;
nothing existing is changed and no partial output is left. Ctrl-C or SIGTERM prints one line
(``stopped by SIGTERM: ... not written``) and exits 130 / 143, leaving no temporary behind.
"""

from __future__ import annotations

import inspect
import os
import signal
import sys

from model import stopping  # first: a signal from here on ends in one line, never a traceback
from model.cli import check_repeated_flags, format_options, keep_text, parse_options, quiet_on_broken_pipe, text_fields
from model.prep.options import CheckOptions, CleanOptions, ConvertOptions, DemoOptions, SplitOptions
from model.errors import UserError


def convert(*args, **flags):
    """Convert CSV (or TSV, or another --delimiter) / JSON (a list of objects) / JSONL / Parquet / .txt
    into prompt/response Parquet, or raw text (one `text` column: --text_col=..., a source with a
    text column and no prompt/response, or a .txt file, one document a line)."""
    from model.prep.ops import convert_file, n_rows

    o = parse_options(ConvertOptions, 'convert', args, flags, ('input', 'output'))
    stopping.watch_outputs(o.output)
    given = {name: getattr(o, name) if name in flags else None for name in ('prompt_col', 'response_col', 'text_col')}
    delimiter = o.delimiter if 'delimiter' in flags else None  # not given: the format's (a tab for .tsv)
    quoting = o.quoting if 'quoting' in flags else None  # given for a format without quotes: refused
    result = convert_file(o.input, o.output, input_format=o.format or None, delimiter=delimiter, quoting=quoting,
                          **given)
    skipped = f'; {result.blank_lines} blank line(s) skipped' if result.blank_lines else ''
    kind = 'prompt/response pairs' if result.kind == 'pairs' else 'raw text, one text column'
    print(f'wrote {n_rows(result.rows)} to {o.output} ({kind}{skipped})')
    for note in result.notes():
        print(f'note: {note}')


def clean(*args, **flags):
    """Drop null, empty/whitespace-only, over-long and duplicate rows (prints counts per reason)."""
    from model.prep.ops import clean_parquet, n_rows

    o = parse_options(CleanOptions, 'clean', args, flags, ('input', 'output'))
    stopping.watch_outputs(o.output)
    counts = clean_parquet(o.input, o.output, o.max_chars, o.dedup)
    print(f'read {n_rows(counts["rows"])}; dropped: null {counts["null"]}, empty/whitespace '
          f'{counts["blank"]}, too long {counts["too_long"]}, duplicate {counts["duplicate"]}')
    print(f'kept {n_rows(counts["kept"])} -> {o.output}')


def split(*args, **flags):
    """Split rows into a train and a validation file (sklearn's shuffled split up to
    max_in_memory_rows, a seeded streaming split beyond)."""
    from model.prep.ops import n_rows, split_parquet

    o = parse_options(SplitOptions, 'split', args, flags, ('input',), ('train_out', 'valid_out'))
    stopping.watch_outputs(o.train_out, o.valid_out)
    result = split_parquet(o.input, o.train_out, o.valid_out, o.valid_ratio, o.seed, o.max_in_memory_rows)
    print(f'train: {n_rows(result.train_rows)} -> {o.train_out}')
    print(f'valid: {n_rows(result.valid_rows)} -> {o.valid_out}')
    print(f'({result.method} split, seed {o.seed})')


def check(*args, **flags):
    """Quality report: shape, columns, head, nulls, blanks, duplicates, lengths (and tokens)."""
    from model.prep.ops import build_report, check_verdict, format_report

    o = parse_options(CheckOptions, 'check', args, flags, ('input',))
    if o.max_seq_len < 2:
        raise UserError(f'max_seq_len must be at least 2, got {o.max_seq_len}')
    if 'max_seq_len' in flags and not o.tokenizer_dir:
        raise UserError('check: --max_seq_len sets what the token figures refer to, and those need a tokenizer; '
                        'give --tokenizer_dir too')
    report = build_report(o.input, o.tokenizer_dir or None, o.max_seq_len)
    print(format_report(report), flush=True)
    check_verdict(report)  # after the report: what it says of the files, then why train would refuse them


def demo(*args, **flags):
    """Write the built-in Chinese demo corpus (train.parquet, valid.parquet; default data/demo/)."""
    from model.prep.demo_corpus import write_demo
    from model.prep.ops import n_rows

    o = parse_options(DemoOptions, 'demo', args, flags, ())
    stopping.watch_outputs(*(os.path.join(o.out_dir, name) for name in ('train.parquet', 'valid.parquet')))
    for path, count in write_demo(o.out_dir, o.rows, o.seed).items():
        print(f'wrote {n_rows(count)} to {path}')


COMMANDS = {'convert': (convert, ConvertOptions, 'INPUT OUTPUT'), 'clean': (clean, CleanOptions, 'INPUT OUTPUT'),
            'split': (split, SplitOptions, 'INPUT --train_out=TRAIN --valid_out=VALID'),
            'check': (check, CheckOptions, 'FILE'), 'demo': (demo, DemoOptions, '')}


def command_help(name: str) -> str:
    fn, options, usage = COMMANDS[name]
    return '\n'.join([f'usage: python prepare_data.py {name} {usage} [--option=value ...]'.replace('  ', ' '),
                      '', inspect.cleandoc(fn.__doc__ or ''), '', 'options (model/prep/options.py):', *format_options(options)])


def main(argv: list[str] | None = None) -> None:
    stopping.install()
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ('-h', '--help', 'help'):
        print((__doc__ or '').strip())
        print('\ncommands: ' + ', '.join(COMMANDS) + '   (python prepare_data.py COMMAND --help)')
        return
    if args[0] not in COMMANDS:
        print(f'error: unknown command {args[0]!r}: choose one of {", ".join(COMMANDS)}', file=sys.stderr)
        sys.exit(2)
    if any(a in ('-h', '--help') for a in args[1:]):
        print(command_help(args[0]))
        return
    try:
        import fire

        check_repeated_flags(args[1:])
        text = text_fields(CheckOptions, CleanOptions, ConvertOptions, DemoOptions, SplitOptions)  # paths, columns: as typed
        fire.Fire({name: spec[0] for name, spec in COMMANDS.items()}, command=[args[0], *keep_text(args[1:], text, True)],
                  name='prepare_data.py')
    except UserError as e:
        # one line, whatever a library put into the message
        print(f"error: {' '.join(str(e).splitlines())}", file=sys.stderr)
        sys.exit(2)
    except stopping.Stopped as e:  # the `finally` blocks on its way removed every temporary
        sys.exit(stopping.report(e))
    except KeyboardInterrupt:  # raised by a library itself rather than by the stop's handler
        sys.exit(stopping.report(stopping.stop_error(signal.SIGINT)))


if __name__ == '__main__':
    quiet_on_broken_pipe(main)
