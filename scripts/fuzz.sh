#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser of untrusted input with SharpFuzz + AFL++ (issue 14).
#
#   scripts/fuzz.sh [--execs N] [--seconds S] [--out DIR] [target ...]
#
# Builds tests/AnyPrecML.Fuzz, instruments AnyPrecML.dll, AnyPrecML.MLNet.dll (score's readers), anyprec.dll and Microsoft.ML.Tokenizers.dll
# with SharpFuzz, then runs afl-fuzz on each target (all of them by default) from the committed seed corpus
# tests/AnyPrecML.Fuzz/corpus/<target> (with json.dict for the targets that read JSON), one target after another,
# until N executions (default 100000) or S seconds (default 1800), whichever comes first. Prints one line per target from AFL++'s fuzzer_stats and copies every crash
# and hang to tests/AnyPrecML.Fuzz/crashes/<target>/ and the inputs AFL++ kept for new coverage to found/<target>/,
# where FuzzReplayTests replays them in the ordinary test run.
# Needs afl-fuzz (Debian package afl++) and the sharpfuzz tool (dotnet tool SharpFuzz.CommandLine 2.3.0); both are
# installed when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

execs=100000
seconds=1800
out=${TMPDIR:-/tmp}/anyprec-fuzz
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --execs) execs=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set/{/^#/p}' "$0"; exit 0 ;;
    *) targets+=("$1"); shift ;;
  esac
done

if ! command -v afl-fuzz >/dev/null; then
  echo "installing afl++ (apt-get)"
  apt-get update -qq && apt-get install -y -qq afl++ >/dev/null
fi
export PATH="$PATH:$HOME/.dotnet/tools"
if ! command -v sharpfuzz >/dev/null; then
  echo "installing the sharpfuzz tool (SharpFuzz.CommandLine 2.3.0)"
  dotnet tool install --global SharpFuzz.CommandLine --version 2.3.0 >/dev/null
fi

bin=$out/bin
rm -rf "$bin"
dotnet build tests/AnyPrecML.Fuzz -c Release -o "$bin" -v quiet -nologo >/dev/null
for dll in AnyPrecML.dll AnyPrecML.MLNet.dll anyprec.dll Microsoft.ML.Tokenizers.dll; do sharpfuzz "$bin/$dll" >/dev/null; done

if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(dotnet "$bin/AnyPrecML.Fuzz.dll" list | awk '{print $1}')
fi

# The .NET host is not an AFL-instrumented binary (SharpFuzz reports coverage itself); no core dumps or CPU pinning
# are needed on a shared machine.
export AFL_SKIP_BIN_CHECK=1 AFL_NO_UI=1 AFL_NO_AFFINITY=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1
export AFL_FORKSRV_INIT_TMOUT=60000 DOTNET_TieredPGO=0

summary=$out/summary.txt
printf '%-15s %10s %8s %8s %7s %7s %7s %7s\n' target execs seconds execs/s paths edges crashes hangs | tee "$summary"
status=0
for t in "${targets[@]}"; do
  findings=$out/findings/$t
  rm -rf "$findings"; mkdir -p "$out/findings"
  # -t: 5 s per input (a first .NET call JITs; a real hang is far longer); -m none: .NET reserves address space.
  case "$t" in llama2c|tokenizer|score-csv) dict=() ;; *) dict=(-x tests/AnyPrecML.Fuzz/json.dict) ;; esac
  afl-fuzz -i "tests/AnyPrecML.Fuzz/corpus/$t" -o "$findings" "${dict[@]}" -t 5000 -m none -E "$execs" -V "$seconds" \
    -- dotnet "$bin/AnyPrecML.Fuzz.dll" fuzz "$t" > "$out/$t.log" 2>&1 || { echo "$t: afl-fuzz failed, see $out/$t.log"; status=1; continue; }
  stats=$findings/default/fuzzer_stats
  field() { awk -F' *: *' -v k="$1" '$1 == k {print $2}' "$stats"; }
  printf '%-15s %10s %8s %8s %7s %7s %7s %7s\n' "$t" "$(field execs_done)" "$(field run_time)" "$(field execs_per_sec)" "$(field corpus_count)" \
    "$(field edges_found)" "$(field saved_crashes)" "$(field saved_hangs)" | tee -a "$summary"
  # The inputs with new coverage (not the seeds), up to 8 KB each, are kept for replay by the ordinary tests.
  for f in "$findings/default/queue"/id:*; do
    case "$f" in *orig:*) continue ;; esac
    [ "$(stat -c %s "$f")" -le 8192 ] || continue
    mkdir -p "$repo/tests/AnyPrecML.Fuzz/found/$t"
    cp "$f" "$repo/tests/AnyPrecML.Fuzz/found/$t/$(sha1sum "$f" | cut -c1-12)"
  done
  for kind in crashes hangs; do
    for f in "$findings/default/$kind"/id:*; do
      [ -e "$f" ] || continue
      mkdir -p "$repo/tests/AnyPrecML.Fuzz/crashes/$t"
      cp "$f" "$repo/tests/AnyPrecML.Fuzz/crashes/$t/$kind-$(sha1sum "$f" | cut -c1-12)"
      status=1
    done
  done
done
exit $status
