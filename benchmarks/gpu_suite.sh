#!/usr/bin/env bash
# The GPU figures of results/perf.md and results/quality-per-compute/, in one run (device machine:
# python3 with torch; our package from src/, missing wheels from .whl/).
#   bash benchmarks/gpu_suite.sh OUT_DIR [SCALE] [PART]
# SCALE=small runs every step at toy sizes (a CPU dry run of this script); PART=bench runs steps
# 1-3 only, PART=quality step 4 only (default: all). Steps:
#  1. synthesis overhead (compiled first: shapes-teacher, YOLOv8s; then eager shapes-teacher
#     fp32 (with the per-part ablation) / bf16 / bf16+channels_last; YOLOv8s at 320 px fp32
#     (ablation) / bf16),
#  2. distillation throughput, 3. CUDA parity of the fused BN statistics,
#  4. in parallel (one process each; small models are bound by kernel launches, so the GPU has
#     room): quality per compute, one process per seed for `paper`@4000 and one per seed for the
#     other rows; the MobileNetV2 teacher (runs/mobilenet-teacher/best.pt, if carried)
#     synthesised, distilled into yolo-lite-s-p2 and scored next to shapes-teacher.
set -uo pipefail
OUT=${1:?out dir}; SCALE=${2:-full}; PART=${3:-all}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import pycocotools" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
T="timeout ${STEP_S:-300}"  # each benchmark step at most this long (a stuck compile cannot eat the lease)
WORK=${WORK:-/tmp/gpu-suite}
if [ "$SCALE" = small ]; then
  B=4; BIG=4; IT=2; R=1; KD=64; SIZE="64 64"
  N=4; SB=4; EP=1; VAL=8; PAPER=4; MIX=2; FAST="1 2"; QT=300; MBN=4; MBEP=1; MBIT="--iterations 2"
else
  B=64; BIG=32; IT=${BENCH_IT:-20}; R=${BENCH_ROUNDS:-3}; KD=${KD_IMAGES:-4096}; SIZE="320 320"
  N=128; SB=128; EP=100; VAL=500; PAPER=4000; MIX=1000; FAST="250 500 1000"; QT=${QPC_SECONDS:-400}; MBN=256; MBEP=100; MBIT=""
fi
log() { echo "== $(date +%T) $*" | tee -a "$OUT/suite.log"; }
jl() { tail -n 1 | tee -a "$OUT/bench.jsonl"; }
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee -a "$OUT/suite.log"

if [ "$PART" != quality ]; then
for teacher in shapes-teacher ul-yolov8s; do
  log "overhead $teacher fp32 --compile (the bare pass compiled too)"
  if [ $teacher = shapes-teacher ]; then args="--batch-size $B"; else args="--teacher ul-yolov8s --image-size $SIZE --batch-size $BIG --channels-last"; fi
  $T $PY benchmarks/synthesis_overhead.py $args --recipe fast --iterations $IT --rounds $R --compile | jl
done
for prec in fp32 bf16; do
  log "overhead shapes-teacher $prec"
  ablate=""; [ $prec = fp32 ] && ablate="--ablate"  # fp32: also each part's share (key `ablation`)
  $T $PY benchmarks/synthesis_overhead.py --batch-size $B --recipe fast --iterations $IT --rounds $R --precision $prec $ablate | jl
done
log "overhead shapes-teacher bf16 channels_last"
$T $PY benchmarks/synthesis_overhead.py --batch-size $B --recipe fast --iterations $IT --rounds $R --precision bf16 --channels-last | jl
for prec in fp32 bf16; do
  log "overhead ul-yolov8s $SIZE $prec"
  ablate=""; [ $prec = fp32 ] && ablate="--ablate"
  $T $PY benchmarks/synthesis_overhead.py --teacher ul-yolov8s --image-size $SIZE --batch-size $BIG --recipe fast \
      --iterations $IT --rounds $R --precision $prec --channels-last $ablate | jl
done
log "distill throughput"
$T $PY benchmarks/distill_throughput.py --images $KD --batch-size $B --rounds 3 | jl

log "fused BN statistics: device against CPU"
$PY - <<'EOF' | tee -a "$OUT/bench.jsonl"
import json, torch
from diode.detectors.checkpoint import load_detector
from diode.synthesis.bn_stats import BNStatsRecorder
from diode.synthesis.targets import sample_one_box
dev = "cuda" if torch.cuda.is_available() else "cpu"
gen = torch.Generator().manual_seed(0)
x0 = torch.rand(8, 3, 128, 128, generator=gen)
targets = sample_one_box(8, (128, 128), 8, gen)
out = {}
for d in ("cpu", dev):
    t = load_detector("shapes-teacher", device=d)[0].eval()
    for p in t.parameters():
        p.requires_grad_(False)
    rec = BNStatsRecorder(t.bn_layers())
    x = x0.detach().clone().to(d).requires_grad_(True)
    with rec.recording(), t.loss_mode():
        task = t.weighted_loss(t.loss(x, targets))
    stats = rec.recorded()
    loss = task + sum((m.square().sum() + v.sum()) for m, v in stats)
    loss.backward()
    out[d] = (torch.cat([torch.cat([m, v]) for m, v in stats]).detach().cpu(), x.grad.cpu(), float(task))
(s0, g0, t0), (s1, g1, t1) = out["cpu"], out[dev]
print(json.dumps({"check": "fused_bn_device_vs_cpu", "device": dev, "stats_max_rel": float(((s1 - s0).abs() / (s0.abs() + 1e-3)).max()),
                  "grad_max_abs": float((g1 - g0).abs().max()), "grad_scale": float(g0.abs().max()), "task_cpu": t0, "task_dev": t1}))
EOF
fi
[ "$PART" = bench ] && { log done; exit 0; }

log "quality per compute + MobileNetV2 teacher (parallel, ${QT}s budget)"
QW=$WORK/qpc; mkdir -p "$QW" "$OUT/qpc"
COMMON="--num-images $N --batch-size $SB --epochs $EP --kd-batch-size 32 --val-images $VAL --out $QW"
pids=()
for s in 0 1 2; do
  OMP_NUM_THREADS=1 timeout $QT $PY benchmarks/quality_per_compute.py $COMMON --recipes paper \
      --paper-iterations $PAPER --seeds $s > "$OUT/qpc/paper$s.log" 2>&1 & pids+=($!)
  OMP_NUM_THREADS=1 timeout $QT $PY benchmarks/quality_per_compute.py $COMMON --recipes paper fast \
      --paper-iterations $MIX --fast-iterations $FAST --seeds $s > "$OUT/qpc/mix$s.log" 2>&1 & pids+=($!)
done
MB=runs/mobilenet-teacher/best.pt
(
  export OMP_NUM_THREADS=1
  D=$WORK/mb; mkdir -p "$D" "$OUT/mb"
  $PY -m diode data shapes --out "$D/real" --train 0 --val $VAL --seed 7 > /dev/null
  for who in mobilenet shapes; do
    if [ $who = mobilenet ]; then T=$MB; RECIPE=fast-mobilenet; [ -f "$MB" ] || continue
    else T=shapes-teacher; RECIPE=fast; fi
    $PY -m diode evaluate --model "$T" --data "$D/real/val" --json "$OUT/mb/$who-teacher.json" > /dev/null
    $PY -m diode synthesize --teacher "$T" --recipe $RECIPE --num-images $MBN --batch-size 128 --out "$D/$who-synth" \
        --verifier shapes-verifier --quiet $MBIT
    cp "$D/$who-synth/summary.json" "$OUT/mb/$who-synth-summary.json" 2>/dev/null
    cp "$D/$who-synth/grids/000000_teacher.png" "$OUT/mb/$who-grid.png" 2>/dev/null
    $PY -m diode distill --teacher "$T" --student yolo-lite-s-p2 --data "$D/$who-synth" --val "$D/real/val" \
        --epochs $MBEP --eval-every $MBEP --out "$D/$who-kd" 2>&1 | tr "\r" "\n" | tail -n 3
    $PY -m diode evaluate --model "$D/$who-kd/best.pt" --data "$D/real/val" --json "$OUT/mb/$who-student.json" > /dev/null
  done
) > "$OUT/mb.log" 2>&1 &
pids+=($!)
wait "${pids[@]}"
log "quality per compute: table from the finished cells"
$PY benchmarks/quality_per_compute.py $COMMON --paper-iterations $MIX $PAPER --fast-iterations $FAST --seeds 0 1 2 \
    --report-only > /dev/null 2> "$OUT/qpc/report.log"
cp "$QW"/cells/*.json "$QW/table.md" "$QW/table.json" "$OUT/qpc/" 2>/dev/null
log done
