#!/usr/bin/env bash
# The GPU check: everything a first CUDA run must show, in one call of at most 9 minutes, kept as it goes.
#
#   bash .ci/gpu_check.sh OUT                 # on a GPU machine: .data/ staged (../shared/gpu/stage.sh)
#   bash .ci/gpu_check.sh --dry-run OUT       # the same steps on the CPU at tiny sizes (.ci/run runs it)
#
# Steps, each logged to NN_name.log with one line in summary.txt (exit status, seconds):
#   quick train + eval (README's quick run on CUDA), the same with --amp --compile, torchrun --nproc_per_node 1
#   (NCCL) eager and with --compile (their weights compared), SIGTERM then --resume, bench.py's table, a profiled anchor step, then ce,
#   anchor --lam 0 and anchor (all 49,000 training images, width 64, batch 512, PGD-10, eps 8/255, seed 0) for as
#   many epochs as the time left allows, each evaluated on the 10,000 test images (clean, PGD-20), and AutoAttack
#   on 1,000 while time remains. Every step runs under a timeout of the time left (train.py saves on the SIGTERM),
#   a failed step is recorded and the next one runs; the exit status is 1 if any failed.
# OUT receives two files, rewritten after every step (the device tool returns at most 8 files): summary.txt and
# gpu_check.tar.gz, the logs, JSON and traces; checkpoints stay behind in a scratch folder, deleted at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out=${1:?usage: bash .ci/gpu_check.sh [--dry-run] OUT}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$(date +%s)
budget=${GPU_CHECK_SECONDS:-$([ $dry = 1 ] && echo 120 || echo 520)}  # the device call's 540 s, less a margin
failed=0
left() { echo $((budget - ($(date +%s) - start))); }
pack() {  # the results so far into OUT: never a checkpoint
    cp "$work/summary.txt" "$out/summary.txt" 2>/dev/null
    tar czf "$out/gpu_check.tar.gz.tmp" -C "$work" --exclude='*.pt' --exclude='*.pt.tmp' --exclude=data . &&
        mv "$out/gpu_check.tar.gz.tmp" "$out/gpu_check.tar.gz"
}

if [ $dry = 1 ]; then
    # The CPU, tiny sizes, official-format data made by the tests' helper; torch.compile through aot_eager
    # (the traced graphs, run without code generation), as inductor's C++ builds take minutes on a CPU.
    data=$work/data
    python3 -c "import sys; from test_data import make_cifar; make_cifar(sys.argv[1])" "$data"
    export TORCH_COMPILE_OVERRIDE_BACKENDS=">=0:aot_eager" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    dev=(--device cpu)
    quick=(--width 4 --limit 64 --val 20 --batch-size 8 --steps 2 --epochs 1)
    arm=(--width 4 --limit 64 --val 20 --batch-size 32 --steps 2)
    evaluate=(--n 10)
    quick_eval=(--n 10 --attacks clean,pgd20)
    term_epochs=4
    aa_n=10
    bench=(--width 4 --batch-size 8 --steps 1 --warmup 0 --iters 1 --variants fp32,bf16)
    profile=(--width 8 --batch-size 8 --steps 1 --warmup 0 --iters 1)
    epoch_s=5 eval_s=2 max_epochs=1
else
    data=.data
    [ -d .data/cifar-10-batches-py ] || python3 .data/materialize.py .data > "$work/00_materialize.log" 2>&1
    dev=(--device cuda)
    quick=(--width 16 --limit 2000 --epochs 2 --batch-size 512)
    arm=(--width 64 --batch-size 512 --steps 10 --amp)
    evaluate=(--n 10000 --batch-size 1000)
    quick_eval=(--n 1000 --attacks clean,pgd20)
    term_epochs=12  # seconds of work at this size: the signal lands mid-run, after the first checkpoint
    aa_n=1000
    bench=(--warmup 5 --iters 10)
    profile=(--warmup 5 --iters 3)
    epoch_s= eval_s=40 max_epochs=100
    nvidia-smi > "$work/00_nvidia-smi.txt" 2>&1
fi
python3 -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '|',
    torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" > "$work/00_versions.txt" 2>&1

n=0
step() {  # step NAME COMMAND...: run it under a timeout of the time left, log it, record its status and time
    local name=$1; shift
    n=$((n + 1))
    local log t0 rc limit
    log=$(printf "%s/%02d_%s.log" "$work" $n "$name")
    t0=$(date +%s)
    limit=$(left)
    echo "\$ $*" > "$log"
    if declare -F "$1" > /dev/null; then  # a function of this script (it bounds its own waits)
        "$@" >> "$log" 2>&1
        rc=$?
    elif [ "$limit" -gt 5 ]; then
        timeout --kill-after=20 "$limit" "$@" >> "$log" 2>&1
        rc=$?
    else
        echo "skipped: no time left" >> "$log"
        rc=124
    fi
    [ $rc = 0 ] || failed=$((failed + 1))
    printf "%-28s exit %3d  %4d s  (%d s left)\n" "$name" $rc $(($(date +%s) - t0)) "$(left)" | tee -a "$work/summary.txt"
    pack
    return $rc
}

step quick_train python3 train.py --data "$data" "${dev[@]}" "${quick[@]}" --out "$work/quick.pt"
step quick_eval python3 eval.py "$work/quick.pt" --data "$data" "${dev[@]}" "${quick_eval[@]}" --json "$work/quick_eval.json"
step quick_amp_compile python3 train.py --data "$data" "${dev[@]}" "${quick[@]}" --amp --compile --out "$work/quick_ac.pt"
step quick_amp_eval python3 eval.py "$work/quick_ac.pt" --data "$data" "${dev[@]}" "${quick_eval[@]}" --amp \
    --json "$work/quick_ac_eval.json"
step torchrun_1 python3 -m torch.distributed.run --nproc_per_node 1 train.py --data "$data" "${dev[@]}" \
    "${quick[@]}" --out "$work/torchrun.pt"
# torchrun with --compile (DDP wrapped first, then compiled): the weights it ends with against the eager run's.
# The dry run (aot_eager: the traced graphs, rounded differently) must agree to float tolerance; on the GPU, inductor's
# kernels and TF32 drift further over an epoch at lr 0.2, so the difference is reported, not judged.
step torchrun_1_compile python3 -m torch.distributed.run --nproc_per_node 1 train.py --data "$data" "${dev[@]}" \
    "${quick[@]}" --compile --out "$work/torchrun_compile.pt"
step compiled_vs_eager python3 -c "import sys, torch
a, c = (torch.load(f, weights_only=True)['model'] for f in sys.argv[1:3])
gap = max(((a[k].float() - c[k].float()).abs().max() / (a[k].float().abs().max() + 1e-12)).item() for k in a)
print(f'largest weight difference, compiled vs eager torchrun, relative to the tensor\'s largest weight: {gap:.2e}')
assert sys.argv[3] == '0' or gap < 1e-3, 'the compiled DDP run left the eager one'" \
    "$work/torchrun.pt" "$work/torchrun_compile.pt" $dry

# SIGTERM once the first epoch's checkpoint exists, then --resume to the end.
sigterm_resume() {
    python3 train.py --data "$data" "${dev[@]}" "${quick[@]}" --epochs $term_epochs --out "$work/term.pt" &
    local pid=$! waited=0
    while [ ! -e "$work/term.pt" ] && [ $waited -lt 240 ] && kill -0 $pid 2>/dev/null; do
        sleep 0.5
        waited=$((waited + 1))
    done
    kill -TERM $pid 2>/dev/null
    wait $pid
    local rc=$?
    echo "exit status after SIGTERM: $rc (143: stopped by the signal, saved)"
    [ $rc = 143 ] && python3 train.py --resume --out "$work/term.pt" --data "$data"
}
step sigterm_resume sigterm_resume

step bench python3 bench.py "${dev[@]}" "${bench[@]}" --json "$work/bench.json"
step profile_anchor python3 bench.py "${dev[@]}" "${profile[@]}" --losses anchor --variants bf16+channels_last \
    --trace "$work/trace"

# The three arms: size the epochs to the time left, from bench.py's ce rate for this recipe (bf16, NHWC).
if [ -z "$epoch_s" ]; then
    epoch_s=$(python3 -c "import json, sys; rows = json.load(open(sys.argv[1]))['rows']
rate = [r['images_per_s'] for r in rows if r['loss'] == 'ce' and r['precision'] == 'bf16+channels_last'][0]
print(int(49000 / rate * 1.3) + 5)  # anchor's joint pass, validation, start-up" "$work/bench.json" 2>/dev/null || echo 30)
fi
per_arm=$(( ($(left) - 20) / 3 ))
epochs=$(( (per_arm - eval_s) / epoch_s ))
[ $epochs -le $max_epochs ] || epochs=$max_epochs
echo "arms: $epochs epochs each (an epoch about $epoch_s s, $per_arm s per arm)" | tee -a "$work/summary.txt"
if [ $epochs -ge 1 ]; then
    for spec in "ce:--loss ce" "anchor_lam0:--loss anchor --lam 0" "anchor:--loss anchor"; do
        name=${spec%%:*}
        read -ra flags <<< "${spec#*:}"
        step "train_$name" python3 train.py --data "$data" "${dev[@]}" "${arm[@]}" "${flags[@]}" --epochs $epochs \
            --seed 0 --out "$work/$name.pt"
        step "eval_$name" python3 eval.py "$work/$name.best.pt" --data "$data" "${dev[@]}" "${evaluate[@]}" \
            --attacks clean,pgd20 --json "$work/eval_$name.json"
    done
    for name in ce anchor_lam0 anchor; do
        if [ "$(left)" -gt 60 ]; then
            step "autoattack_$name" python3 eval.py "$work/$name.best.pt" --data "$data" "${dev[@]}" --n $aa_n \
                --attacks clean,autoattack --json "$work/aa_$name.json"
        fi
    done
else
    echo "arms skipped: too little time left for one epoch each" | tee -a "$work/summary.txt"
fi
echo "done in $(($(date +%s) - start)) s, $failed steps failed" | tee -a "$work/summary.txt"
pack
[ $failed = 0 ]
