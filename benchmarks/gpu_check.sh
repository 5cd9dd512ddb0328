#!/usr/bin/env bash
# The GPU figures of docs/performance.md: the Amazon-shape pipeline on CUDA with default settings, each
# command timed, then 3-epoch PGE runs of the default optimizer and dense Adam. Run from the repository
# root on a machine with torch+CUDA: `bash benchmarks/gpu_check.sh` (log in $OUT/gpu.log, default /tmp).
# Offline machines: put the other dependencies' wheels in .gpu/wheels/ and they are installed first.
set -uo pipefail
OUT=${OUT:-/tmp}
if compgen -G ".gpu/wheels/*.whl" > /dev/null; then
  python3 -m pip install --quiet --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl 2>&1 | tail -2
fi
export PYTHONPATH=$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
LOG=$OUT/gpu.log
{
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, polars, typer; print('torch', torch.__version__, torch.cuda.is_available(), 'polars', polars.__version__, 'typer', typer.__version__)"
mkdir -p /tmp/w && cd /tmp/w
t() { local s=$(date +%s%N); "$@"; local rc=$?; echo "TIME $(( ($(date +%s%N) - s) / 1000000 )) ms rc=$rc :: $*"; }
U="python3 -m uclr_cli"
T1=$(date +%s)
t $U prepare synthetic --preset amazon --out data/amazon
t $U pretrain --data data/amazon --run runs/a --device cuda
t $U contrast --data data/amazon --run runs/a --device cuda
t $U finetune --data data/amazon --run runs/a --device cuda --domain all
t $U evaluate --data data/amazon --run runs/a --device cuda
echo "END-TO-END (prepare..evaluate) $(( $(date +%s) - T1 )) s"
for o in rowwise-rmsprop adam; do
  t $U pretrain --data data/amazon --run runs/speed-$o --device cuda --optimizer $o --epochs 3 --eval-every 100
done
} > "$LOG" 2>&1
grep -E "TIME|END|torch|H200|H100|^│" "$LOG" | tail -60
