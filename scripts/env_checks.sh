# Checks of the environment variables that start_pretrain_large.sh and scripts/slurm_2nodes.sbatch
# read (sourced by both). A bad value ends in one line on stderr and exit 2, before anything
# runs: never a bash arithmetic error, never a count that wrapped around.

# a value as an error line shows it: control characters (a newline, a tab) escaped, so the line stays one
shown() {
  if [[ "$1" == *[[:cntrl:]]* ]]; then printf '%q' "$1"; else printf '%s' "$1"; fi
}

# whole_number NAME MIN MAX MEANING: $NAME, when set and not empty, is a whole number in MIN..MAX.
# Leading zeros are dropped in place (bash arithmetic would read 08 as octal).
whole_number() {
  local name=$1 min=$2 max=$3 meaning=$4 value digits
  value=${!name:-}
  [ -n "$value" ] || return 0
  digits=${value#"${value%%[!0]*}"}
  digits=${digits:-0}
  # compared as text first: a number longer than MAX would overflow bash's 64-bit arithmetic
  if [[ "$value" == *[!0-9]* ]] || [ "${#digits}" -gt "${#max}" ] || [ "$digits" -lt "$min" ] \
       || [ "$digits" -gt "$max" ]; then
    echo "error: $name=$(shown "$value"): give $meaning, a whole number from $min to $max" >&2
    exit 2
  fi
  printf -v "$name" '%s' "$digits"
}

# one_of NAME "CHOICE ..." MEANING: $NAME, when set and not empty, is one of the choices
# (compared in lower case, and stored so).
one_of() {
  local name=$1 choices=$2 meaning=$3 value choice
  value=${!name:-}
  [ -n "$value" ] || return 0
  for choice in $choices; do
    if [ "${value,,}" = "$choice" ]; then printf -v "$name" '%s' "$choice"; return 0; fi
  done
  echo "error: $name=$(shown "$value"): give $meaning" >&2
  exit 2
}

# is_true NAME: $NAME is one of accelerate's words for true (after one_of ... BOOL_WORDS)
BOOL_WORDS="1 true yes y t on 0 false no n f off"
is_true() {
  case "${!1:-}" in 1|true|yes|y|t|on) return 0 ;; *) return 1 ;; esac
}
