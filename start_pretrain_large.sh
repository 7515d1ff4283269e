#!/usr/bin/env bash
# Check the data, the tokenizer and the GPUs, then launch pretraining.
#
#   ./start_pretrain_large.sh                              # the 10M-row config, every GPU
#   ./start_pretrain_large.sh --batch_size_per_gpu=24      # flags go to `train` unchanged
#   ./start_pretrain_large.sh --is_keep_training=True      # resume
#   NUM_GPUS=2 ./start_pretrain_large.sh                   # use 2 of the GPUs
#   ./start_pretrain_large.sh --preset=5m                  # another template instead of --use_large_config
#   ACCELERATE_CONFIG=configs/accelerate/fsdp.yaml ./start_pretrain_large.sh   # an engine: DDP, FSDP, DeepSpeed
#   RESUME=auto ./start_pretrain_large.sh                  # resume when a state exists, never ask
#   RESUME=no ./start_pretrain_large.sh                    # start afresh (a saved state is moved to previous_runs/)
#
# Environment, each checked before anything runs (a bad value is one line and exit 2):
#   NUM_GPUS (else CUDA_VISIBLE_DEVICES, else nvidia-smi), ACCELERATE_CONFIG, ACCELERATE_USE_CPU,
#   RESUME=ask|auto|no, PYTHON, ACCELERATE; for several machines (the SLURM script sets them)
#   NUM_MACHINES, NUM_PROCESSES, MACHINE_RANK, MAIN_PROCESS_IP, MAIN_PROCESS_PORT;
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT (default: the run's --stop_grace_s); RANK_OUTCOME_DIR
#   (scripts/rank_outcome.py: each rank records how it ended, for the SLURM script).
#
# Exit code: the trainer's (0 done, 2 bad flag, 130/143 stopped and saved; with several
# GPUs accelerate reports any failure as 1), 1 if the dry run finds the run not ready
# (each problem is printed with the command or flag that fixes it).
set -uo pipefail
# no cd: relative paths in the flags mean what they mean where the user stands
HERE=$(cd "$(dirname "$0")" && pwd)
TRAIN="$HERE/train_low_mem.py"
# shellcheck source=scripts/env_checks.sh
source "$HERE/scripts/env_checks.sh"

# a stop before the launch (SIGTERM during the dry run): nothing has started, leave as stopped
trap 'exit 143' TERM
trap 'exit 130' INT

one_of RESUME "ask auto no" "ask, auto or no (auto resumes a saved state without asking)"
# ask (the default) needs a terminal to answer on; with none (a batch job, a requeue, cmd </dev/null) a
# saved state is resumed, the question's own default: starting afresh there would move the job's
# progress aside at every requeue
resume_mode=${RESUME:-ask}
auto_why="RESUME=auto"
if [ "$resume_mode" = ask ] && ! [ -t 0 ]; then resume_mode=auto; auto_why="RESUME=${RESUME:-ask} without a terminal"; fi
one_of ACCELERATE_USE_CPU "$BOOL_WORDS" "1 (CPU processes) or 0 (GPUs)"
if [ -n "${ACCELERATE_USE_CPU:-}" ]; then   # one spelling for everyone who reads it
  if is_true ACCELERATE_USE_CPU; then ACCELERATE_USE_CPU=1; else ACCELERATE_USE_CPU=0; fi
fi
whole_number NUM_GPUS 0 1024 "the GPUs to use on this machine (0 = one CPU process)"
whole_number NUM_MACHINES 1 65536 "the number of machines"
whole_number NUM_PROCESSES 1 1048576 "the processes of all machines together"
whole_number MACHINE_RANK 0 65535 "this machine's rank (0 = the main machine)"
whole_number MAIN_PROCESS_PORT 1 65535 "the main machine's port"
whole_number TORCH_ELASTIC_SHUTDOWN_TIMEOUT 1 86400 "the seconds torchrun waits for the ranks to save after passing on a stop"
if [ -n "${RANK_OUTCOME_DIR:-}" ] && [ ! -d "$RANK_OUTCOME_DIR" ]; then
  echo "error: RANK_OUTCOME_DIR=$RANK_OUTCOME_DIR: no such folder (the SLURM script makes it; leave it unset otherwise)" >&2
  exit 2
fi

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x "$HERE/.venv/bin/python" ]; then PY="$HERE/.venv/bin/python"; else PY=python3; fi
fi
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "error: PYTHON=$PY: no such program; give the Python of the toolkit's environment (e.g. .venv/bin/python)" >&2
  exit 2
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
dry_given=0
all=("$@")
for ((i = 0; i < ${#all[@]}; i++)); do
  arg=${all[i]}
  # the trainer's own spellings of a bool (model/cli.py coerce), in any case; --dry-run as --dry_run;
  # its value as the next word too (--dry_run False), as the trainer's parser takes it
  word=${arg,,}
  word=${word/#--dry-run/--dry_run}
  if [ "$word" = --dry_run ]; then
    next=${all[i + 1]:-}
    case "${next,,}" in true|yes|1|false|no|0) word="--dry_run=${next,,}"; i=$((i + 1)) ;; esac
  fi
  case "$word" in
    --dry_run|--dry_run=*) dry_given=$((dry_given + 1)) ;;
  esac
  case "$word" in
    --dry_run|--dry_run=true|--dry_run=yes|--dry_run=1) user_dry=1 ;;
    --dry_run=false|--dry_run=no|--dry_run=0) ;;
    --dry_run=*) echo "error: $arg: expected true or false for dry_run" >&2; exit 2 ;;
    *) args+=("$arg") ;;
  esac
done
if [ "$dry_given" -gt 1 ]; then echo "error: --dry_run is given twice; give it once" >&2; exit 2; fi
set -- "${args[@]}"

# GPUs first, so that the dry run's schedule counts the right number of processes
if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
  visible=$(printf '%s' "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
elif command -v nvidia-smi >/dev/null 2>&1; then
  visible=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
else
  visible=0
fi
gpus=${NUM_GPUS:-$visible}

# an accelerate config file: checked (loads, fits the GPUs, multi-node settings) before anything runs
world=$(( gpus > 0 ? gpus : 1 ))
launch_args=()
if [ -n "${ACCELERATE_CONFIG:-}" ]; then
  facts=$(PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m model.train.launch_config "$ACCELERATE_CONFIG" "$gpus") || exit 2
  fact() { printf '%s\n' "$facts" | sed -n "s/^$1=//p"; }
  world=$(fact world_size)
  read -r -a launch_args <<< "$(fact launch_args)"
fi

# more GPUs asked for than there are (checked after the config, whose own checks say more)
if ! is_true ACCELERATE_USE_CPU && [ "$gpus" -gt "$visible" ]; then   # CPU processes: as many as asked
  if [ "$visible" -eq 0 ]; then fix="NUM_GPUS=0 for one CPU process"; else fix="NUM_GPUS<=$visible"; fi
  echo "error: NUM_GPUS=$gpus but $visible GPU(s) are visible; give $fix (or ACCELERATE_USE_CPU=1 for CPU processes)" >&2
  exit 2
fi

# in the background, so that a stop ends it at once (bash runs a trap only after a foreground
# command, and a dry run checksumming a large state takes a while); it writes nothing but this
report_file=
end_dry_run() {   # SIGTERM either way: before its handlers are up a background job ignores SIGINT
  if [ -n "$dry_pid" ]; then kill -TERM "$dry_pid" 2>/dev/null; wait "$dry_pid" 2>/dev/null; fi
  rm -f "$report_file"
  echo "stopped by $2 during the start-up checks: nothing was started or written" >&2
  exit "$1"
}
dry_pid=
dry_run() {   # the trainer's own checks of this command (plus "$@"): sets rc and report
  trap 'end_dry_run 143 SIGTERM' TERM
  trap 'end_dry_run 130 SIGINT' INT
  report_file=$(mktemp "${TMPDIR:-/tmp}/chat_small_t5-dry-run.XXXXXX") || exit 1
  NUM_GPUS=$world "$PY" "$TRAIN" train "${config_flags[@]}" "${run_args[@]}" "$@" --dry_run=True >"$report_file" 2>&1 &
  dry_pid=$!
  wait "$dry_pid"
  rc=$?
  dry_pid=
  report=$(cat "$report_file")
  rm -f "$report_file"
  trap 'exit 143' TERM   # only now: a stop before this line still removes the report file
  trap 'exit 130' INT
  if [ "$rc" -eq 2 ]; then echo "$report" >&2; exit 2; fi
  if [ "$rc" -ne 0 ] && ! printf '%s\n' "$report" | grep -q '^not ready:'; then
    printf '%s\n' "$report" >&2   # the dry run itself failed: show why
    exit "$rc"
  fi
}
path_of() { printf '%s\n' "$report" | sed -n "s/^  path\.$1=//p"; }
run_of() { printf '%s\n' "$report" | sed -n "s/^  run\.$1=\([^ ]*\).*/\1/p"; }
# the dry run of a ready fresh run: an earlier run here that it would move aside; a cut move that already
# took all that run's states into its archive
earlier_run_here() { local n; n=$(run_of previous_items); [ -n "$n" ] && [ "$n" != 0 ]; }
states_moved() { local to; to=$(path_of states_moved_to); [ -n "$to" ] && [ "$to" != none ]; }
run_args=("$@")
dry_run
# --is_keep_training as the trainer's own parser read it (any spelling: two words, dashes, --nois_, a
# Python literal): given at all, this script does not decide; given false beside RESUME=auto, a batch
# job's every requeue would start afresh, moving the progress aside: refused
keep=$(run_of is_keep_training)
resume_given=0
if [ -n "$keep" ] && [ "$keep" != not_given ]; then resume_given=1; fi
if [ "$keep" = given_false ] && [ "${RESUME:-ask}" = auto ]; then
  echo "error: --is_keep_training is given as false with RESUME=auto: every requeue of this job would start afresh, moving the saved progress aside; drop it (RESUME=auto resumes a saved state) or set RESUME=no" >&2
  exit 2
fi
latest=$(path_of latest_state)
saved=0
if [ "$resume_given" -eq 0 ] && [ "$latest" != "none" ] && [ -n "$latest" ]; then saved=1; fi
may_resume=0   # a saved state this command resumes (RESUME=auto) or asks about (RESUME=ask, on a terminal)
if [ "$saved" -eq 1 ] && [ "$resume_mode" != no ]; then may_resume=1; fi
if [ "$user_dry" -eq 1 ]; then   # the user's own dry run: the check of what this command would run
  if [ "$saved" -eq 1 ] && [ "$resume_mode" = auto ]; then
    echo "$auto_why and a saved state exists ($latest): this command would resume it; the check of that resume:"
    dry_run --is_keep_training=True
  elif [ "$saved" -eq 1 ] && [ "$resume_mode" = ask ]; then   # it would ask: both answers' checks
    fresh_rc=$rc
    echo "A saved state exists ($latest): this command would ask whether to resume it. The check of a fresh run:"
    printf '%s\n' "$report"
    echo "The check of the resume:"
    dry_run --is_keep_training=True
    if [ "$fresh_rc" -eq 0 ]; then rc=0; fi
  fi
  printf '%s\n' "$report"
  exit "$rc"
fi
fresh_rc=$rc
fresh_report=$report
resume_rc=0
yes_or_no() {   # $1 an answer in either language, $2 the question's default (y or n): y or n, a word not known is the default
  local a
  a=$(printf '%s' "$1" | tr -d ' \t' | tr 'A-Z' 'a-z')
  case "$a" in
    y|yes|是|是的|好|好的|要|可以|对|行) echo y ;;
    n|no|否|不|不要|不用|不是|不好) echo n ;;
    '') echo "$2" ;;
    *) echo "(\"$1\" not understood: taken as the default, $2)" >&2; echo "$2" ;;
  esac
}
not_ready() {   # a report's reasons, from its "not ready:" line on, with $1 in place of those words
  local reasons
  reasons=$(printf '%s\n' "$2" | sed -n '/^not ready:/,$p')
  printf '%s%s\n' "$1" "${reasons#not ready:}" >&2
}
# every saved state damaged: no resume either (the fresh run's check says so, with the way on): said once
if [ "$(run_of states_damaged)" = 1 ]; then may_resume=0; fi
if [ "$may_resume" -eq 1 ]; then
  # a resume is what RESUME=auto runs (and what the question offers): check it too, not only a fresh run
  dry_run --is_keep_training=True
  resume_rc=$rc
  resume_report=$report
  if [ "$resume_rc" -ne 0 ] && [ "$fresh_rc" -ne 0 ]; then   # neither is ready: both say why
    not_ready 'not ready as a fresh run:' "$fresh_report"
    not_ready 'nor as a resume of the saved state:' "$resume_report"
    exit 1
  fi
  if [ "$resume_mode" = auto ] && [ "$resume_rc" -ne 0 ]; then
    not_ready "not ready as a resume of the saved state ($latest), which $auto_why resumes (RESUME=no starts afresh and moves it aside):" "$resume_report"
    exit 1
  fi
  if [ "$fresh_rc" -ne 0 ]; then
    not_ready 'note: a fresh run would not be ready:' "$fresh_report"
  fi
  if [ "$resume_rc" -ne 0 ]; then   # asked below: a fresh run, not this resume
    not_ready "note: the saved state ($latest) cannot be resumed:" "$resume_report"
  fi
  if [ "$resume_mode" = auto ] || [ "$fresh_rc" -ne 0 ]; then report=$resume_report; else report=$fresh_report; fi
  rc=0
fi
if [ "$rc" -ne 0 ]; then   # the dry run's checks are the trainer's own: not ready means it would fail
  not_ready 'not ready:' "$report"
  exit 1
fi
# resuming, and yet no state: a fresh run would move an earlier run's models aside and start over at
# step 0 -- at every requeue of a job whose states are out of reach (a link to node-local scratch
# this node lacks, storage not mounted here): refused, the job stops instead of losing its progress
if [ "$resume_mode" = auto ] && [ "$resume_given" -eq 0 ] && [ "$saved" -eq 0 ] \
    && earlier_run_here; then
  echo "error: $auto_why resumes a saved state, but $(path_of train_state_dir) holds none, while $(path_of output_dir) holds an earlier run that a fresh run would move aside, starting over at step 0:" >&2
  printf '%s\n' "$report" | grep '^note: a previous run saved' >&2
  if states_moved; then
    # a fresh run (RESUME=no) was moving that run into previous_runs/ and was killed: its states went first
    echo "  a fresh run was moving that run into $(path_of states_moved_to)/ and was cut short, its states already there: RESUME=no finishes that move (nothing is lost: that run then continues from its archive with the flags the log prints) / 之前的全新训练在移动那次训练时被打断，状态已在存档里：设 RESUME=no 完成移动，之后可按日志给出的参数在存档处续训" >&2
  else
    echo "  if that run's states lie behind a link or on storage this machine lacks (node-local scratch, a filesystem not mounted here), make them reachable; to start afresh anyway: RESUME=no / 找不到可续训的状态：若状态在本机没有的存储上，请先让它可访问；确实要从头训练请设 RESUME=no" >&2
  fi
  exit 1
fi
# a requeued job (SLURM counts its restarts) that finds no state and no earlier run: right for a job stopped
# before its first save, but also what a job sees whose states went elsewhere (node-local scratch, a link
# now pointing at an empty folder): said, loudly, before step 0 starts again
restarts=${SLURM_RESTART_COUNT:-0}
case "$restarts" in ''|*[!0-9]*) restarts=0 ;; esac
if [ "${#restarts}" -gt 9 ]; then restarts=999999999; fi   # beyond what [ ] compares: many
if [ "$resume_mode" = auto ] && [ "$resume_given" -eq 0 ] && [ "$saved" -eq 0 ] && [ "$restarts" -gt 0 ]; then
  echo "warning: this job was restarted $restarts time(s) (SLURM_RESTART_COUNT) and finds no saved state in $(path_of train_state_dir): it trains from step 0. Right if it was stopped before its first save; if an earlier attempt saved states elsewhere (node-local scratch, a link that now points elsewhere), cancel it (scancel) and make them reachable here / 作业已被重新排队 $restarts 次，但没有找到保存的状态，将从第 0 步开始训练：若之前的状态在别处（节点本地存储、指向别处的链接），请取消作业并让它们在这里可访问" >&2
fi
# the same on a terminal (RESUME=ask): asked, no by default -- starting over at step 0 is the user's to choose
if [ "$resume_mode" = ask ] && [ "$resume_given" -eq 0 ] && [ "$saved" -eq 0 ] && earlier_run_here; then
  printf '%s\n' "$report" | grep '^note: a previous run saved' >&2
  if states_moved; then
    why="a fresh run's move of it into $(path_of states_moved_to)/ was cut short, its states already there: y finishes that move / 之前移动它时被打断，状态已在存档里：回答 y 完成移动"
  else
    why="if its states lie on storage this machine lacks (node-local scratch, a filesystem not mounted here), answer n and make them reachable / 若它的状态在本机没有的存储上，请回答 n 并先让它可访问"
  fi
  read -r -p "No saved state in $(path_of train_state_dir), but $(path_of output_dir) holds an earlier run ($why). Start afresh at step 0, moving it to previous_runs/? / 没有可续训的状态，但输出目录里有之前的训练。要从头训练、把它移到 previous_runs/ 吗？[y/N] " ans
  if [ "$(yes_or_no "$ans" n)" = n ]; then echo "nothing started" >&2; exit 1; fi
fi
if [ "$may_resume" -eq 1 ]; then
  # what a fresh run would move aside is the question's (or not this run's) to say
  printf '%s\n' "$report" | sed -n '/^\[schedule\]/,/^ready/p' | grep -v '^note: a previous run saved'
else
  printf '%s\n' "$report" | sed -n '/^\[schedule\]/,/^ready/p'
fi
if [ "$saved" -eq 1 ]; then
  if [ "$resume_mode" = auto ]; then
    if [ "${RESUME:-ask}" != auto ]; then
      echo "note: a saved state exists ($latest) and there is no terminal to ask on: resuming it, the question's default (RESUME=no starts afresh, moving it to previous_runs/) / 已有保存的状态，没有终端可以询问：按默认续训" >&2
    fi
    set -- "$@" --is_keep_training=True
  elif [ "$resume_mode" = ask ] && [ "$resume_rc" -ne 0 ]; then   # only a fresh run is ready: offer that, not the resume
    read -r -p "The saved state ($latest) cannot be resumed (above). Start afresh, moving it to previous_runs/? / 保存的状态无法续训（原因见上）。要从头训练、把它移到 previous_runs/ 吗？[y/N] " ans
    if [ "$(yes_or_no "$ans" n)" = n ]; then echo "nothing started" >&2; exit 1; fi
  elif [ "$resume_mode" = ask ]; then
    read -r -p "A saved state exists ($latest). Resume it? (n: start afresh, moving it to previous_runs/) / 已有保存的状态，要续训吗？（n：从头训练，把它移到 previous_runs/）[Y/n] " ans
    if [ "$(yes_or_no "$ans" y)" = n ]; then
      if [ "$fresh_rc" -ne 0 ]; then   # a fresh run it is, and that one is not ready
        not_ready 'not ready:' "$fresh_report"
        exit 1
      fi
    else
      set -- "$@" --is_keep_training=True
    fi
  else
    echo "note: a saved state exists ($latest); RESUME=no: a fresh run moves it to previous_runs/ (RESUME=auto or --is_keep_training=True resumes it)" >&2
  fi
fi

if [ "$world" -le 1 ] && [ "${#launch_args[@]}" -eq 0 ]; then
  # one process needs no launcher; exec keeps signals and the exit code the trainer's own
  if [ "$gpus" -le 0 ]; then
    echo "warning: no GPU found (nvidia-smi); training in one CPU process. Set NUM_GPUS to override." >&2
  fi
  exec "$PY" "$TRAIN" train "${config_flags[@]}" "$@"
fi
if ! command -v "$ACCELERATE" >/dev/null 2>&1; then
  echo "error: ACCELERATE=$ACCELERATE: no such program; install accelerate in $(dirname "$PY") or give its path" >&2
  exit 2
fi
# torchrun passes SIGINT/SIGTERM on to the ranks, then kills them after this many seconds: the
# run's own budget for a stop (--stop_grace_s, what the cluster allows between SIGTERM and SIGKILL)
grace=$(printf '%s\n' "$report" | sed -n 's/^  stop_grace_s  *\([0-9][0-9]*\).*/\1/p')
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-${grace:-120}}
rank_entry=()
if [ -n "${RANK_OUTCOME_DIR:-}" ]; then rank_entry=("$HERE/scripts/rank_outcome.py"); fi

# The launcher reports a rank's 130/143 as 1. Run it as a child, pass Ctrl-C / SIGTERM on
# to it (it passes them to the ranks, which save), and exit 130/143 like one process would.
# One SIGTERM only: torchrun abandons ranks still saving when another one reaches it during
# its wait (SLURM also signals every process of the job step itself).
stopped=0 stop_signal= launcher=
pass_on() {
  if [ "$1" = TERM ] && [ "$stopped" -ne 0 ]; then return; fi
  stopped=$2 stop_signal=$1
  [ -z "$launcher" ] || kill -"$1" "$launcher" 2>/dev/null
}
trap 'pass_on TERM 143' TERM
trap 'pass_on INT 130' INT
if [ "${#launch_args[@]}" -eq 0 ]; then launch_args=(--multi_gpu --num_processes "$gpus"); fi
# every process of this launch carries this mark (the launcher's environment, not this script's): the ranks
# a launcher leaves behind are found by it when it ends, also without RANK_OUTCOME_DIR's records
launch_mark="$(uname -n)-$$-$RANDOM$RANDOM"
CHAT_SMALL_T5_LAUNCH=$launch_mark "$ACCELERATE" launch "${launch_args[@]}" "${rank_entry[@]}" "$TRAIN" train "${config_flags[@]}" "$@" &
launcher=$!
# a stop that came while the launcher started: as SIGTERM, since a background job starts with
# SIGINT ignored until torchrun sets its handlers
[ -z "$stop_signal" ] || kill -TERM "$launcher" 2>/dev/null
while :; do
  wait "$launcher"
  rc=$?
  kill -0 "$launcher" 2>/dev/null || break   # wait returned for a trapped signal: keep waiting
done
launcher=   # reaped: its pid may be another process's now, a later stop is not passed on to it
# a launcher ended by a signal other than the one passed on (SIGKILL from outside, the end of a grace
# period): named here, where it is known. Its ranks cannot see it: the kernel sends each SIGTERM when
# their launcher dies, whatever ended it, and their logs say that their launcher was gone
if [ "$rc" -gt 128 ] && ended_by=$(kill -l "$(( rc - 128 ))" 2>/dev/null) \
    && [ "SIG${ended_by#SIG}" != "SIG${stop_signal:-none}" ]; then
  echo "warning: the launcher ($ACCELERATE launch) was ended by SIG${ended_by#SIG} (exit $rc)$([ -n "$stop_signal" ] && echo ", after this script passed it SIG$stop_signal"); each rank it had started saves its last step and stops / 启动器已结束：它已启动的各进程会保存最后一步后停止" >&2
fi

# ranks the launcher left behind (it gave up on them, see above) finish their save before this
# script ends: SLURM kills what is left of a job step once its tasks have exited
rank_at_work() {
  # the rank of this record still works: its record (a plain file) says running here, and its
  # process lives -- not a zombie, whose environment is empty -- as this job's rank_outcome.py
  # (the command line from /proc) with this job's outcome folder in its environment (not a reused
  # pid). Builtins only: a signal to the whole group cannot fail a check by killing a ps or grep.
  local word on pid entry ours=0 cmd=
  [ -f "$1" ] || return 1
  read -r word on pid _ 2>/dev/null < "$1" || return 1
  [ "$word" = running ] && [ "$on" = "$host" ] || return 1
  case "$pid" in ''|0*|*[!0-9]*) return 1 ;; esac
  while IFS= read -r -d '' entry; do
    [ "$entry" = "RANK_OUTCOME_DIR=$RANK_OUTCOME_DIR" ] && ours=1
  done 2>/dev/null < "/proc/$pid/environ"
  [ "$ours" -eq 1 ] || return 1
  while IFS= read -r -d '' entry; do cmd+="$entry "; done 2>/dev/null < "/proc/$pid/cmdline"
  case "$cmd" in *rank_outcome.py*) ;; *) return 1 ;; esac
  rank_pid=$pid
}
ranks_of_this_launch() {
  # the processes of this launch still at work (rank_pids): those whose environment carries its mark -- not a
  # zombie (its environment reads empty), not a pid reused by another program. Builtins only, as rank_at_work
  local environ pid entry
  rank_pids=()
  for environ in /proc/[0-9]*/environ; do
    pid=${environ#/proc/}
    pid=${pid%/environ}
    [ "$pid" = "$$" ] && continue
    while IFS= read -r -d '' entry; do
      if [ "$entry" = "CHAT_SMALL_T5_LAUNCH=$launch_mark" ]; then rank_pids+=("$pid"); break; fi
    done 2>/dev/null < "$environ"
  done
}
# only after a launcher that did not end well: one that exits 0 saw every rank end, and what still carries the
# mark then is a process a rank started on purpose (detached), never waited for or killed
if [ -z "${RANK_OUTCOME_DIR:-}" ] && [ "$rc" -ne 0 ]; then
  deadline=$(( SECONDS + TORCH_ELASTIC_SHUTDOWN_TIMEOUT ))
  ranks_of_this_launch
  if [ "${#rank_pids[@]}" -gt 0 ]; then
    echo "note: the launcher has ended; waiting up to $(( deadline - SECONDS )) s for the process(es) of this launch ${rank_pids[*]} (its ranks) to finish their save / 启动器已结束，等待各进程保存完毕" >&2
    while [ "$SECONDS" -lt "$deadline" ] && [ "${#rank_pids[@]}" -gt 0 ]; do sleep 0.5; ranks_of_this_launch; done
    if [ "${#rank_pids[@]}" -gt 0 ]; then   # killed only at the deadline, as torchrun would have
      echo "warning: process(es) ${rank_pids[*]} of this launch did not end within the grace period: killed" >&2
      kill -KILL "${rank_pids[@]}" 2>/dev/null
    fi
  fi
fi
if [ -n "${RANK_OUTCOME_DIR:-}" ]; then
  host=$(uname -n)
  deadline=$(( SECONDS + TORCH_ELASTIC_SHUTDOWN_TIMEOUT ))
  for record in "$RANK_OUTCOME_DIR"/rank-*; do
    rank_at_work "$record" || continue
    echo "note: the launcher has ended; waiting up to $(( deadline - SECONDS )) s for rank process $rank_pid to finish its save" >&2
    while [ "$SECONDS" -lt "$deadline" ] && rank_at_work "$record"; do sleep 0.5; done
    if [ "$SECONDS" -ge "$deadline" ] && rank_at_work "$record"; then   # killed only at the deadline
      echo "warning: rank process $rank_pid did not end within the grace period: killed" >&2
      kill -KILL "$rank_pid" 2>/dev/null   # what torchrun would have done at the end of the grace
    fi
  done
fi
if [ "$stopped" -ne 0 ] && [ "$rc" -ne 0 ]; then exit "$stopped"; fi
exit "$rc"
