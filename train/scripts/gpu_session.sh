#!/usr/bin/env bash
# One GPU lease, started in the background so that it outlives the 10-minute device command:
#   setsid nohup bash train/scripts/gpu_session.sh > /tmp/session.log 2>&1 < /dev/null &
# (carry .whl) then poll it with calls that return as soon as it ends, and copy /tmp/session/out/* to $OUT:
#   while ! grep -q "\] done" /tmp/session/status; do sleep 10; [ $SECONDS -gt 560 ] && break; done; cp /tmp/session/out/* $OUT/
# (at most 8 files: session.tgz holds the texts, results.tgz the evaluation reports and curve.md/png, the students'
# fp16 shards). Never `pkill -f` or `pgrep -f` a word that the poll command itself contains: it matches that command.
# It runs, in order:
#   1. the GPU tests of the kernels (TRITON_INTERPRET=0) beside the data collection, then the attention-JVP
#      benchmark and the generation benchmark (worldmodel.bench) alone;
#   2. the procedural world's base: autoencoder (going on from the shipped model's, AE_INIT) -> teacher ->
#      AR teacher;
#   3. from that AR teacher, side by side on equal budgets: causal CD (3a) towards the CFG-3 teacher, causal CD and
#      sCM (3c) towards the unguided one (pipeline phase "guidance"), each exporting every CURVE_S seconds of its run
#      clock; then DMD from the unguided sCM beside the evaluations;
#   4. evaluations side by side: full reports of the shipped model, the AR teacher (its 16-step sampler at CFG 3 and
#      1, and the students' 2 steps unguided), every student and sCM + DMD, and the short curve protocol on every
#      timed export (held-out PSNR@8 and swap vs run seconds), drawn by train.curve;
#   5. the training benchmark (the fast path at batch 128 with a profile, then the old path, then batches 32
#      and 512) on what is left of the lease (until DEADLINE_S after the start).
# Budgets (seconds) come from the environment: AE_S TEACHER_S AR_S CD_S SCM_S DMD_SCM_S CURVE_S TESTS_S, JVP_BENCH_S (0 skips the benchmark), EVAL_TIMEOUT_S, DEADLINE_S.
# Wheels missing on the GPU image (omegaconf) come from .whl/.
set -uo pipefail
START=$(date +%s)
S=${S:-/tmp/session}
mkdir -p "$S/out" "$S/text"
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 RUNS=$S/runs OUT=$S/pipeline
note() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*" | tee -a "$S/status"; }
python3 -c "import omegaconf" 2>/dev/null || { note "omegaconf is missing (carry .whl): nothing ran"; note "done"; exit 2; }
pack_texts() {  # the status, every phase's text and the stage logs, as $S/out/session.tgz
  cp "$S/status" "$S/text/" 2>/dev/null
  (cd "$RUNS/.." 2>/dev/null && find runs -maxdepth 3 \( -name log.jsonl -o -name '*.log' -o -name '*.out' \) \
     | grep -v episodes) > "$S/.files" 2>/dev/null
  tar czf "$S/out/session.tgz.part" -C "$S" text -C "$S" -T "$S/.files" 2>/dev/null
  mv "$S/out/session.tgz.part" "$S/out/session.tgz"
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$S/status"
P=train/scripts/pipeline.sh
T=$S/text
SHIPPED=${SHIPPED:-assets/models/procedural.safetensors}  # the shard set
CURVE_S=${CURVE_S:-30}  # causal CD compiles three networks for about a minute: budgets of 3a and 3c want >= 180 s

note "GPU tests beside the data"
TRITON_INTERPRET=0 timeout "${TESTS_S:-300}" python3 -m pytest -q -p no:cacheprovider tests/test_attention_jvp.py tests/test_kernels.py \
  tests/test_cuda.py > "$T/gpu_tests.txt" 2>&1 &
tests=$!
bash $P procedural data > "$T/data.txt" 2>&1 || note "data failed"
wait $tests; note "GPU tests: $(tail -1 "$T/gpu_tests.txt")"
if [ "${JVP_BENCH_S:-180}" != 0 ]; then  # 0 skips it
  timeout "${JVP_BENCH_S:-180}" python3 -m kernels.bench_attention_jvp --out "$T/attention_jvp.json" > "$T/attention_jvp.txt" 2>&1 \
    || note "attention JVP bench failed"
fi
timeout 120 python3 -m worldmodel.bench --device cuda --frames 200 > "$T/play_bench_h200.txt" 2>&1 || note "play bench failed"
python3 -m worldmodel.data stats "$RUNS/procedural/episodes" --json "$T/motion.json" 2>&1 | grep -v "^procedural-" > "$T/motion.txt"
pack_texts

note "base"
AE_INIT=${AE_INIT:-$SHIPPED} AE_S=${AE_S:-60} TEACHER_S=${TEACHER_S:-220} AR_S=${AR_S:-130} \
  bash $P procedural base > "$T/base.txt" 2>&1 || { note "base failed: nothing after it can run"; pack_texts; note "done"; exit 1; }
pack_texts
note "students side by side: causal CD towards the CFG-3 teacher, causal CD and sCM towards the unguided one"
CD_S=${CD_S:-180} DMD_S=0 CD_EXTRA="run.export_every_s=$CURVE_S" bash $P procedural distill > "$T/distill.txt" 2>&1 &
cfg3=$!
CD_S=${CD_S:-180} SCM_S=${SCM_S:-${CD_S:-180}} CD_EXTRA="run.export_every_s=$CURVE_S" SCM_EXTRA="run.export_every_s=$CURVE_S" \
  bash $P procedural guidance > "$T/guidance.txt" 2>&1 || note "guidance runs failed"
wait $cfg3 || note "causal CD failed"
pack_texts
note "DMD from the unguided sCM, beside the evaluations"
DMD_SCM_S=${DMD_SCM_S:-90} bash $P procedural dmd_g1 > "$T/dmd_g1.txt" 2>&1 &
dmd=$!

note "evaluate"
R=$RUNS/procedural
E=$OUT/procedural/eval
mkdir -p "$E"
evaluate() {  # evaluate NAME CHECKPOINT [ARGS...]: in the background, timed, under $E/NAME
  local name=$1 ckpt=$2
  shift 2
  [ -f "$ckpt" ] || [ -f "${ckpt%.safetensors}-01-of-02.safetensors" ] || return 0
  ( s=$(date +%s)
    OMP_NUM_THREADS=2 timeout "${EVAL_TIMEOUT_S:-420}" python3 -m train.evaluate "$ckpt" --world procedural --out "$E/$name" --device cuda "$@" \
      > "$R/eval-$name.log" 2>&1
    echo "$name rc=$? $(( $(date +%s) - s ))s" >> "$T/eval_times.txt" ) &
}
FULL=(--clips 32 --long-frames 400 --long-clips 2 --window 100)
CURVE=(--clips 32 --horizon 32 --horizons 1,8,32 --long-frames 100 --long-clips 1 --window 50 --speed-frames 10)
evaluate shipped "$SHIPPED" "${FULL[@]}"
evaluate ar_teacher "$R/ar_teacher/model.safetensors" "${FULL[@]}"
evaluate ar_teacher_g1 "$R/ar_teacher/model.safetensors" "${FULL[@]}" --guidance 1
evaluate ar_teacher_g1_2step "$R/ar_teacher/model.safetensors" "${FULL[@]}" --guidance 1 --steps 1.0,0.5
for run in causal_cd causal_cd_g1 causal_scm_g1; do
  evaluate "${run}_2step" "$R/$run/model.safetensors" "${FULL[@]}"
  for f in "$R/$run"/exports/model_*s.safetensors; do
    [ -f "$f" ] && evaluate "curve_${run}_$(basename "$f" .safetensors | sed 's/model_//')" "$f" "${CURVE[@]}"
  done
  evaluate "curve_${run}_final" "$R/$run/model.safetensors" "${CURVE[@]}"
done
wait $dmd || note "DMD failed"
evaluate dmd_scm_g1_2step "$R/dmd_scm_g1/model.safetensors" "${FULL[@]}"
wait
note "evaluated: $(tr '\n' ' ' < "$T/eval_times.txt")"
python3 -m train.curve "$E" --runs "$R" > "$T/curve.txt" 2>&1 || note "curve failed"
bash $P procedural pack > "$T/pack.txt" 2>&1
cp "$OUT/procedural/results.tgz" "$S/out/results.tgz" 2>/dev/null
for run in causal_cd_g1 causal_scm_g1; do
  python3 - "$R/$run/model.safetensors" "$S/out/$run.safetensors" <<'PY' || note "export $run failed"
import sys, torch
from worldmodel import checkpoint
checkpoint.save(sys.argv[2], checkpoint.load(sys.argv[1]), dtype=torch.float16, max_shard_mib=15)
PY
done
pack_texts

bench() {  # bench SECONDS_NEEDED NAME ARGS...: the training benchmark, if the lease has that long left
  local need=$1 name=$2
  shift 2
  local left=$(( ${DEADLINE_S:-1200} - ($(date +%s) - START) ))
  note "bench $name (${left}s left)"
  [ "$left" -gt "$need" ] || return 0
  timeout "$left" python3 -m train.bench --preset default --window 10 --device cuda --data "$R/episodes" \
    --out "$T/bench_$name.json" "$@" > "$T/bench_$name.txt" 2>&1 || note "bench $name stopped ($?)"
  pack_texts
}
bench 120 after --stages teacher,ar_teacher,causal_cd,causal_scm,dmd --batches 128 --variants after --profile
bench 60 before --stages teacher,causal_cd --batches 32 --variants before
bench 60 batches --stages teacher,ar_teacher --batches 32,512 --variants after
note "done"
pack_texts
