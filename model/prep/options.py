"""The options of prepare_data.py's commands: one dataclass per command, each field's comment
its --help line (as config.py does for training)."""

from __future__ import annotations

from dataclasses import dataclass

from config import PROJECT_ROOT


@dataclass
class ConvertOptions:
    """convert INPUT OUTPUT: CSV / TSV / JSON / JSONL / Parquet / .txt into prompt/response or raw-text Parquet."""

    input: str = ''  # CSV (or TSV, ;- or |-separated), JSON (a list of objects), JSONL, Parquet or .txt (one document a line) file to read
    output: str = ''  # Parquet file to write: a new path, or one this toolkit wrote
    prompt_col: str = 'prompt'  # the input's column (or JSON key) holding the prompt; renamed to prompt
    response_col: str = 'response'  # the input's column (or JSON key) holding the response; renamed to response
    text_col: str = ''  # raw text: the input's column (or JSON key) holding it, written as the one column text; not with --prompt_col/--response_col (.txt: none)
    format: str = ''  # csv | tsv | json | jsonl | parquet | txt (default: from the file extension; .tsv and .tab: tsv)
    quoting: str = 'csv'  # csv, tsv: csv = a value may be "quoted" ("" a quote inside, line breaks too) | none = a quote is text, a line one row (TSV exports of MySQL, Hive and the like)
    delimiter: str = ','  # csv: the one character between values, e.g. ; or | or a tab (written \t or tab; \xHH, \uHHHH, \NNN escapes too, e.g. Hive's \001); the default for tsv (.tsv, .tab) is a tab


@dataclass
class CleanOptions:
    """clean INPUT OUTPUT: drop null, empty/whitespace, over-long and duplicate rows (pairs or text)."""

    input: str = ''  # Parquet file, folder or glob to read
    output: str = ''  # Parquet file to write: a new path, or one this toolkit wrote
    max_chars: int = 0  # drop rows whose prompt or response (or text) has more characters (0 = no limit)
    dedup: bool = True  # drop repeated (prompt, response) pairs (or texts), keeping the first


@dataclass
class SplitOptions:
    """split INPUT --train_out=... --valid_out=...: a train and a validation file."""

    input: str = ''  # Parquet file, folder or glob to split
    train_out: str = ''  # Parquet file for the training rows (a new path, or one this toolkit wrote)
    valid_out: str = ''  # Parquet file for the validation rows (a new path, or one this toolkit wrote)
    valid_ratio: float = 0.1  # share of rows for validation, in (0, 1)
    seed: int = 42  # seeds the split
    max_in_memory_rows: int = 2_000_000  # up to this many rows sklearn's shuffled split; beyond, a streaming one


@dataclass
class CheckOptions:
    """check FILE: the quality report (shape, columns, head, nulls, blanks, duplicates, lengths)."""

    input: str = ''  # Parquet file, folder or glob to report on
    tokenizer_dir: str = ''  # with a tokenizer: token lengths and what max_seq_len truncates (sampled)
    max_seq_len: int = 192  # the training max_seq_len the truncation figures refer to


@dataclass
class DemoOptions:
    """demo: the built-in Chinese demo corpus (train.parquet and valid.parquet)."""

    out_dir: str = PROJECT_ROOT + '/data/demo'  # folder for train.parquet and valid.parquet
    rows: int = 40000  # rows in all (about 10% go to validation); streamed, any number
    seed: int = 42  # seeds the corpus
