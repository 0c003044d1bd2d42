#!/usr/bin/env bash
# The GPU figures of results/perf.md, in one run (device machine: python3 with torch; our package
# from src/, missing wheels from .whl/). Usage: bash benchmarks/gpu_suite.sh OUT_DIR [SCALE]
# SCALE=small runs every step at toy sizes (a CPU dry run of this script).
set -uo pipefail
OUT=${1:?out dir}; SCALE=${2:-full}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import pycocotools" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
if [ "$SCALE" = small ]; then B=4; BIG=4; IT=2; R=1; N=8; KD=64; SIZE="64 64"; NI=2; ISCALE=0.005
else B=64; BIG=32; IT=20; R=3; N=64; KD=4096; SIZE="320 320"; NI=64; ISCALE=1; fi
log() { echo "== $*" | tee -a "$OUT/suite.log"; }
jl() { tail -n 1 | tee -a "$OUT/bench.jsonl"; }
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee -a "$OUT/suite.log"
for prec in fp32 bf16; do
  log "overhead shapes-teacher $prec"
  $PY benchmarks/synthesis_overhead.py --batch-size $B --recipe fast --iterations $IT --rounds $R --precision $prec | jl
done
log "overhead shapes-teacher bf16 channels_last"
$PY benchmarks/synthesis_overhead.py --batch-size $B --recipe fast --iterations $IT --rounds $R --precision bf16 --channels-last | jl
for prec in fp32 bf16; do
  log "overhead ul-yolov8s $SIZE $prec"
  $PY benchmarks/synthesis_overhead.py --teacher ul-yolov8s --image-size $SIZE --batch-size $BIG --recipe fast \
      --iterations $IT --rounds $R --precision $prec --channels-last | jl
done
log "distill throughput"
$PY benchmarks/distill_throughput.py --images $KD --batch-size $B --rounds 3 | jl
log "recipe sweep ($NI images per variant)"
timeout ${SWEEP_SECONDS:-270} $PY benchmarks/recipe_sweep.py --variants benchmarks/sweep_variants.yaml --num-images $NI \
    --iteration-scale $ISCALE --out "$OUT/sweep.jsonl" --keep "$OUT/sweep" | tail -n 1
tar -czf "$OUT/sweep-grids.tgz" -C "$OUT/sweep" $(cd "$OUT/sweep" && ls -d {fast,bn.01,bn.01-task1,paper-it4000}/grids/000000_teacher.png 2>/dev/null) 2>/dev/null
rm -rf "$OUT/sweep"
log done
