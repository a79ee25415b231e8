#!/usr/bin/env bash
# Fill .device/ (ignored through .git/info/exclude) with what gpu_grid.sh needs on an offline GPU machine, here, on a
# machine with PyPI access and the data:
#
#   bash benchmarks/reproduce/prepare_device.sh [--data DIR] [--checkpoint-dir DIR] [--minilm] [--part1-mib N]
#
#   --data DIR            folder holding glue/, ptb/, wikitext-2/ (default: $HF_SPARSE_ATTN_DATA, as the drivers)
#   --checkpoint-dir DIR  the CPU runs' checkpoint folder (default /tmp/reproduce_ckpts): the kept checkpoint of a
#                         finished run that an unfinished run starts from (the fine-tuning row of table 2 starts
#                         from PTB softmax seed 0) is copied, without its epoch checkpoints
#   --minilm              also split the packaged all-MiniLM-L6-v2 (table 1) into .device/minilm-1 (the first
#                         --part1-mib MiB of its weights, default 56) and .device/minilm-2 (the rest and the
#                         tokenizer files), to travel in two calls (gpu_grid.sh --help says how)
#
# The tables travel apart (64 MiB a call): table 2 needs .device/data-lm.tar.gz and .device/checkpoints, table 1
# .device/data-glue.tar.gz and the two MiniLM parts; both need .device/wheels, COMMIT and TRANSFORMERS_VERSION.
#
# Writes: .device/wheels (python 3.12 x86_64 wheels: transformers of this machine's version, datasets, evaluate and
# the dependencies the GPU image lacks or may hold too old or too new, with fallbacks), .device/data-*.tar.gz,
# .device/checkpoints/<table>/<run>-<hash>/, .device/COMMIT, .device/TRANSFORMERS_VERSION; prints the sizes of what
# each call carries (64 MiB at most, the working tree included).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CARRY="$REPO/.device"
DATA=""
CKPT=/tmp/reproduce_ckpts
MINILM=0
PART1_MIB=56
while (($#)); do
  case "$1" in
    --data) DATA=$2; shift 2 ;;
    --checkpoint-dir) CKPT=$2; shift 2 ;;
    --minilm) MINILM=1; shift ;;
    --part1-mib) PART1_MIB=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "prepare_device.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ $PART1_MIB =~ ^[1-9][0-9]*$ ]] || { echo "prepare_device.sh: --part1-mib must be a positive integer, got '$PART1_MIB'" >&2; exit 2; }
cd "$REPO"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
if [[ -z $DATA ]]; then
  DATA=$(python3 -c 'from benchmarks.reproduce.runner import default_data_dir; print(default_data_dir())')
fi
for folder in glue ptb wikitext-2; do
  [[ -d $DATA/$folder ]] || { echo "prepare_device.sh: --data: $DATA has no $folder/ folder" >&2; exit 2; }
done

mkdir -p "$CARRY" "$REPO/.git/info"
grep -qxF '/.device/' "$REPO/.git/info/exclude" 2>/dev/null || echo '/.device/' >>"$REPO/.git/info/exclude"

# 1. wheels. The GPU image (python 3.12) has torch, tokenizers 0.23.2, huggingface_hub 1.33, safetensors 0.8,
# accelerate, peft, pandas, pyarrow, xxhash, but no datasets, evaluate, dill, multiprocess, and transformers 5.17.
# Each wheel is fetched alone (--no-deps); on the machine pip's resolver picks among them (--no-index): datasets 4.8.5
# with fsspec 2026.2.0 is the fallback should the image's pyarrow be older than datasets 5's 24.0, regex the one
# should its regex be older than transformers' 2025.10.22.
transformers_version=$(python3 -c 'import transformers; print(transformers.__version__)')
datasets_version=$(python3 -c 'import datasets; print(datasets.__version__)')
evaluate_version=$(python3 -c 'import evaluate; print(evaluate.__version__)')
rm -rf "$CARRY/wheels.new"  # downloaded aside: a failed download keeps the wheels prepared before
for requirement in "transformers==$transformers_version" "datasets==$datasets_version" "evaluate==$evaluate_version" \
  dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0 regex==2026.5.9 datasets==4.8.5 fsspec==2026.2.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$CARRY/wheels.new" "$requirement"
done
rm -rf "$CARRY/wheels"
mv "$CARRY/wheels.new" "$CARRY/wheels"
echo "$transformers_version" >"$CARRY/TRANSFORMERS_VERSION"
git rev-parse HEAD >"$CARRY/COMMIT"

# 2. the data (the glue TSV files compress well; the LM corpora are gzip files already)
rm -f "$CARRY"/data*.tar.gz
tar -czf "$CARRY/data-glue.tar.gz" -C "$DATA" glue
tar -czf "$CARRY/data-lm.tar.gz" -C "$DATA" ptb wikitext-2

# 3. origin checkpoints of unfinished runs (the model files only, not the epoch checkpoints)
rm -rf "$CARRY/checkpoints"
python3 - "$CKPT" "$CARRY/checkpoints" <<'EOF'
import shutil
import sys
from pathlib import Path

from benchmarks.reproduce import lm_heads
from benchmarks.reproduce.runner import RESULTS_DIR

source, target = Path(sys.argv[1]), Path(sys.argv[2])
args = lm_heads.parser().parse_args([])  # the driver's defaults: the grid the CPU runs fill
args.checkpoint_dir, args.data_dir, args.results_dir = source, Path("DATA"), RESULTS_DIR
todo = [run for run in lm_heads.build(args) if run.requires and not run.result_path(RESULTS_DIR).is_file()]
for origin in {run.requires.name: run.requires for run in todo}.values():
    folder = origin.checkpoint(source)
    if not (folder / "config.json").is_file():
        print(f"origin {origin.name} is not finished here ({folder}): its fine-tuning runs wait for it")
        continue
    copy = target / origin.table / folder.name
    copy.mkdir(parents=True)
    for file in folder.iterdir():
        if file.is_file():
            shutil.copy2(file, copy / file.name)
    print(f"carrying {origin.table}/{folder.name}")
EOF

# 4. the packaged MiniLM in two parts (its files are checked by hash before the split and after the join)
rm -rf "$CARRY"/minilm-*
if ((MINILM)); then
  model=$(python3 -c 'from hf_sparse_attn.commands.packaged_model import verified_package_folder; print(verified_package_folder())')
  mkdir -p "$CARRY/minilm-1" "$CARRY/minilm-2"
  head -c "$((PART1_MIB << 20))" "$model/model.safetensors" >"$CARRY/minilm-1/model.safetensors.part1"
  tail -c "+$(((PART1_MIB << 20) + 1))" "$model/model.safetensors" >"$CARRY/minilm-2/model.safetensors.part2"
  cp "$model"/{config.json,tokenizer.json,tokenizer_config.json,special_tokens_map.json,vocab.txt} "$CARRY/minilm-2/"
  echo 2 | tee "$CARRY/minilm-1/PARTS" >"$CARRY/minilm-2/PARTS"
fi

# 5. sizes: what travels is the working tree (tracked and untracked-not-ignored files) and the carried paths
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
bytes() { du -sb "$@" | awk '{ s += $1 } END { print s + 0 }'; }
tree=$(git ls-files -zco --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
echo "working tree: $(mib "$tree")"
for item in "$CARRY"/wheels "$CARRY"/data-*.tar.gz "$CARRY"/checkpoints "$CARRY"/minilm-*; do
  [[ -e $item ]] && echo "  .device/${item#"$CARRY"/}: $(mib "$(bytes "$item")")"
done
common=$((tree + $(bytes "$CARRY"/COMMIT "$CARRY"/TRANSFORMERS_VERSION "$CARRY"/wheels)))
checkpoints=$([[ -d $CARRY/checkpoints ]] && bytes "$CARRY"/checkpoints || echo 0)
echo "table 2 call, carry .device/wheels .device/COMMIT .device/TRANSFORMERS_VERSION .device/data-lm.tar.gz" \
  ".device/checkpoints: $(mib $((common + checkpoints + $(bytes "$CARRY"/data-lm.tar.gz)))) of 64 MiB"
if ((MINILM)); then
  echo "table 1 staging call, carry .device/minilm-1: $(mib $((tree + $(bytes "$CARRY"/minilm-1)))) of 64 MiB"
  echo "table 1 grid call, carry .device/wheels .device/COMMIT .device/TRANSFORMERS_VERSION .device/data-glue.tar.gz" \
    ".device/minilm-2: $(mib $((common + $(bytes "$CARRY"/data-glue.tar.gz "$CARRY"/minilm-2)))) of 64 MiB"
fi
