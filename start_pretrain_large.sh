#!/usr/bin/env bash
# Check the data, the tokenizer and the GPUs, then launch pretraining.
#
#   ./start_pretrain_large.sh                              # the 10M-row config, every GPU
#   ./start_pretrain_large.sh --batch_size_per_gpu=24      # flags go to `train` unchanged
#   ./start_pretrain_large.sh --is_keep_training=True      # resume
#   NUM_GPUS=2 ./start_pretrain_large.sh                   # use 2 of the GPUs
#   ./start_pretrain_large.sh --preset=5m                  # another template instead of --use_large_config
#   ACCELERATE_CONFIG=configs/accelerate/fsdp.yaml ./start_pretrain_large.sh   # an engine: DDP, FSDP, DeepSpeed
#   RESUME=auto ./start_pretrain_large.sh                  # resume when a state exists (batch jobs)
#
# Exit code: the trainer's (0 done, 2 bad flag, 130/143 stopped and saved; with several
# GPUs accelerate reports any failure as 1), 1 if the dry run finds the run not ready
# (each problem is printed with the command or flag that fixes it). GPUs: NUM_GPUS, else CUDA_VISIBLE_DEVICES,
# else nvidia-smi.
set -uo pipefail
# no cd: relative paths in the flags mean what they mean where the user stands
HERE=$(cd "$(dirname "$0")" && pwd)
TRAIN="$HERE/train_low_mem.py"

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x "$HERE/.venv/bin/python" ]; then PY="$HERE/.venv/bin/python"; else PY=python3; fi
fi
ACCELERATE=${ACCELERATE:-$(dirname "$PY")/accelerate}
[ -x "$ACCELERATE" ] || ACCELERATE=accelerate

config_flags=(--use_large_config=True)
for arg in "$@"; do
  case "$arg" in --preset=*|--preset) config_flags=() ;; esac
done
# the user's own --dry_run: print the whole check and stop (this script runs one anyway)
user_dry=0
args=()
for arg in "$@"; do
  case "$arg" in
    --dry_run|--dry_run=[Tt]rue|--dry_run=1) user_dry=1 ;;
    --dry_run=*) ;;
    *) args+=("$arg") ;;
  esac
done
set -- "${args[@]}"

# GPUs first, so that the dry run's schedule counts the right number of processes
if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
  visible=$(printf '%s' "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
elif command -v nvidia-smi >/dev/null 2>&1; then
  visible=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
else
  visible=0
fi
gpus=$visible
if [ -n "${NUM_GPUS:-}" ]; then
  case "$NUM_GPUS" in
    *[!0-9]*) echo "error: NUM_GPUS=$NUM_GPUS: give a whole number of GPUs (0 = CPU)" >&2; exit 2 ;;
  esac
  gpus=$NUM_GPUS
fi

# an accelerate config file: checked (loads, fits the GPUs, multi-node settings) before anything runs
world=$(( gpus > 0 ? gpus : 1 ))
launch_args=()
if [ -n "${ACCELERATE_CONFIG:-}" ]; then
  facts=$(PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m model.launch_config "$ACCELERATE_CONFIG" "$gpus") || exit 2
  fact() { printf '%s\n' "$facts" | sed -n "s/^$1=//p"; }
  world=$(fact world_size)
  read -r -a launch_args <<< "$(fact launch_args)"
fi

# more GPUs asked for than there are (checked after the config, whose own checks say more)
case "${ACCELERATE_USE_CPU:-}" in
  1|[Tt]rue|[Yy]es) ;;   # CPU processes (gloo): as many as asked
  *) if [ "$gpus" -gt "$visible" ]; then
       if [ "$visible" -eq 0 ]; then fix="NUM_GPUS=0 for one CPU process"; else fix="NUM_GPUS<=$visible"; fi
       echo "error: NUM_GPUS=$gpus but $visible GPU(s) are visible; give $fix (or ACCELERATE_USE_CPU=1 for CPU processes)" >&2
       exit 2
     fi ;;
esac

report=$(NUM_GPUS=$world "$PY" "$TRAIN" train "${config_flags[@]}" "$@" --dry_run=True 2>&1)
rc=$?
if [ "$rc" -eq 2 ]; then echo "$report" >&2; exit 2; fi
if [ "$rc" -ne 0 ] && ! printf '%s\n' "$report" | grep -q '^not ready:'; then
  printf '%s\n' "$report" >&2   # the dry run itself failed: show why
  exit "$rc"
fi
if [ "$user_dry" -eq 1 ]; then printf '%s\n' "$report"; exit "$rc"; fi
path_of() { printf '%s\n' "$report" | sed -n "s/^  path\.$1=//p"; }

if [ "$rc" -ne 0 ]; then   # the dry run's checks are the trainer's own: not ready means it would fail
  printf '%s\n' "$report" | sed -n '/^not ready:/,$p' >&2
  exit 1
fi
printf '%s\n' "$report" | sed -n '/^\[schedule\]/,/^ready/p'

resume_given=0
for arg in "$@"; do case "$arg" in --is_keep_training*) resume_given=1 ;; esac; done
latest=$(path_of latest_state)
case "${RESUME:-ask}" in ask|auto|no) ;; *) echo "error: RESUME=$RESUME: give ask, auto or no" >&2; exit 2 ;; esac
if [ "$resume_given" -eq 0 ] && [ "$latest" != "none" ] && [ -n "$latest" ]; then
  if [ "${RESUME:-ask}" = auto ]; then
    set -- "$@" --is_keep_training=True
  elif [ "${RESUME:-ask}" = ask ] && [ -t 0 ]; then
    read -r -p "A saved state exists ($latest). Resume it? [Y/n] " ans
    case "${ans:-y}" in [nN]*) ;; *) set -- "$@" --is_keep_training=True ;; esac
  else
    echo "note: a saved state exists ($latest); a fresh run archives it. Pass --is_keep_training=True to resume." >&2
  fi
fi

if [ "$world" -le 1 ] && [ "${#launch_args[@]}" -eq 0 ]; then
  # one process needs no launcher; exec keeps signals and the exit code the trainer's own
  if [ "$gpus" -le 0 ]; then
    echo "warning: no GPU found (nvidia-smi); training in one CPU process. Set NUM_GPUS to override." >&2
  fi
  exec "$PY" "$TRAIN" train "${config_flags[@]}" "$@"
fi
# torchrun forwards SIGINT/SIGTERM to the ranks, then kills them after this many seconds:
# leave time to finish the step (or an evaluation) and save
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-900}
# The launcher reports a rank's 130/143 as 1. Run it as a child, pass Ctrl-C / SIGTERM on
# to it (it passes them to the ranks, which save), and exit 130/143 like one process would.
stopped=0
trap 'stopped=143; kill -TERM "$launcher" 2>/dev/null' TERM
trap 'stopped=130; kill -INT "$launcher" 2>/dev/null' INT
if [ "${#launch_args[@]}" -eq 0 ]; then launch_args=(--multi_gpu --num_processes "$gpus"); fi
"$ACCELERATE" launch "${launch_args[@]}" "$TRAIN" train "${config_flags[@]}" "$@" &
launcher=$!
while :; do
  wait "$launcher"
  rc=$?
  kill -0 "$launcher" 2>/dev/null || break   # wait returned for a trapped signal: keep waiting
done
if [ "$stopped" -ne 0 ] && [ "$rc" -ne 0 ]; then exit "$stopped"; fi
exit "$rc"
