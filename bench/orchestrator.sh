#!/usr/bin/env bash
# Orchestrator overhead, side by side with DVC and Snakemake when they are installed.
# Usage: bench/orchestrator.sh [N...]   (needs hyperfine; DVC/Snakemake optional, from PyPI)
# Results go to stdout as Markdown rows; BENCHMARKS.md keeps the table.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
pretext=${PRETEXT:-$here/target/release/pretext}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sizes=${*:-10 100 500}
parts=${BENCH_PARTS:-chains data}

gen_pretext() { # N -> pipelines/chain.yaml: s_i copies s_{i-1}
  local n=$1 d=$2
  mkdir -p "$d/pipelines" "$d/data"; echo seed > "$d/data/seed.txt"
  {
    echo "stages:"
    echo "  s0: { kind: command, run: 'cp data/seed.txt \$PRETEXT_OUT/f', inputs: { seed: file:data/seed.txt } }"
    for ((i = 1; i < n; i++)); do
      echo "  s$i: { kind: command, run: 'cp \$PRETEXT_IN_UP/f \$PRETEXT_OUT/f', inputs: { up: s$((i - 1)).out } }"
    done
  } > "$d/pipelines/chain.yaml"
}

gen_dvc() {
  local n=$1 d=$2
  mkdir -p "$d"; (cd "$d" && git init -q && dvc init -q && echo seed > s_0)
  {
    echo "stages:"
    for ((i = 1; i <= n; i++)); do
      printf '  s%d:\n    cmd: cp s_%d s_%d\n    deps: [s_%d]\n    outs: [s_%d]\n' $i $((i - 1)) $i $((i - 1)) $i
    done
  } > "$d/dvc.yaml"
}

gen_snakemake() {
  local n=$1 d=$2
  mkdir -p "$d"; echo seed > "$d/s_0"
  {
    echo "rule all:"; echo "    input: 's_$n'"
    for ((i = 1; i <= n; i++)); do
      printf 'rule s%d:\n    input: "s_%d"\n    output: "s_%d"\n    shell: "cp {input} {output}"\n' $i $((i - 1)) $i
    done
  } > "$d/Snakefile"
}

ms() { # command -> median wall ms over hyperfine runs
  hyperfine -N --warmup 2 --runs "${RUNS:-10}" --export-json "$work/h.json" "$1" > /dev/null 2>&1
  python3 -c "import json;print(round(json.load(open('$work/h.json'))['results'][0]['median']*1000,1))"
}

once() { # command -> wall seconds of one run
  local t0 t1; t0=$(date +%s.%N); bash -c "$1" > /dev/null 2>&1; t1=$(date +%s.%N)
  python3 -c "print(round($t1-$t0,3))"
}

if [[ $parts == *chains* ]]; then
echo "| tool | N | first full run (s) | per stage (ms) | no-op run (ms) | no-op status (ms) |"
echo "|---|---|---|---|---|---|"
for n in $sizes; do
  d=$work/p$n; gen_pretext "$n" "$d"
  full=$(once "cd $d && $pretext run pipelines/chain.yaml --jobs 1")
  noop=$(cd "$d" && ms "$pretext run pipelines/chain.yaml")
  st=$(cd "$d" && ms "$pretext status pipelines/chain.yaml")
  echo "| pretext | $n | $full | $(python3 -c "print(round($full*1000/$n,2))") | $noop | $st |"
  if command -v dvc > /dev/null && [ "$n" -le "${DVC_MAX:-500}" ]; then
    d=$work/dvc$n; gen_dvc "$n" "$d"
    full=$(once "cd $d && dvc repro -q")
    noop=$(cd "$d" && RUNS=3 ms "dvc repro -q")
    st=$(cd "$d" && RUNS=3 ms "dvc status -q")
    echo "| DVC $(dvc --version) | $n | $full | $(python3 -c "print(round($full*1000/$n,2))") | $noop | $st |"
  fi
  if command -v snakemake > /dev/null; then
    d=$work/smk$n; gen_snakemake "$n" "$d"
    if (cd "$d" && snakemake -c1 -q > /dev/null 2>&1); then
      full=$(once "rm -f $d/s_[1-9]* && cd $d && snakemake -c1 -q")
      noop=$(cd "$d" && RUNS=3 ms "snakemake -c1 -q")
      st=$(cd "$d" && RUNS=3 ms "snakemake -c1 -n -q")
      echo "| Snakemake $(snakemake --version) | $n | $full | $(python3 -c "print(round($full*1000/$n,2))") | $noop | $st (dry-run) |"
    else
      echo "| Snakemake $(snakemake --version) | $n | fails: RecursionError building the DAG | - | - | - |"
    fi
  fi
done
fi
[[ $parts == *data* ]] || exit 0

# Data fingerprints: 100k x 1 KiB files in 100 folders, and one 1 GiB file.
d=$work/data; mkdir -p "$d/many"
python3 - "$d/many" <<'PY'
import os, sys
root = sys.argv[1]
for i in range(100):
    os.makedirs(f"{root}/d{i}", exist_ok=True)
    for j in range(1000):
        with open(f"{root}/d{i}/f{j}", "wb") as f:
            f.write(os.urandom(1024))
PY
head -c 1073741824 /dev/urandom > "$d/big.bin"
mkdir -p "$d/p/pipelines"
cat > "$d/p/pipelines/data.yaml" <<YAML
data:
  many: { path: $d/many }
  big: { path: $d/big.bin }
stages:
  reads_many: { kind: command, run: 'true', inputs: { x: data.many } }
  reads_big: { kind: command, run: 'true', inputs: { x: data.big } }
YAML
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
cold=$(once "cd $d/p && $pretext status pipelines/data.yaml")
warm=$(cd "$d/p" && ms "$pretext status pipelines/data.yaml")
echo
echo "| data | pretext cold status (s) | pretext warm status (ms) |"
echo "|---|---|---|"
echo "| 100k x 1 KiB files + 1 GiB file | $cold | $warm |"
echo
echo "| cold hash of 1 GiB (page cache warm) | median ms |"
echo "|---|---|"
rm -rf "$d/p/cache/state"
echo "| pretext (status, state dropped each run) | $(cd "$d/p" && ms "sh -c 'rm -rf cache/state; $pretext status pipelines/data.yaml --stage reads_big'") |"
if command -v b3sum > /dev/null; then echo "| b3sum $(b3sum --version | cut -d' ' -f2) | $(ms "b3sum $d/big.bin") |"; fi
echo "| md5sum | $(RUNS=3 ms "md5sum $d/big.bin") |"
