#!/usr/bin/env bash
# Rows/s of `anyprec cluster score` on 1 and on 2 localhost silos against single-machine `anyprec score`, and the
# per-shard overhead (the same job in 1-row shards against 64-row shards on one silo). Each cluster figure is a second
# job after a warm-up job, so model opening and engine start-up on each silo are not counted.
# Usage: scripts/cluster-bench.sh MODELS_DIR MODEL_NAME INPUT.jsonl BITS   (anyprec from $ANYPREC, default: the Release build)
set -euo pipefail
models=$(realpath "$1"); name=$2; input=$(realpath "$3"); bits=$4
anyprec=${ANYPREC:-$(dirname "$0")/../src/AnyPrecML.Cli/bin/Release/net10.0/anyprec}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
silo() { "$anyprec" cluster silo --models "$models" --port "$1" --gateway-port "$2" --primary-port 21111 >"$work/silo-$1.log" 2>&1 & pids+=($!);
         until grep -q "silo up" "$work/silo-$1.log"; do sleep 0.2; done; }
job() { "$anyprec" cluster score -m "$name" -i "$input" -o "$work/$1.jsonl" --bits "$bits" --shard-rows "$2" --gateway-port 31000 31001 --json 2>/dev/null; }
rate() { python3 -c "import json,sys; d=json.loads(sys.argv[1]); print(f'{d[\"rows\"]+d[\"rejected\"]} rows, {d[\"shards\"]} shards, {d[\"seconds\"]} s, {(d[\"rows\"]+d[\"rejected\"])/d[\"seconds\"]:.1f} rows/s, {d[\"silos\"]} silos')" "$1"; }

echo "score (one process):"; "$anyprec" score -m "$models/$name" -i "$input" -o "$work/single.jsonl" --bits "$bits" --json | python3 -c "import json,sys; d=json.load(sys.stdin); print(f'  {d[\"rows\"]} rows, {d[\"seconds\"]} s, {d[\"rows_per_second\"]} rows/s')"
silo 21111 31000
job warm1 16 >/dev/null
echo "1 silo, 64-row shards: $(rate "$(job one64 64)")"
echo "1 silo, 1-row shards:  $(rate "$(job one1 1)")"
cmp -s "$work/single.jsonl" "$work/one64.jsonl" && cmp -s "$work/single.jsonl" "$work/one1.jsonl" && echo "  outputs identical to score"
silo 21112 31001
job warm2 16 >/dev/null
echo "2 silos, 64-row shards: $(rate "$(job two64 64)")"
echo "2 silos, 16-row shards: $(rate "$(job two16 16)")"
cmp -s "$work/single.jsonl" "$work/two64.jsonl" && cmp -s "$work/single.jsonl" "$work/two16.jsonl" && echo "  outputs identical to score"
