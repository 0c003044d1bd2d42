#!/usr/bin/env bash
# The MobileNetV2-FCOS teacher (docs/mobilenet-teacher.md) through the whole pipeline, next to the
# built-in shapes-teacher: synthesise N images from each (its recipe), distil a yolo-lite-s-p2
# student (and, from shapes-teacher, a yolo-lite-n) from scratch for E epochs, score teachers and
# students on a fresh real split (seed 7).
#   bash benchmarks/mobilenet_teacher_kd.sh OUT [N] [EPOCHS] [TEACHER_CKPT]
# Rerunning resumes (synthesis continues; finished steps are skipped).
set -euo pipefail
OUT=${1:?out dir}; N=${2:-128}; E=${3:-100}; MB=${4:-runs/mobilenet-teacher/best.pt}
DIODE=${DIODE:-diode}
mkdir -p "$OUT"
[ -f "$OUT/real/data.yaml" ] || $DIODE data shapes --out "$OUT/real" --train 0 --val 500 --seed 7
run() {  # name teacher recipe method student [kd name]
  local name=$1 teacher=$2 recipe=$3 method=$4 student=$5 kd=${6:-$1}
  [ -f "$OUT/$name-teacher.json" ] || $DIODE evaluate --model "$teacher" --data "$OUT/real/val" --json "$OUT/$name-teacher.json"
  $DIODE synthesize --teacher "$teacher" --recipe "$recipe" --num-images "$N" --out "$OUT/$name-synth" \
      --verifier shapes-verifier --quiet
  if [ ! -f "$OUT/$kd-$method-student.json" ]; then
    $DIODE distill --teacher "$teacher" --student "$student" --data "$OUT/$name-synth" --val "$OUT/real/val" \
        --epochs "$E" --eval-every "$E" --method "$method" --out "$OUT/$kd-$method-kd" 2>&1 | tr '\r' '\n' | grep -v '%|' | tail -n 3
    $DIODE evaluate --model "$OUT/$kd-$method-kd/best.pt" --data "$OUT/real/val" --json "$OUT/$kd-$method-student.json"
  fi
}
run mobilenet "$MB" fast-mobilenet pseudo-label yolo-lite-s-p2
run shapes shapes-teacher fast pseudo-label yolo-lite-s-p2
run shapes shapes-teacher fast soft yolo-lite-s-p2
run shapes shapes-teacher fast pseudo-label yolo-lite-n shapes-n   # across architectures
