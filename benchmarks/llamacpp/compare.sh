#!/usr/bin/env bash
# Decode speed of anyprec beside llama.cpp on the same synthetic TinyLlama-1.1B-shaped weights, same
# threads, one run: b=2..8 against Q2_K, Q3_K_M, Q4_K_M, Q5_K_M, Q6_K, Q8_0 (README.md beside this file).
#
# Usage: benchmarks/llamacpp/compare.sh [options] LLAMA_CPP [--anyprec-args ARGS...]
#   LLAMA_CPP  a llama.cpp source tree, or a bare git directory to check one out from (into WORK/llama.cpp).
#   --work DIR        where every big file goes (default /tmp/anyprec-llamacpp): builds, models, GGUFs, results
#   --threads N       threads for both (default: all CPUs); below that, both are pinned to CPUs 0..N-1
#   --avx2            llama.cpp built AVX2-only (WORK/build-avx2) and anyprec with DOTNET_EnableAVX512=0
#   --llama-build native|avx2   llama.cpp's build alone (default: as --avx2 says): on an AVX-512 CPU its AVX2 build
#                     can be the faster one, so compare native anyprec against the faster of the two
#   --prefill         also llama-bench -p 512 (pass anyprec's prefill option through --anyprec-args)
#   --tokens N        decode tokens (default 32)
#   --depth N         decode after a context of N tokens (llama.cpp: llama-batched-bench -npp N -ntg TOKENS, one run
#                     whatever --reps says, its default F16 KV cache; anyprec: bench engine --depth N, its default
#                     bf16 cache, or fp32 with --anyprec-args --kv-cache fp32);
#                     not with --prefill
#   --reps N          llama-bench repetitions (default 5)
#   --types "T ..."   llama.cpp types (default "Q2_K Q3_K_M Q4_K_M Q5_K_M Q6_K Q8_0")
#   --model DIR       Hugging Face directory to use instead of `anyprec synth --shape tinyllama-1.1b`
#   --anyprec DIR     any-precision directory to use instead of quantizing --model (seed 3, parent 8, uniform)
#   --layers N        synthesize only N layers (quick checks; a model of its own in WORK)
#   --outtype f16|f32 base GGUF type before llama-quantize (default f16)
#   --jobs N          build parallelism (default 2)
#   --skip-anyprec / --skip-llamacpp   run one side only (the table shows "–" for the other)
#   --anyprec-args ...  everything after it goes to `anyprec bench engine` (e.g. --accuracy int8)
#
# Getting llama.cpp's source (nothing of it is committed here): any checkout works; tested with b4747
# (commit c392e5094). The project's `fetch` tool (source github:ggerganov/llama.cpp) gives a bare git
# directory such as /work/.mirror/ggerganov+llama.cpp/repo; pass it as LLAMA_CPP and this script checks
# it out into WORK/llama.cpp, or do it by hand:
#   git clone -q --no-checkout /work/.mirror/ggerganov+llama.cpp/repo /tmp/anyprec-llamacpp/llama.cpp
#   git -C /tmp/anyprec-llamacpp/llama.cpp restore --source=HEAD --staged --worktree -- . ':(exclude)models/*.gguf'
# (the snapshot lacks its largest blobs, the vocabulary GGUFs under models/, which nothing here needs;
# a plain `git clone` of it fails its checkout on them). Elsewhere: git clone https://github.com/ggerganov/llama.cpp
#
# Needs: cmake and a C++ compiler; the .NET SDK; a python3 with numpy and sentencepiece (Debian:
# apt-get install python3-numpy python3-sentencepiece; or pip) for the GGUF converter; no torch.
# Every step reuses what an earlier run left in WORK (builds are incremental; models and GGUFs are
# written to a temporary name and renamed, so a file that exists is whole).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
shared=${ANYPREC_SHARED:-$repo/../shared} # the models and data: ../shared beside the repository, or $ANYPREC_SHARED
work=/tmp/anyprec-llamacpp
threads=$(nproc)
avx2=0 llama_isa="" prefill=0 tokens=32 depth=0 reps=5 layers="" outtype=f16 jobs=2
types="Q2_K Q3_K_M Q4_K_M Q5_K_M Q6_K Q8_0"
model="" apdir="" src="" skip_anyprec=0 skip_llamacpp=0
anyprec_args=()

die() { echo "error: $*" >&2; exit 2; }
say() { echo "== $*" >&2; }
need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }
positive() { [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"; }

while [[ $# -gt 0 ]]; do
    case $1 in
        --work) need_value "$@"; work=$2; shift 2 ;;
        --threads) need_value "$@"; positive "$1" "$2"; threads=$2; shift 2 ;;
        --avx2) avx2=1; shift ;;
        --llama-build) need_value "$@"; llama_isa=$2; shift 2 ;;
        --prefill) prefill=1; shift ;;
        --tokens|-n) need_value "$@"; positive "$1" "$2"; tokens=$2; shift 2 ;;
        --reps) need_value "$@"; positive "$1" "$2"; reps=$2; shift 2 ;;
        --depth|-d) need_value "$@"; positive "$1" "$2"; depth=$2; shift 2 ;;
        --types) need_value "$@"; types=$2; shift 2 ;;
        --model) need_value "$@"; model=$2; shift 2 ;;
        --anyprec) need_value "$@"; apdir=$2; shift 2 ;;
        --layers) need_value "$@"; positive "$1" "$2"; layers=$2; shift 2 ;;
        --outtype) need_value "$@"; [[ $2 == f16 || $2 == f32 ]] || die "--outtype must be f16 or f32"; outtype=$2; shift 2 ;;
        --jobs|-j) need_value "$@"; positive "$1" "$2"; jobs=$2; shift 2 ;;
        --skip-anyprec) skip_anyprec=1; shift ;;
        --skip-llamacpp) skip_llamacpp=1; shift ;;
        --anyprec-args) shift; anyprec_args=("$@"); break ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [[ -z $src ]] || die "one llama.cpp directory expected, got '$src' and '$1'"; src=$1; shift ;;
    esac
done
[[ $skip_llamacpp == 1 || -n $src ]] || die "give a llama.cpp source directory (see --help)"
[[ $depth == 0 || $prefill == 0 ]] || die "--depth and --prefill are separate runs (one times decode after a context, the other the prompt itself)"
(( threads <= $(nproc) )) || die "--threads $threads is more than the $(nproc) CPUs here"
for t in $types; do
    case $t in Q2_K|Q3_K_M|Q4_K_M|Q5_K_M|Q6_K|Q8_0) ;; *) die "--types: $t is not one of Q2_K Q3_K_M Q4_K_M Q5_K_M Q6_K Q8_0" ;; esac
done
mkdir -p "$work/results"
work=$(cd "$work" && pwd)

# Both sides on the same CPUs: .NET sizes its kernel pool from the affinity mask, ORT and llama.cpp get -t/affinity.
pin=()
if (( threads < $(nproc) )); then
    command -v taskset >/dev/null || die "--threads below the CPU count needs taskset (util-linux)"
    pin=(taskset -c "0-$((threads - 1))")
fi
isa=native
[[ $avx2 == 1 ]] && isa=avx2
llama_isa=${llama_isa:-$isa}
[[ $llama_isa == native || $llama_isa == avx2 ]] || die "--llama-build takes native or avx2, not '$llama_isa'"

# A python that can run the converter.
python=""
for p in ${PYTHON:-} python3 /usr/bin/python3; do
    if command -v "$p" >/dev/null && "$p" -c 'import numpy, sentencepiece' 2>/dev/null; then python=$p; break; fi
done

anyprec() { dotnet run --project "$repo/src/AnyPrecML.Cli" -c Release --no-build -- "$@"; }

# ---- 1. llama.cpp's CPU tools -------------------------------------------------------------------
if [[ $skip_llamacpp == 0 ]]; then
    [[ -d $src ]] || die "llama.cpp directory '$src' does not exist"
    if [[ ! -f $src/CMakeLists.txt ]]; then
        git --git-dir="$src" rev-parse --verify -q HEAD >/dev/null || die "'$src' is neither a llama.cpp source tree nor a git directory"
        if [[ ! -f $work/llama.cpp/CMakeLists.txt ]]; then
            say "checking out llama.cpp from $src into $work/llama.cpp"
            rm -rf "$work/llama.cpp"
            git clone -q --no-checkout "$src" "$work/llama.cpp"
            git -C "$work/llama.cpp" restore --source=HEAD --staged --worktree -- . ':(exclude)models/*.gguf'
        fi
        src=$work/llama.cpp
    fi
    src=$(cd "$src" && pwd)
    [[ -f $src/examples/llama-bench/llama-bench.cpp && -d $src/gguf-py/gguf ]] || die "'$src' does not look like a llama.cpp source tree (no examples/llama-bench or gguf-py)"
    build=$work/build-$llama_isa
    flags=(-DGGML_NATIVE=ON)
    [[ $llama_isa == avx2 ]] && flags=(-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF)
    say "building llama-bench, llama-batched-bench and llama-quantize ($llama_isa) in $build (log: $build.log)"
    { cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF "${flags[@]}" \
        && cmake --build "$build" --config Release -j "$jobs" --target llama-bench llama-batched-bench llama-quantize; } > "$build.log" 2>&1 \
        || { tail -20 "$build.log" >&2; die "llama.cpp build failed (log: $build.log)"; }
    bench_bin=$build/bin/llama-bench quantize_bin=$build/bin/llama-quantize batched_bin=$build/bin/llama-batched-bench
    [[ -x $bench_bin && -x $quantize_bin && -x $batched_bin ]] || die "the build left no $bench_bin, $batched_bin or $quantize_bin"
fi

# ---- 2. the model: synthetic weights, then the any-precision parent -----------------------------
if [[ $skip_anyprec == 0 || -z $model ]]; then
    say "building the anyprec CLI (Release)"
    dotnet build "$repo/src/AnyPrecML.Cli" -c Release -v q -nologo > "$work/results/dotnet-build.log" 2>&1 \
        || { tail -20 "$work/results/dotnet-build.log" >&2; die "dotnet build failed (log: $work/results/dotnet-build.log)"; }
fi
name=tinyllama-1.1b${layers:+-L$layers}
if [[ -z $model ]]; then
    model=$work/$name
    if [[ ! -f $model/config.json ]]; then
        say "synthesizing $name in $model"
        tok=$shared/models/llama2-tokenizer/tokenizer.model
        [[ -f $tok ]] || die "the Llama 2 tokenizer $tok is missing"
        anyprec synth --shape tinyllama-1.1b ${layers:+--layers $layers} --tokenizer "$tok" --output "$model" >&2
    fi
fi
[[ -f $model/config.json && -f $model/model.safetensors ]] || die "'$model' is not a Hugging Face directory (config.json + model.safetensors)"
model=$(cd "$model" && pwd)
name=$(basename "$model")
if [[ $skip_anyprec == 0 ]]; then
    if [[ -z $apdir ]]; then
        apdir=$work/$name-ap
        if [[ ! -d $apdir ]]; then
            say "quantizing $model into $apdir (seed 3, parent 8, uniform sensitivity)"
            anyprec quantize -m "$model" --sensitivity uniform --seed-bits 3 --parent-bits 8 --output "$apdir" >&2
        fi
    fi
    [[ -d $apdir ]] || die "any-precision directory '$apdir' does not exist"
fi

# ---- 3. GGUF of the same weights, 4. quantized with llama-quantize ------------------------------
if [[ $skip_llamacpp == 0 ]]; then
    gguf_dir=$work/gguf
    mkdir -p "$gguf_dir"
    base=$gguf_dir/$name-${outtype^^}.gguf
    if [[ ! -f $base ]]; then
        [[ -n $python ]] || die "no python3 with numpy and sentencepiece (apt-get install python3-numpy python3-sentencepiece, or set PYTHON)"
        say "converting $model to $base"
        tok=$model/tokenizer.model
        [[ -f $tok ]] || tok=$shared/models/llama2-tokenizer/tokenizer.model
        "$python" "$here/hf_to_gguf.py" --model "$model" --tokenizer "$tok" --gguf-py "$src/gguf-py" --outtype "$outtype" --output "$base" >&2
    fi
    for t in $types; do
        out=$gguf_dir/$name-$t.gguf
        if [[ ! -f $out ]]; then
            say "llama-quantize $t -> $out"
            "$quantize_bin" "$base" "$out.tmp" "$t" "$threads" > "$out.log" 2>&1 || { tail -5 "$out.log" >&2; die "llama-quantize $t failed (log: $out.log)"; }
            mv "$out.tmp" "$out"
        fi
    done
fi

# ---- 5. the benchmarks, one after the other on the same CPUs ------------------------------------
results=$work/results/$name-$isa-llama-$llama_isa-t$threads
if (( depth > 0 )); then results=$results-d$depth; fi
mkdir -p "$results"
rm -f "$results"/*.json "$results"/*.jsonl
if [[ $skip_llamacpp == 0 && $depth -gt 0 ]]; then
    # llama-bench of this vintage has no depth option; llama-batched-bench prefills -npp tokens, then times -ntg decode steps.
    for t in $types; do
        say "llama-batched-bench $t: -t $threads -npp $depth -ntg $tokens -npl 1"
        "${pin[@]}" "$batched_bin" -m "$gguf_dir/$name-$t.gguf" -t "$threads" -c $((depth + tokens + 16)) -b 2048 -ub 512 \
            -npp "$depth" -ntg "$tokens" -npl 1 --output-format jsonl > "$results/llamacpp-$t.out" 2> "$results/llamacpp-$t.log" \
            || { tail -5 "$results/llamacpp-$t.log" >&2; die "llama-batched-bench $t failed"; }
        cat "$results/llamacpp-$t.out" "$results/llamacpp-$t.log" | grep '^{' > "$results/llamacpp-$t.jsonl" \
            || die "llama-batched-bench $t printed no result line (log: $results/llamacpp-$t.log)"
    done
elif [[ $skip_llamacpp == 0 ]]; then
    pp=(-p 0)
    [[ $prefill == 1 ]] && pp=(-p 512)
    for t in $types; do
        say "llama-bench $t: -t $threads ${pp[*]} -n $tokens -r $reps"
        "${pin[@]}" "$bench_bin" -m "$gguf_dir/$name-$t.gguf" -t "$threads" "${pp[@]}" -n "$tokens" -r "$reps" -o json \
            > "$results/llamacpp-$t.json" 2> "$results/llamacpp-$t.log" || { tail -5 "$results/llamacpp-$t.log" >&2; die "llama-bench $t failed"; }
    done
fi
if [[ $skip_anyprec == 0 ]]; then
    env_avx2=()
    [[ $avx2 == 1 ]] && env_avx2=(DOTNET_EnableAVX512=0)
    say "anyprec bench engine -m $apdir -n $tokens --json ${anyprec_args[*]} ${env_avx2[*]}"
    if ! env "${env_avx2[@]}" "${pin[@]}" dotnet run --project "$repo/src/AnyPrecML.Cli" -c Release --no-build -- \
            bench engine -m "$apdir" -n "$tokens" --depth "$depth" --json "${anyprec_args[@]}" > "$results/anyprec.json" 2> >(tee "$results/anyprec.log" >&2); then
        echo "warning: anyprec bench engine failed (log: $results/anyprec.log); the table shows no anyprec figures" >&2
        rm -f "$results/anyprec.json"
    fi
fi

# ---- 6. one table --------------------------------------------------------------------------------
field() { grep -m1 "^$1" /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//'; }
isa_flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | tr ' ' '\n' | grep -xE 'avx2|fma|f16c|avx_vnni|avx512f|avx512bw|avx512vbmi|avx512_vnni|gfni' | tr '\n' ' ' || true)
cpu="$(field 'model name') (family $(field 'cpu family'), model $(field 'model'); ${isa_flags% })"
# Every instruction-set knob in effect for .NET (--avx2 adds DOTNET_EnableAVX512=0), as the table's path line.
dotnet_path=$( { env | grep -E '^DOTNET_Enable[A-Za-z0-9]+=' | grep -v '^DOTNET_EnableAVX512=' || true; } | sort | tr '\n' ' ')
if [[ $avx2 == 1 ]]; then dotnet_path="DOTNET_EnableAVX512=0 $dotnet_path"
elif [[ -n ${DOTNET_EnableAVX512:-} ]]; then dotnet_path="DOTNET_EnableAVX512=$DOTNET_EnableAVX512 $dotnet_path"; fi
"${python:-python3}" - "$results" "$types" "$prefill" "$threads" "$llama_isa" "$cpu" "$dotnet_path" "$tokens" "$(nproc)" "$depth" <<'EOF'
import json, os, re, sys
results, types, prefill, threads, isa, cpu, dotnet_env, tokens, ncpu, depth = sys.argv[1:]
prefill = prefill == "1"
by_bits = {"Q2_K": 2, "Q3_K_M": 3, "Q4_K_M": 4, "Q5_K_M": 5, "Q6_K": 6, "Q8_0": 8}
llama, info = {}, None
for t in types.split():
    deep = os.path.join(results, f"llamacpp-{t}.jsonl")
    if os.path.exists(deep):  # llama-batched-bench: one run, no spread
        for line in open(deep):
            llama.setdefault(by_bits[t], {"type": t})["tg"] = (json.loads(line)["speed_tg"], None)
        continue
    path = os.path.join(results, f"llamacpp-{t}.json")
    if not os.path.exists(path):
        continue
    for r in json.load(open(path)):
        kind = "tg" if r["n_prompt"] == 0 else "pp"
        llama.setdefault(by_bits[t], {"type": t})[kind] = (r["avg_ts"], r["stddev_ts"])
        info = r
anyprec, backend, kv = {}, None, "its default"
path = os.path.join(results, "anyprec.json")
if os.path.exists(path):
    a = json.load(open(path))
    backend = a.get("backend")
    kv = a.get("kv_cache", "fp32")  # runs before the bf16 cache wrote no kv_cache: they were fp32
    for row in a.get("rows", []):
        tg = row.get("onnx_tokens_per_second", row.get("tokens_per_second"))
        pp = next((v for k, v in row.items() if "prefill" in k and k.endswith("tokens_per_second")), None)
        anyprec[row["bits"]] = (tg, pp)
elif os.path.exists(os.path.join(results, "anyprec.log")):  # failed or stopped: its first line still names the path
    m = re.search(r"bitplane backend: ([^\n]*)", open(os.path.join(results, "anyprec.log")).read())
    backend = m and m.group(1) + " (the bench did not finish)"

def cell(x, sd=None):
    if x is None:
        return "–"
    return f"{x:.1f} ± {sd:.1f}" if sd is not None else f"{x:.1f}"

def ratio(a, l):
    return f"{a / l:.2f}×" if a is not None and l else "–"

print(f"CPU: {cpu}; {ncpu} CPUs, {threads} thread{'s' if threads != '1' else ''} for both")
if info:
    print(f"llama.cpp: build {info.get('build_number')} ({info.get('build_commit')}), {isa} build, backends {info.get('backends')}, cpu_info {info.get('cpu_info')}")
elif llama:
    print(f"llama.cpp: {isa} build, llama-batched-bench")
print(f".NET path: {dotnet_env}bitplane backend {backend or '(anyprec did not run)'}")
print()
head = "| b | llama.cpp type | llama.cpp tok/s | anyprec tok/s | anyprec / llama.cpp |"
line = "|---:|---|---:|---:|---:|"
if prefill:
    head += " llama.cpp pp512 tok/s | anyprec prefill tok/s | prefill ratio |"
    line += "---:|---:|---:|"
if depth != "0":
    print(f"Decode of {tokens} tokens after a context of {depth} (llama.cpp: llama-batched-bench, one run, F16 KV cache; anyprec: {kv} cache)")
else:
    print(f"Decode of {tokens} tokens (llama.cpp: mean ± sd of llama-bench repetitions)")
print()
print(head)
print(line)
for b in sorted(set(llama) | set(anyprec)):
    l, (atg, app) = llama.get(b, {}), anyprec.get(b, (None, None))
    tg, pp = l.get("tg", (None, None)), l.get("pp", (None, None))
    cells = [str(b), l.get("type", "–"), cell(*tg), cell(atg), ratio(atg, tg[0])]
    if prefill:
        cells += [cell(*pp), cell(app), ratio(app, pp[0])]
    print("| " + " | ".join(cells) + " |")
EOF
echo "(raw results: $results)" >&2
