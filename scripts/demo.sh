#!/usr/bin/env bash
# The demo: built-in corpus -> tokenizer -> train the tiny model -> answer prompts -> score it.
# Extra flags go to `train`, e.g. bash scripts/demo.sh --epochs=2
source "$(dirname "$0")/env.sh"
$PY prepare_data.py demo
$PY train_low_mem.py train_tokenizer --preset=demo
$PY train_low_mem.py train --preset=demo "$@" --dry_run=True | sed -n '/^\[schedule\]/,/^  train rows/p; /^ready/p; /^not ready:/,$p'
$PY train_low_mem.py train --preset=demo "$@"
$PY train_low_mem.py generate --preset=demo
$PY train_low_mem.py test --preset=demo --max_test_rows=500
