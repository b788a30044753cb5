#!/usr/bin/env bash
# Everything a lent GPU machine should measure, as one device call (about 8 minutes; the device
# budget is 15 minutes a session, machine start included):
#
#     run(command="bash benchmarks/gpu_session.sh", timeout_s=600)
#
# 1. benchmarks/kernels.py: the Triton merge kernel's sweep (tile and outer schedules, ieee and
#    tf32x3) against the device copy and the torch path: the issue-4 goal is fraction_of_copy ≥ 0.8
#    (docs/gpu-merge-kernel.md says what to do with the result);
# 2. benchmarks/merge.py on the machine's CPU cores (16 on the lent machines): the CPU merge, the
#    job's hashing (merge.sha256), and a sharded output written two shards at a time, which a
#    2-vCPU VM cannot show.
# Every step writes under $OUT (the device tool's folder that comes back) and runs even if an
# earlier one failed; each has its own time limit, so one stuck step cannot eat the others' time.
set -u
OUT=${OUT:-var/gpu-session}
PYTHON=${PYTHON:-python3}
WORK=${WORK:-/tmp/quiver-bench-merge}
mkdir -p "$OUT"

step() {  # step NAME SECONDS COMMAND…: stdout to $OUT/NAME.jsonl, stderr to $OUT/NAME.log
    local name=$1 seconds=$2
    shift 2
    local start=$SECONDS
    timeout "$seconds" "$@" > "$OUT/$name.jsonl" 2> "$OUT/$name.log"
    echo "$name: exit $? after $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
}

{ nvidia-smi; nproc; "$PYTHON" -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"; } \
    > "$OUT/machine.txt" 2>&1
step kernels 330 "$PYTHON" benchmarks/kernels.py --out "$OUT/kernels-lines.jsonl"
step merge-cpu 150 "$PYTHON" benchmarks/merge.py --work "$WORK" --keep --repeat 3 --skip-peft
step merge-cpu-sharded 90 "$PYTHON" benchmarks/merge.py --work "$WORK" --keep --repeat 3 --skip-peft --skip-sha256 \
    --max-shard-bytes 600000000
