#!/usr/bin/env bash
# How the GPU figures under bench_results/ were made: run from the repository root on a GPU host
# after `bash .gpuhost/install.sh` (which puts hydra, fastapi, onnxruntime-gpu... in /tmp/site).
# Two things prepare.sh does not do for this checkout:
#   - the server needs llguidance (runtime/constrained.py), which the GPU image lacks; its wheel is
#     manylinux_2_31, a tag prepare.sh's download does not name, so fetch it into the extras yourself and
#     carry .gpuhost/extra in one install call:
#       python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_31_x86_64 -d .gpuhost/extra llguidance==1.9.1
#   - a call carries at most 64 MiB with the checkout (~20 MB now), so 50 MiB onnxruntime parts no longer
#     fit: split the wheel again into 40 MiB parts (cat .gpuhost/ort-part? > w; rm .gpuhost/ort-part?;
#     split -b 40M -d -a 1 w .gpuhost/ort-part; ls .gpuhost/ort-part? | wc -l > .gpuhost/ort.parts),
#     seven calls then, the wheels and the extras (llguidance, onnxruntime-genai-cuda) with the last
#   scripts/gpu_host.sh export              phone-9b, fp16, CUDA, into $ENGINES (log in $OUT)
#   scripts/gpu_host.sh gputests            the GPU tests (a tiny fp16 export on CUDA, captured decode steps)
#   scripts/gpu_host.sh profile [ARGS]      where a decode step's time goes (scripts/decode_profile.py)
#   scripts/gpu_host.sh probe PLACEMENT [QUANTIZE [REFERENCE]]  serve it (one_gpu | two_gpu), one request per path, /stats
#                                           (REFERENCE: an earlier probe's JSON, for each path's token agreement with it)
#   scripts/gpu_host.sh bench PLACEMENT [OVERRIDES]  start the default-mix benchmark detached (it outlives the call)
#   scripts/gpu_host.sh wait [SECONDS]      wait for it, then pack the report into $OUT/bench.tgz
#   scripts/gpu_host.sh soak                64 streams x 5 min against one_gpu (issue 11's GPU form), into $OUT/soak.tgz
#   scripts/gpu_host.sh calibrate           a corpus from the installed packages, phone-9b's exits calibrated, into $OUT/calibration.tgz
#   scripts/gpu_host.sh variants            fp16, int8 and int4 exports at once (logs in $OUT)
#   scripts/gpu_host.sh memory EXPORT:SETTINGS ...  decode profiles (batch 1 and 16) with the process's GPU memory, per export
#                                           (onnx, onnx-int8, onnx-int4) and settings: ours, ort (ONNX Runtime's own arena and
#                                           initializer settings), dequant (ours with MatMulNBits's default kernel instead of fpA_intB)
#   scripts/gpu_host.sh hostcopy            host copies of engine weights: pinned, registered, pageable (scripts/host_copy_bench.py)
#   scripts/gpu_host.sh benchrun NAME [OVERRIDES]   one bench in the foreground, its report into $OUT/bench-NAME.tgz
#   scripts/gpu_host.sh pack NAME           everything under $OUT into $OUT/NAME.tgz
#   scripts/gpu_host.sh reference           the code corpus, then the reference model trained with and without exit losses
#                                           side by side on the one GPU (their reports into $OUT/reference.tgz)
#   scripts/gpu_host.sh referencebench [OVERRIDES]  its fp16 engines exported, then the default mix and the corpus's held-out
#                                           groups under the calibrated confidence policy, and the quality/latency curve over
#                                           thresholds (+preset=reference-gpu-bench), into $OUT/bench-reference.tgz
#   scripts/gpu_host.sh matmulnbits         MatMulNBits int8/int4 against fp16 MatMul per decoder matrix (scripts/matmulnbits_bench.py)
#   scripts/gpu_host.sh referencetrain      the code corpus, then the reference model trained with exit losses (its report
#                                           into $OUT/reference.tgz; the checkpoint stays in /data/engines/reference)
#   scripts/gpu_host.sh ortprofile [LAYERS ...]  ONNX Runtime's profiler (decode_profile.py --ort-profile) on phone-9b's
#                                           engines, and on ORT GenAI's graph of the same dims at each depth given (built with
#                                           `python -m bench.peer build`, profiled by peer_profile.py, deleted): once as is
#                                           (node times are launches), once with CUDA_LAUNCH_BLOCKING=1 (kernel times), side by
#                                           side per decoder layer; into $OUT/ort-profile.tgz. PEER=DIR[:DIR] profiles builds
#                                           made before instead (dirs holding genai_config.json); needs onnxruntime-genai-cuda
#                                           only to build
#   scripts/gpu_host.sh speculation NAME [OVERRIDES]  bench=speculation in the foreground on the bench's composed model
#                                           (e.g. +preset=reference-gpu-bench), its report into $OUT/speculation-NAME.tgz
#   scripts/gpu_host.sh budget NAME [SECONDS [OVERRIDES]]  issue 27: the memory-budget sweep (+preset=phone-9b-gpu-budget:
#                                           fp16, int8, int4 exported first; text-shallow then the default mix; static, resident,
#                                           on demand, budgets) in the foreground, stopped after SECONDS (540) if still running
#                                           (its report is rewritten after every server), into $OUT/budget-NAME.tgz
set -euo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
ENGINES=${ENGINES:-/tmp/engines}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
MODEL=(model=phone-9b export.dtype=fp16 export.device=cuda "engines_dir=$ENGINES")

wait_healthy() {  # port, server pid
  python3 - "$1" "$2" <<'PY'
import os, sys, time, httpx
port, pid = sys.argv[1], int(sys.argv[2])
for _ in range(600):
    try:
        if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("the server exited before it was ready")
    time.sleep(0.5)
sys.exit("the server was not ready after 300 s")
PY
}

case "${1:-}" in
export)
  start=$(date +%s)
  python3 -m pipeline export "${MODEL[@]}" export.progress=false 2>&1 | tee "$OUT/export.log"
  echo "export wall time: $(( $(date +%s) - start )) s" | tee -a "$OUT/export.log" ;;
gputests)
  python3 -m pytest tests/test_export_gpu.py -q -rs 2>&1 | tee "$OUT/gpu-tests.log" ;;
profile)
  shift
  python3 scripts/decode_profile.py "$ENGINES/phone-9b/onnx" --out "$OUT/decode-profile.json" "$@" 2>&1 | tee "$OUT/decode-profile.log" ;;
probe)
  placement=$2 quantize=${3:-null} reference=${4:-} port=8123
  name=$placement${3:+-$3}
  start=$(date +%s)
  python3 -m runtime.serve "${MODEL[@]}" "export.quantize=$quantize" "runtime=$placement" runtime.policy.request_override=true \
    "server.port=$port" > "$OUT/serve-$name.log" 2>&1 &
  pid=$!
  wait_healthy $port $pid
  echo "server ready after $(( $(date +%s) - start )) s" | tee "$OUT/probe-$name.txt"
  python3 -m runtime.probe --url "http://127.0.0.1:$port" --out "$OUT/probe-$name.json" ${reference:+--reference "$reference"} 2>&1 \
    | tee -a "$OUT/probe-$name.txt"
  python3 -c "import httpx, json; print(json.dumps(httpx.get('http://127.0.0.1:$port/stats').json(), indent=1))" > "$OUT/stats-$name.json"
  kill -TERM $pid && wait $pid || true ;;
bench)
  placement=$2; shift 2
  rm -rf /tmp/bench_results
  setsid nohup python3 -m pipeline bench "${MODEL[@]}" "server.runtime=$placement" output_dir=/tmp/bench_results progress=false "$@" \
    > /tmp/bench.log 2>&1 < /dev/null &
  echo $! > /tmp/bench.pid
  echo "bench started: tail /tmp/bench.log" ;;
wait)
  pid=$(cat /tmp/bench.pid) deadline=$(( $(date +%s) + ${2:-540} ))
  while kill -0 "$pid" 2> /dev/null && [ "$(date +%s)" -lt $deadline ]; do sleep 5; done
  kill -0 "$pid" 2> /dev/null && echo "still running"
  tail -n 40 /tmp/bench.log
  cp /tmp/bench.log "$OUT/"
  [ -d /tmp/bench_results ] && tar czf "$OUT/bench.tgz" -C /tmp/bench_results . ;;
soak)
  rm -rf /tmp/soak_results
  python3 -m pipeline bench bench=soak "${MODEL[@]}" server.runtime=one_gpu output_dir=/tmp/soak_results progress=false \
    bench.soak.streams=64 bench.soak.duration_s=300 bench.soak.warmup_s=60 > /tmp/soak.log 2>&1 || echo "soak failed: exit $?" >> /tmp/soak.log
  tail -n 60 /tmp/soak.log | tee "$OUT/soak.log"
  [ -d /tmp/soak_results ] && tar czf "$OUT/soak.tgz" -C /tmp/soak_results . ;;
calibrate)
  rm -rf /tmp/corpus /tmp/calibration
  python3 scripts/build_corpus.py /tmp/corpus 2>&1 | tail -n 3 | tee "$OUT/calibrate.log"
  python3 -m pipeline calibrate model=phone-9b calibrate=gpu calibrate.corpus=/tmp/corpus calibrate.output_dir=/tmp/calibration \
    model.text.exit_adapter_rank=16 calibrate.max_minutes=3 calibrate.progress=false 2>&1 | tail -n 60 | tee -a "$OUT/calibrate.log"
  tar czf "$OUT/calibration.tgz" -C /tmp/calibration . ;;
variants)
  for q in null int8 int4; do
    python3 -m pipeline export "${MODEL[@]}" "export.quantize=$q" export.progress=false > "$OUT/export-$q.log" 2>&1 &
  done
  wait
  tail -n 3 "$OUT"/export-*.log; df -h /tmp | tail -n 1 ;;
memory)
  shift
  for run in "$@"; do
    d=${run%%:*} settings=${run#*:}
    flags=(); [ "$settings" = ort ] && flags=(--ort-defaults); [ "$settings" = dequant ] && flags=(--session-config ep.cuda.fpa_intb_gemm=0)
    timeout 150 python3 scripts/decode_profile.py "$ENGINES/phone-9b/$d" --graphs-only --steps 32 "${flags[@]}" \
      --out "$OUT/memory-$d-$settings.json" > "$OUT/memory-$d-$settings.log" 2>&1 || echo "$run: exit $?"
    tail -n 8 "$OUT/memory-$d-$settings.log"
  done ;;
hostcopy)
  python3 scripts/host_copy_bench.py --out "$OUT/host-copy.json" 2>&1 | tee "$OUT/host-copy.log" ;;
benchrun)
  name=$2; shift 2
  rm -rf /tmp/bench_results
  python3 -m pipeline bench "${MODEL[@]}" server.runtime=one_gpu output_dir=/tmp/bench_results progress=false "$@" > "$OUT/bench-$name.log" 2>&1 || true
  tail -n 25 "$OUT/bench-$name.log"
  [ -d /tmp/bench_results ] && tar czf "$OUT/bench-$name.tgz" -C /tmp/bench_results . ;;
reference)
  start=$(date +%s)
  python3 scripts/build_corpus.py /data/corpus-code --code > "$OUT/corpus.log" 2>&1
  echo "corpus: $(( $(date +%s) - start )) s" | tee -a "$OUT/corpus.log"
  # the same seed, corpus and data order: the two runs differ only in the exit losses
  python3 -m pipeline calibrate +preset=reference-gpu-train > "$OUT/train.log" 2>&1 & with=$!
  python3 -m pipeline calibrate +preset=reference-gpu-train calibrate.train.early_exit_loss=false \
    calibrate.output_dir=/data/engines/reference/no-exit-loss > "$OUT/train-no-exit-loss.log" 2>&1 & without=$!
  wait $with || true; wait $without || true
  echo "corpus and both trainings: $(( $(date +%s) - start )) s" | tee -a "$OUT/train.log"
  tail -n 30 "$OUT/train.log"
  tar czf "$OUT/reference.tgz" -C /data/engines/reference --exclude='*.safetensors' . ;;
referencebench)
  shift
  # the preset's corpus groups need the corpus the checkpoint was trained on (`reference` builds both)
  for f in /data/corpus-code/corpus.json /data/engines/reference/checkpoint/tokenizer.json; do
    [ -f "$f" ] || { echo "no $f: run scripts/gpu_host.sh reference first"; exit 2; }
  done
  python3 -m pipeline export +preset=reference-gpu export.progress=false > "$OUT/export-reference.log" 2>&1
  tail -n 5 "$OUT/export-reference.log"
  rm -rf /tmp/bench_results
  start=$(date +%s)
  python3 -m pipeline bench +preset=reference-gpu-bench output_dir=/tmp/bench_results run_name=reference progress=false "$@" \
    > "$OUT/bench-reference.log" 2>&1 || true
  echo "bench wall time: $(( $(date +%s) - start )) s" | tee -a "$OUT/bench-reference.log"
  tail -n 40 "$OUT/bench-reference.log"
  [ -d /tmp/bench_results ] && tar czf "$OUT/bench-reference.tgz" -C /tmp/bench_results . ;;
referencetrain)
  start=$(date +%s)
  python3 scripts/build_corpus.py /data/corpus-code --code > "$OUT/corpus.log" 2>&1
  echo "corpus: $(( $(date +%s) - start )) s" | tee -a "$OUT/corpus.log"
  python3 -m pipeline calibrate +preset=reference-gpu-train calibrate.progress=false > "$OUT/train.log" 2>&1 || echo "training failed: exit $?"
  echo "corpus and training: $(( $(date +%s) - start )) s" | tee -a "$OUT/train.log"
  tail -n 30 "$OUT/train.log"
  tar czf "$OUT/reference.tgz" -C /data/engines/reference --exclude='*.safetensors' . ;;
speculation)
  name=$2; shift 2
  rm -rf /tmp/speculation_results
  python3 -m pipeline bench bench=speculation output_dir=/tmp/speculation_results run_name="$name" progress=false "$@" \
    > "$OUT/speculation-$name.log" 2>&1 || echo "bench failed: exit $?"
  tail -n 30 "$OUT/speculation-$name.log"
  [ -d /tmp/speculation_results ] && tar czf "$OUT/speculation-$name.tgz" -C /tmp/speculation_results . ;;
ortprofile)
  shift
  rm -rf /tmp/ort-profile && mkdir -p /tmp/ort-profile
  for blocking in 0 1; do  # ours first: each peer's profile is then written beside it
    CUDA_LAUNCH_BLOCKING=$blocking timeout 300 python3 scripts/decode_profile.py "$ENGINES/phone-9b/onnx" \
      --ort-profile "/tmp/ort-profile/blocking-$blocking" > "$OUT/ort-profile-ours-$blocking.log" 2>&1 \
      || echo "ours (CUDA_LAUNCH_BLOCKING=$blocking): exit $?"
  done
  profile_peer() {  # model dir, what to call it
    for blocking in 0 1; do
      CUDA_LAUNCH_BLOCKING=$blocking timeout 300 python3 scripts/peer_profile.py "$1" --out "/tmp/ort-profile/blocking-$blocking" \
        --beside "/tmp/ort-profile/blocking-$blocking/ours.json" >> "$OUT/ort-profile-peer-$blocking.log" 2>&1 \
        || echo "peer $2 (CUDA_LAUNCH_BLOCKING=$blocking): exit $?"
    done
  }
  peers=(); [ -n "${PEER:-}" ] && IFS=: read -r -a peers <<< "$PEER"
  for dir in "${peers[@]}"; do profile_peer "$dir" "$dir"; done
  for layers in "$@"; do  # one build at a time: phone-9b's 24 layers take ~16 GB of disk
    dir=/tmp/ort-profile-peer-$layers
    if python3 -m bench.peer build "$ENGINES/phone-9b/onnx" "$layers" "$dir" > "$OUT/ort-profile-build-$layers.log" 2>&1; then
      profile_peer "$dir/model" "$layers layers"
    else
      echo "peer build at $layers layers: exit $?"; tail -n 3 "$OUT/ort-profile-build-$layers.log"
    fi
    rm -rf "$dir"
  done
  cat /tmp/ort-profile/blocking-1/beside-*.md 2> /dev/null | head -n 80
  tar czf "$OUT/ort-profile.tgz" -C /tmp/ort-profile . ;;
budget)
  name=$2 limit=${3:-540}; shift $(( $# < 3 ? $# : 3 ))
  rm -rf /tmp/budget_results
  start=$(date +%s)
  # SIGINT to the bench and its server (timeout signals its process group): the bench stops the server and
  # writes what finished; SIGKILL 20 s later if it has not
  timeout -s INT -k 20 "$limit" python3 -m pipeline bench +preset=phone-9b-gpu-budget "engines_dir=$ENGINES" \
    output_dir=/tmp/budget_results run_name="$name" progress=false "$@" > "$OUT/budget-$name.log" 2>&1 \
    || echo "bench exit $? (124: stopped after $limit s)" >> "$OUT/budget-$name.log"
  echo "budget sweep wall time: $(( $(date +%s) - start )) s" >> "$OUT/budget-$name.log"
  tail -n 50 "$OUT/budget-$name.log"
  [ -d /tmp/budget_results ] && tar czf "$OUT/budget-$name.tgz" -C /tmp/budget_results . ;;
matmulnbits)
  python3 scripts/matmulnbits_bench.py --out "$OUT/matmulnbits.json" 2>&1 | tee "$OUT/matmulnbits.log" ;;
pack)  # everything under $OUT into one $OUT/NAME.tgz (what comes back is at most 8 files)
  tar czf "/tmp/$2.tgz" -C "$OUT" . && rm -rf "${OUT:?}"/* && mv "/tmp/$2.tgz" "$OUT/" ;;
*)
  sed -n "2,/^set /{/^set /!p}" "$0"; exit 2 ;;
esac
