#!/bin/bash
cd /work/wt-ray
for run in "$@"; do
  for i in $(seq 120); do awk '{exit !($1 < 0.7)}' /proc/loadavg && break; sleep 5; done
  cluster=ray; n=${run#r}; [ "${run:0:1}" = "l" ] && cluster=local && n=1
  echo "== $run start $(date +%T) load: $(cut -d' ' -f1-3 /proc/loadavg)"
  python /tmp/cpuacct.py > /tmp/cpu-$run-$(date +%H%M%S).txt & acct=$!
  DYNGRAPH_CPU_THREADS=1 python -m pipeline bench server.cluster=$cluster server.replicas=$n 'bench.concurrency=[8]' 'bench.modes=[dynamic]' \
    bench.transformers.enabled=false bench.roofline.enabled=false engines_dir=/work/cache-ray output_dir=/tmp/bench-measure run_name=$run-$(date +%H%M%S) progress=false > /tmp/measure-$run.log 2>&1
  rc=$?
  kill -TERM $acct
  echo "== $run end $(date +%T) load: $(cut -d' ' -f1-3 /proc/loadavg) rc=$rc"
done
