#!/usr/bin/env bash
# One lane of benchmarks/attribution.py runs (BENCHMARKS.md section 3a): each ROW:SEED in turn, from a clone of this
# checkout at a fixed COMMIT, one thread; as each record lands it is copied into this checkout's
# benchmarks/results/attribution.json, the tables (BENCHMARKS.md, README.md) and the figure are remade, and those
# files alone are committed. Two lanes share a machine's two cores; they share the results file and a lock.
#
#   bash benchmarks/lanes.sh WORK FAMILY COMMIT ROW:SEED [ROW:SEED ...]
#   e.g. (setsid nohup bash benchmarks/lanes.sh /work/bench sdxl e93352a preset:2 dmd2_head:1 > lane1.log 2>&1 &)
#
# WORK holds the clone (WORK/clone-COMMIT, made on first use, with a link to this checkout's .venv), the run folders
# (WORK/attribution_runs: an interrupted run resumes from its newest checkpoint) and the lanes' results file
# (WORK/attribution.json, seeded from this checkout's). PYTHONPATH puts the clone's flashdmd first: the shared .venv
# may hold an editable install of this checkout, and a record names the clone's commit.
# While lanes run, edit in a worktree, not in this checkout: a lane commits BENCHMARKS.md and README.md whole.
set -u
WORK=$1; FAM=$2; COMMIT=$3; shift 3
MAIN=$(cd "$(dirname "$0")/.." && pwd)
CLONE="$WORK/clone-$COMMIT"
mkdir -p "$WORK"
(
  flock 9
  if [ ! -d "$CLONE" ]; then
    git clone -q "$MAIN" "$CLONE" && git -C "$CLONE" checkout -q "$COMMIT" && ln -s "$MAIN/.venv" "$CLONE/.venv"
  fi
  [ -f "$WORK/attribution.json" ] || cp "$MAIN/benchmarks/results/attribution.json" "$WORK/attribution.json"
) 9>"$WORK/publish.lock"
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
for job in "$@"; do
  row=${job%:*}; seed=${job#*:}
  echo "$(date -u +%FT%T) start $row world-$FAM seed $seed"
  if ! (cd "$CLONE" && PYTHONPATH="$CLONE" .venv/bin/python benchmarks/attribution.py run --family "$FAM" \
        --rows "$row" --seeds "$seed" --out "$WORK/attribution_runs" --results "$WORK/attribution.json" \
        --no-progress --threads 1); then
    echo "$(date -u +%FT%T) FAILED $row world-$FAM seed $seed"
    continue
  fi
  echo "$(date -u +%FT%T) done $row world-$FAM seed $seed"
  (
    flock 9
    cd "$MAIN" || exit 1
    .venv/bin/python - "$WORK/attribution.json" "$row" "world-$FAM" "$seed" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from attribution import ROOT, load_results, save_record  # the harness's own atomic, locked replace
src, key = sys.argv[1], (sys.argv[2], sys.argv[3], int(sys.argv[4]))
rec = next(r for r in load_results(Path(src)) if (r["row"], r["teacher"], r["seed"]) == key)
save_record(ROOT / "benchmarks" / "results" / "attribution.json", rec)
PY
    .venv/bin/python benchmarks/tables.py --write > /dev/null
    .venv/bin/python benchmarks/attribution.py figure --family "$FAM" > /dev/null
    git add benchmarks/results/attribution.json BENCHMARKS.md README.md "docs/figures/attribution_$FAM.png"
    git commit -q -m "attribution: $row on world-$FAM, seed $seed (benchmarks/results/attribution.json)" \
      && echo "$(date -u +%FT%T) committed $row world-$FAM seed $seed"
  ) 9>"$WORK/publish.lock"
done
echo "$(date -u +%FT%T) lane finished"
