#!/usr/bin/env bash
# Training figures on a GPU machine (the ones docs/benchmarks.md records), from the repository root,
# with ML-1M already prepared under datasets/ml-1m. Results land in $OUT (default ./out).
#
#   bash benchmarks/device_train.sh bench      # make bench-train on GPU 0: pipelined vs plain, kernel vs reference
#   bash benchmarks/device_train.sh quality    # full ML-1M runs: HSTU on GPU 0, SASRec on GPU 1 (or after it)
#   bash benchmarks/device_train.sh large      # HSTU-large on GPU 0
#   bash benchmarks/device_train.sh nccl       # 2 GPUs, NCCL: item table row-wise, rating table table-wise
#   bash benchmarks/device_train.sh scale [N]  # make bench-scale on N GPUs (default: all), the UVM-caching
#                                              # run on one GPU held to 14 GB, and the GPU training tests
#   bash benchmarks/device_train.sh epoch      # issue 14's scale: write and prepare 100M events / 10M users /
#                                              # 10M items, then the first epoch and one validation pass
#   bash benchmarks/device_train.sh one-gpu    # within one 10-minute call: bench, then HSTU and SASRec
#                                              # side by side on GPU 0, then `make eval` of the HSTU run
#   bash benchmarks/device_train.sh sweep < runs.txt   # one run per line, "<name> <config> [overrides]",
#                                              # all at once on GPU 0; `make eval` of the best by validation
set -uo pipefail
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
OUT=${OUT:-./out}
mkdir -p "$OUT"
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
train() {  # train <gpu list> <nproc> <config> <name> [overrides...]
  local devices=$1 nproc=$2 config=$3 name=$4; shift 4
  CUDA_VISIBLE_DEVICES=$devices python3 -m torch.distributed.run --standalone --nproc-per-node="$nproc" \
    -m training.train --config "$config" run.name="$name" run.tensorboard=false "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $?"; grep -E "^epoch +[0-9]+ " "$OUT/$name.log" | tail -3; grep "test:" "$OUT/$name.log"
}
collect() {  # the run directories without checkpoints and exports, as one file
  tar czf "$OUT/runs.tgz" --exclude=checkpoints --exclude=export --exclude=tensorboard runs/ 2>/dev/null
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case ${1:?bench, quality, large or nccl} in
  bench)
    CUDA_VISIBLE_DEVICES=0 python3 -m benchmarks.train --config configs/ml-1m/hstu.yaml --steps 50 \
      2>&1 | grep -v -i warn | tee "$OUT/bench-train.txt" | tail -12 ;;
  quality)
    if [ "$gpus" -ge 2 ]; then
      train 0 1 configs/ml-1m/hstu.yaml hstu-gpu "${@:2}" &
      train 1 1 configs/ml-1m/sasrec.yaml sasrec-gpu "${@:2}" &
      wait
    else
      train 0 1 configs/ml-1m/hstu.yaml hstu-gpu "${@:2}"
      train 0 1 configs/ml-1m/sasrec.yaml sasrec-gpu "${@:2}"
    fi
    collect ;;
  one-gpu)
    timeout 120 python3 -m benchmarks.train --config configs/ml-1m/hstu.yaml --steps 50 \
      2>&1 | grep -v -i warn | tee "$OUT/bench-train.txt" | tail -12
    # Two small models share the card well; each is bounded so the evaluation and collection still run.
    ( timeout 320 bash -c "$(declare -f train); OUT=$OUT train 0 1 configs/ml-1m/hstu.yaml hstu-gpu ${*:2}" ) &
    ( timeout 320 bash -c "$(declare -f train); OUT=$OUT train 0 1 configs/ml-1m/sasrec.yaml sasrec-gpu ${*:2}" ) &
    wait
    timeout 60 python3 -m training.evaluate --run runs/hstu-gpu > "$OUT/eval-hstu-gpu.log" 2>&1
    tail -5 "$OUT/eval-hstu-gpu.log"
    collect ;;
  sweep)
    export OMP_NUM_THREADS=2
    while read -r name config overrides; do
      [ -z "$name" ] && continue
      ( timeout "${SWEEP_TIMEOUT:-450}" bash -c "$(declare -f train); OUT=$OUT train 0 1 $config $name $overrides" ) &
    done
    wait
    python3 -m benchmarks.runs_table runs > "$OUT/summary.txt"
    cat "$OUT/summary.txt"
    tar czf "$OUT/runs-metrics.tgz" runs/*/metrics.json runs/*/metrics.jsonl runs/*/config.yaml runs/*/plan.txt \
      -C "$OUT" $(cd "$OUT" && ls *.log) 2>/dev/null && rm -f "$OUT"/*.log
    best=$(python3 -m benchmarks.runs_table runs --best)
    if [ -n "$best" ]; then
      echo "best by validation NDCG@10: $best"
      timeout 90 python3 -m training.evaluate --run "runs/$best" > "$OUT/eval-best.log" 2>&1; tail -6 "$OUT/eval-best.log"
      tar czf "$OUT/best-run.tgz" --exclude=checkpoints --exclude=export --exclude=tensorboard "runs/$best"
    fi ;;
  scale)
    n=${2:-$gpus}
    timeout 120 python3 -m pytest -q -m gpu tests/test_gpu_training.py -x -p no:cacheprovider 2>&1 \
      | tee "$OUT/gpu-tests.txt" | tail -3
    time python3 -m data.prepare --dataset synthetic --num-users 60000 --num-items 10000000 --mean-length 400 \
      --max-length 2000 --min-item-events 1 2>&1 | tail -1
    timeout 200 python3 -m benchmarks.train --suite scale --nproc "$n" --steps 20 2>&1 | grep -v -i warn \
      | tee "$OUT/bench-scale.txt" | tail -7
    timeout 130 python3 -m benchmarks.train --suite scale --steps 20 \
      "sharding.kernels={item_table: fused_uvm_caching}" sharding.device_memory_gb=14 --variants pipelined 2>&1 \
      | grep -v -i warn \
      | tee "$OUT/bench-scale-uvm.txt" | tail -6 ;;
  epoch)
    test -f datasets/raw/events-100m.parquet || { time python3 -m data.synthetic --out datasets/raw/events-100m.parquet \
      --num-users 10000000 --num-items 10000000 --mean-length 10 --min-item-events 1; } 2>&1 | tail -4
    python3 -c "from benchmarks.data import run_prepare; import sys, pathlib; s, t, m = run_prepare(sys.argv[1:], \
      pathlib.Path('$OUT/prepare.log')); print(f'data.prepare: exit {s}, {t:.0f} s, peak RSS {m:.2f} GiB')" \
      python3 -m data.prepare --config configs/scale/events-100m.yaml
    tail -2 "$OUT/prepare.log"
    timeout "${EPOCH_TIMEOUT:-400}" python3 -m benchmarks.epoch "${@:2}" 2>&1 | grep -v -i warn \
      | tee "$OUT/bench-epoch.txt" | tail -7 ;;
  large)
    train 0 1 configs/ml-1m/hstu-large.yaml hstu-large-gpu "${@:2}"
    collect ;;
  nccl)
    train 0,1 2 configs/ml-1m/hstu.yaml hstu-nccl2 model.rating_embeddings=true \
      "sharding.tables={item_table: row_wise, rating_table: table_wise}" "${@:2}"
    cp runs/hstu-nccl2/plan.txt "$OUT/nccl-plan.txt"; cat "$OUT/nccl-plan.txt"
    collect ;;
esac
