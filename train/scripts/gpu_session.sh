#!/usr/bin/env bash
# One GPU lease, started in the background so that it outlives the 10-minute device command:
#   setsid nohup bash train/scripts/gpu_session.sh > /tmp/session.log 2>&1 < /dev/null &
# (carry .whl, from train/scripts/wheels.sh [doom], and .bench_before.tgz: `git archive BASE worldmodel kernels | gzip >
# .bench_before.tgz`, the code the generation benchmark compares against) then poll it with calls that return as soon
# as it ends, and copy /tmp/session/out/* to $OUT:
#   while ! grep -q "\] done" /tmp/session/status; do sleep 10; [ $SECONDS -gt 560 ] && break; done; cp /tmp/session/out/* $OUT/
# (at most 8 files: session.tgz holds the texts, results.tgz the evaluation reports, then the students' fp16 shards
# and the AR teacher's DiT alone in bf16, ar_teacher_dit.safetensors, 12.7 MiB: it fits the shipped autoencoder, and
# committed as assets/models/WORLD-ar-teacher.safetensors the next lease trains it on; when the lease trained the
# autoencoder, also autoencoder.safetensors, its autoencoder alone in bf16, which that DiT joins as AE_INIT with AE_S=0
# and AR_INIT the DiT). Never `pkill -f` or
# `pgrep -f` a word that the poll command itself contains: it matches that command.
# WORLD (procedural, the default, or doom) picks the world. It runs, in order:
#   1. the GPU tests of the kernels (TRITON_INTERPRET=0) beside the data collection, then the generation benchmark
#      (worldmodel.bench) of the code in .bench_before.tgz and of this tree, one after the other, alone (TESTS_S=0 skips
#      both);
#   2. the AR teacher (with AR_OVERRIDES, config overrides such as "model.dit.window_frames=24 data.clip_len=25")
#      trained on from AR_INIT (a DiT-only AR teacher; by default the carried
#      assets/models/WORLD-ar-teacher.safetensors if there is one, with the shipped autoencoder as it is), or with no
#      AR_INIT (none carried, or AR_INIT= empty) the autoencoder on from the shipped model's (AE_INIT; AE_INIT= empty:
#      a fresh one, e.g. with AE_EXTRA of another shape and TEACHER_EXTRA=model.dit.patch_size=4) for AE_S (0: as
#      it is; AE_EXTRA: more overrides of its stage, e.g. model.autoencoder.latent_channels=16 widens it), then teacher -> AR teacher
#      from it (the AR teacher is also exported every AR_EXPORT_S seconds of its run);
#      With DECODER_S (seconds; needs the shipped latent space: a carried AR teacher or AE_S=0), beside it: the shipped
#      decoder trained on alone (autoencoder.train_encoder=false, at DECODER_LR, default 1e-4) without and with each
#      DECODER_VARIANTS (default adversarial weights 0.2 and 0.3 after 100 steps of the discriminator alone: on the H100
#      500 such steps blurred the decoder first, and at 0.5 the discriminator stayed at chance; on the CPU weights 1 and 3
#      beside a fresh discriminator, and 0.6 beside a trained one, lost 4-20 dB in 30 steps), each measured
#      on held-out frames; the one whose sharpness is nearest the truth's, of those within 1 dB of the best PSNR, then
#      joins the new student (causal_cd_sharp) and the shipped model (shipped_sharp), both evaluated in step 4;
#   3. causal CD of the full student beside SIDE: the CPU tier's smaller student (pipeline phase cpu_tier, the default),
#      causal CD on from the shipped student (SIDE=cd_on: run causal_cd_on, same budget CD_S), DMD on from the shipped
#      student (SIDE=dmd_on: pipeline phase dmd_on, the teacher first if base made none, then DMD_S of run dmd_on and of
#      each DMD_VARIANTS entry as NAME_on; evaluated as dmd_on_2step and NAME_on_2step, exported) or nothing (SIDE=none);
#      and beside them each of CD_ON_VARIANTS ("NAME:KEY=VALUE,KEY=VALUE ..."): causal CD on from the shipped student
#      with those overrides for CD_ON_S, as run NAME (CD_S=0 skips the student from the AR teacher; AR_S=0 keeps the
#      carried AR teacher as it is); with DMD_S (seconds; needs this lease's bidirectional teacher, so no AR_INIT), DMD
#      from that student after it (run dmd: evaluated as dmd_2step and exported as dmd shards), and beside it each of
#      DMD_VARIANTS (pipeline.sh's distill: "NAME:KEY=VALUE,..."), evaluated as NAME_2step and exported;
#   4. full evaluations side by side, on EVAL_CLIPS held-out clips (default 32) drawn with EVAL_SEED (default 0): the
#      shipped model (EVAL_SHIPPED=0: not), the carried AR teacher as it came (EVAL_CARRIED=1), the AR teacher at
#      AR_EXPORT_S (16 Euler steps, CFG 1) and at its end (at each guidance of AR_GUIDANCES, default 1; empty: none),
#      the student and the side run's (CD_CPU_S=0 skips the CPU tier), each CD_ON_VARIANTS run, the shipped model and
#      those runs again at each play-time history noise level of CONTEXT_NOISES (--context-noise), and the
#      autoencoder alone on held-out frames when this lease trained it;
#   5. exports (the students fp16 in shards of <= 15 MiB, the AR teacher's DiT bf16), then the training benchmark's batch
#      matrix on what is left of the lease (until DEADLINE_S after the start).
# Budgets (seconds) come from the environment: AE_S (0: the shipped autoencoder as it is) TEACHER_S AR_S AR_EXPORT_S CD_S DMD_S CD_ON_S
# CD_CPU_S TESTS_S EVAL_TIMEOUT_S DEADLINE_S; the benchmark's rows from BENCH_STAGES and BENCH_BATCHES.
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
WORLD=${WORLD:-procedural}
R=$RUNS/$WORLD
E=$OUT/$WORLD/eval
SHIPPED=${SHIPPED:-assets/models/$WORLD.safetensors}  # the shard set
CARRIED=assets/models/$WORLD-ar-teacher.safetensors  # the AR teacher's DiT an earlier lease left (AR_INIT= skips it)
export AR_INIT=${AR_INIT-$([ -f "$CARRIED" ] && echo "$CARRIED")}
[ -n "$AR_INIT" ] && AE_S=0  # its autoencoder is the shipped one, unchanged

TESTS_S=${TESTS_S:-300}
note "GPU tests beside the data"
[ "$TESTS_S" != 0 ] && TRITON_INTERPRET=0 timeout "$TESTS_S" python3 -m pytest -q -p no:cacheprovider tests/test_attention_jvp.py \
  tests/test_kernels.py tests/test_cuda.py > "$T/gpu_tests.txt" 2>&1 &
tests=$!
bash $P "$WORLD" data > "$T/data.txt" 2>&1 || note "data failed"
wait $tests; note "GPU tests: $([ "$TESTS_S" = 0 ] && echo skipped || tail -1 "$T/gpu_tests.txt")"
if [ "$TESTS_S" != 0 ]; then  # the generation benchmark before and after, alone on the GPU, one after the other
  if [ -f .bench_before.tgz ]; then
    mkdir -p /tmp/before && tar xzf .bench_before.tgz -C /tmp/before
    (cd /tmp/before && PYTHONPATH=/tmp/site:/tmp/before timeout 150 python3 -m worldmodel.bench --device cuda --frames 200) \
      > "$T/play_bench_before.txt" 2>&1 || note "play bench (before) failed"
  fi
  timeout 150 python3 -m worldmodel.bench --device cuda --frames 200 > "$T/play_bench_after.txt" 2>&1 || note "play bench failed"
  note "play bench: before $(grep -E '^ +frame +2 ' "$T/play_bench_before.txt" 2>/dev/null | tr -s ' '), after $(grep -E '^ +frame +2 ' "$T/play_bench_after.txt" | tr -s ' ')"
fi
pack_texts

decoder=
if [ "${DECODER_S:-0}" != 0 ]; then  # the shipped decoder trained on alone, beside base: the latent space stays
  if [ "${AE_S:-30}" = 0 ]; then
    note "decoder variants beside base"
    AE_NAME=decoder AE_INIT=$SHIPPED AE_S=$DECODER_S AE_EXTRA="autoencoder.train_encoder=false optim.lr=${DECODER_LR:-1e-4}" \
      AE_VARIANTS="${DECODER_VARIANTS:-autoencoder.adversarial_weight=0.2,autoencoder.adversarial_start=100 autoencoder.adversarial_weight=0.3,autoencoder.adversarial_start=100}" \
      bash $P "$WORLD" ae_variants > "$T/decoder.txt" 2>&1 & decoder=$!
  else
    note "DECODER_S needs the shipped latent space (a carried AR teacher, or AE_S=0): no decoder variants"
  fi
fi
note "base"
AE_INIT=${AE_INIT-$SHIPPED} AE_S=${AE_S:-30} TEACHER_S=${TEACHER_S:-220} AR_S=${AR_S:-300} \
  AR_EXTRA="run.export_every_s=${AR_EXPORT_S:-150} ${AR_OVERRIDES:-}" bash $P "$WORLD" base > "$T/base.txt" 2>&1 \
  || { note "base failed: nothing after it can run"; pack_texts; note "done"; exit 1; }
pack_texts
SIDE=${SIDE:-cpu_tier}
note "causal CD (unguided teacher) beside $SIDE"
side=
[ "$SIDE" != none ] && { CD_CPU_S=${CD_CPU_S:-${CD_S:-240}} CD_S=${CD_S:-240} bash $P "$WORLD" "$SIDE" > "$T/$SIDE.txt" 2>&1 & side=$!; }
variants=()
for v in ${CD_ON_VARIANTS:-}; do  # NAME:KEY=VALUE,KEY=VALUE - causal CD on from the shipped student, side by side
  name=${v%%:*} over=${v#*:}
  CD_ON_RUN=$name CD_EXTRA="${over//,/ }" CD_S=${CD_ON_S:-${CD_S:-240}} bash $P "$WORLD" cd_on > "$T/$name.txt" 2>&1 &
  variants+=("$!:$name")
done
[ "${CD_S:-240}" = 0 ] || CD_S=${CD_S:-240} DMD_S=${DMD_S:-0} bash $P "$WORLD" distill > "$T/distill.txt" 2>&1 \
  || note "causal CD / DMD failed"
[ -z "$side" ] || wait $side || note "$SIDE failed"
for v in "${variants[@]}"; do wait "${v%%:*}" || note "${v#*:} failed"; done
if [ -n "$decoder" ]; then  # the student and the shipped model, each with the decoder closest to the truth's sharpness
  wait $decoder || note "decoder variants failed"
  best=$(python3 - "$E" <<'PY'
import json, pathlib, sys
found = {p.parent.name: json.loads(p.read_text()) for p in pathlib.Path(sys.argv[1]).glob("decoder*/autoencoder.json")}
floor = max((r["psnr"] for r in found.values()), default=0.0) - 1.0  # at most 1 dB below the best PSNR
fit = [name for name, r in found.items() if r["psnr"] >= floor]
print(min(fit, key=lambda name: abs(found[name]["sharpness_ratio"] - 1.0)) if fit else "")
PY
)
  note "decoder: ${best:-none} of $(ls -d "$E"/decoder* 2>/dev/null | wc -l) measured"
  with_decoder() {  # with_decoder CHECKPOINT RUN: CHECKPOINT's DiT with the chosen decoder, as $R/RUN/model.safetensors
    mkdir -p "$R/$2"
    python3 -m worldmodel.checkpoint dit-only "$1" "$R/$2/dit.safetensors" > /dev/null &&
      python3 -m worldmodel.checkpoint join "$R/$2/dit.safetensors" "$R/$best/model.safetensors" "$R/$2/model.safetensors" \
      >> "$T/decoder.txt" 2>&1 || note "joining $1 with $best failed"
  }
  if [ -n "$best" ]; then
    [ -f "$R/causal_cd/model.safetensors" ] && with_decoder "$R/causal_cd/model.safetensors" causal_cd_sharp
    with_decoder "$SHIPPED" shipped_sharp
  fi
fi
pack_texts

note "evaluate"
mkdir -p "$E"
evaluate() {  # evaluate NAME CHECKPOINT [ARGS...]: in the background, timed, under $E/NAME
  local name=$1 ckpt=$2
  shift 2
  [ -f "$ckpt" ] || [ -f "${ckpt%.safetensors}-01-of-02.safetensors" ] || return 0
  ( s=$(date +%s)
    OMP_NUM_THREADS=2 timeout "${EVAL_TIMEOUT_S:-420}" python3 -m train.evaluate "$ckpt" --world "$WORLD" --out "$E/$name" --device cuda "$@" \
      > "$R/eval-$name.log" 2>&1
    echo "$name rc=$? $(( $(date +%s) - s ))s" >> "$T/eval_times.txt" ) &
}
FULL=(--clips "${EVAL_CLIPS:-32}" --seed "${EVAL_SEED:-0}" --long-frames 400 --long-clips 2 --window 100)
[ "${EVAL_SHIPPED:-1}" = 0 ] || evaluate shipped "$SHIPPED" "${FULL[@]}"
[ "${EVAL_CARRIED:-0}" = 0 ] || evaluate ar_teacher_carried_g1 "$R/ar_teacher_init/model.safetensors" "${FULL[@]}" --guidance 1
for level in ${CONTEXT_NOISES:-}; do  # the shipped student and each CD_ON_VARIANTS run playing on a noised history
  evaluate "shipped_ctx$level" "$SHIPPED" "${FULL[@]}" --context-noise "$level"
  for v in "${variants[@]}"; do evaluate "${v#*:}_ctx$level" "$R/${v#*:}/model.safetensors" "${FULL[@]}" --context-noise "$level"; done
done
for v in "${variants[@]}"; do evaluate "${v#*:}" "$R/${v#*:}/model.safetensors" "${FULL[@]}"; done
for g in ${AR_GUIDANCES-1}; do  # the AR teacher's own sampler (16 Euler steps) at each guidance (AR_GUIDANCES= : none)
  evaluate "ar_teacher_g$g" "$R/ar_teacher/model.safetensors" "${FULL[@]}" --guidance "$g"
done
evaluate "ar_teacher_${AR_EXPORT_S:-150}s_g1" "$R/ar_teacher/exports/model_$(printf %06d "${AR_EXPORT_S:-150}")s.safetensors" "${FULL[@]}" --guidance 1
evaluate causal_cd_2step "$R/causal_cd/model.safetensors" "${FULL[@]}"
for run in dmd dmd_on; do evaluate "${run}_2step" "$R/$run/model.safetensors" "${FULL[@]}"; done
for v in ${DMD_VARIANTS:-}; do
  for run in "${v%%:*}" "${v%%:*}_on"; do evaluate "${run}_2step" "$R/$run/model.safetensors" "${FULL[@]}"; done
done
evaluate causal_cd_cpu_2step "$R/causal_cd_cpu/model.safetensors" "${FULL[@]}"
[ "$SIDE" = cd_on ] && evaluate causal_cd_on_2step "$R/causal_cd_on/model.safetensors" "${FULL[@]}"  # CD_ON_VARIANTS runs: above, by name
evaluate causal_cd_sharp_2step "$R/causal_cd_sharp/model.safetensors" "${FULL[@]}"
evaluate shipped_sharp "$R/shipped_sharp/model.safetensors" "${FULL[@]}"
[ -f "$R/autoencoder/done" ] && evaluate autoencoder "$R/autoencoder/model.safetensors" --autoencoder-only --clips 32
wait
note "evaluated: $(tr '\n' ' ' < "$T/eval_times.txt")"
bash $P "$WORLD" pack > "$T/pack.txt" 2>&1
cp "$OUT/$WORLD/results.tgz" "$S/out/results.tgz" 2>/dev/null
export_shards() {  # export_shards RUN NAME DTYPE: $S/out/NAME-0k-of-0N.safetensors, if the run has a model
  [ -f "$R/$1/model.safetensors" ] || return 0
  python3 - "$R/$1/model.safetensors" "$S/out/$2.safetensors" "$3" <<'PY' || note "export $1 failed"
import sys, torch
from worldmodel import checkpoint
checkpoint.save(sys.argv[2], checkpoint.load(sys.argv[1]), dtype=getattr(torch, sys.argv[3]), max_shard_mib=15)
PY
}
export_shards causal_cd causal_cd float16
for run in dmd dmd_on; do export_shards $run $run float16; done
for v in ${DMD_VARIANTS:-}; do for run in "${v%%:*}" "${v%%:*}_on"; do export_shards "$run" "$run" float16; done; done
export_shards causal_cd_cpu causal_cd_cpu float16
export_shards causal_cd_on causal_cd_on float16
export_shards causal_cd_sharp causal_cd_sharp float16
export_shards shipped_sharp shipped_sharp float16
for v in "${variants[@]}"; do export_shards "${v#*:}" "${v#*:}" float16; done
[ "${AR_S:-300}" = 0 ] || python3 -m worldmodel.checkpoint dit-only "$R/ar_teacher/model.safetensors" "$S/out/ar_teacher_dit.safetensors" \
  --dtype bfloat16 > "$T/export_ar_teacher.txt" 2>&1 || note "export ar_teacher failed"  # carried to the next session as AR_INIT
[ -f "$R/autoencoder/done" ] && { python3 -m worldmodel.checkpoint autoencoder-only "$R/autoencoder/model.safetensors" \
  "$S/out/autoencoder.safetensors" --dtype bfloat16 > "$T/export_autoencoder.txt" 2>&1 || note "export autoencoder failed"; }  # its AE_INIT
pack_texts

bench() {  # bench SECONDS_NEEDED NAME ARGS...: the training benchmark, if the lease has that long left
  local need=$1 name=$2
  shift 2
  local left=$(( ${DEADLINE_S:-1500} - ($(date +%s) - START) ))
  note "bench $name (${left}s left)"
  [ "$left" -gt "$need" ] || return 0
  timeout "$left" python3 -m train.bench --preset default --window 10 --device cuda --data "$RUNS/procedural/episodes" \
    --out "$T/bench_$name.json" "$@" > "$T/bench_$name.txt" 2>&1 || note "bench $name stopped ($?)"
  pack_texts
}
bench 120 batches --stages "${BENCH_STAGES:-teacher,ar_teacher,causal_cd}" --batches "${BENCH_BATCHES:-32,128,512}" --variants after
note "done"
pack_texts
