"""prepare_data.py's commands: readers of CSV/JSON/JSONL/Parquet, clean/split/check, the
Parquet writer, the demo corpus and the commands' options."""
