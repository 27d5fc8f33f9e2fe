#!/usr/bin/env bash
# The second half of a gpu_session.sh lease, on the same machine (runs in /tmp/session/runs/procedural):
# continue the CF++ chain's AR teacher and student for CONTINUE_S more seconds side by side, evaluate both,
# export them, then time each stage's step before/after the fast path on the trained checkpoints, one run at a
# time (train.bench does the full matrix).  setsid nohup bash train/scripts/gpu_continue.sh > /tmp/continue.log 2>&1 &
set -uo pipefail
S=/tmp/session
R=$S/runs/procedural
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
note() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$S/status"; }
COMMON=(preset=default data.source=recordings "data.recordings=$R/episodes" data.workers=6 "data.latent_cache=$R/latent_cache"
        run.sample_every=0 run.log_every=50 run.checkpoint_every=100000 run.steps=1000000 run.resume=true)
note "continue"
for run in ar_shift1_ctx cd_shift1_ctx; do
  stage=$(grep -m1 '^stage:' "$R/$run/config.yaml" | cut -d' ' -f2)
  init=$(python3 -c "import yaml; c=yaml.safe_load(open('$R/$run/config.yaml')); print(' '.join(f'init.{k}={v}' for k, v in c['init'].items()))")
  extra=$(python3 -c "import yaml; c=yaml.safe_load(open('$R/$run/config.yaml')); print(' '.join(f'{s}.{k}={v}' for s in ('flow', 'cd', 'optim', 'sample', 'data') if s in c for k, v in c[s].items() if not isinstance(v, (list, dict))))")
  [ "$stage" = causal_cd ] && extra="$extra model.sampler.steps=[1.0,0.5]"
  # shellcheck disable=SC2086
  python3 -m train "$stage" "${COMMON[@]}" "run.dir=$R/$run" "run.time_limit_s=${CONTINUE_S:-150}" $init $extra \
    > "$R/$run.continue.log" 2>&1 &
done
wait
for run in ar_shift1_ctx cd_shift1_ctx; do grep step_seconds "$R/$run/log.jsonl" | tail -1 | cut -c1-200; done
note "evaluate"
for run in ar_shift1_ctx cd_shift1_ctx; do
  OMP_NUM_THREADS=4 python3 -m train.evaluate "$R/$run/model.safetensors" --world procedural --out "$S/eval2/$run" --device cuda \
    --long-frames 400 --long-clips 2 --window 100 > "$R/eval2-$run.log" 2>&1 &
done
wait
tar czf "$S/out/eval2.tgz" -C "$S" eval2
for run in ar_shift1_ctx cd_shift1_ctx; do
  python3 -c "import sys, torch; from worldmodel import checkpoint; checkpoint.save(sys.argv[2], checkpoint.load(sys.argv[1]), dtype=torch.float16, max_shard_mib=15)" \
    "$R/$run/model.safetensors" "$S/out/$run.safetensors"
done
note "throughput"
speed() {  # speed NAME STAGE INIT VARIANT-OVERRIDES...: frames/s of steps 31-60 (after compile)
  local name=$1 stage=$2 init=$3; shift 3
  rm -rf "/tmp/speed/$name"
  python3 -m train "$stage" "${COMMON[@]}" data.batch=64 run.steps=60 run.log_every=30 "run.dir=/tmp/speed/$name" "$init" "$@" \
    > "/tmp/speed/$name.log" 2>&1
  echo "$name $(tail -2 "/tmp/speed/$name/log.jsonl" | head -1 | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); print(f\"{r['step_seconds']*1000:.1f} ms/step {r['frames_per_second']:.0f} frames/s {r.get('peak_memory_gb', 0):.2f} GB\")")" | tee -a "$S/out/throughput.txt"
}
mkdir -p /tmp/speed
for variant in before after; do
  v=(run.compile=false data.latents=false); [ $variant = after ] && v=(run.compile=true data.latents=true)
  speed teacher_$variant teacher "init.autoencoder=$R/autoencoder/model.safetensors" "${v[@]}"
  speed ar_teacher_$variant ar_teacher "init.teacher=$R/teacher_shift1/model.safetensors" "${v[@]}"
  speed causal_cd_$variant causal_cd "init.teacher=$R/ar_shift1_ctx/model.safetensors" "${v[@]}"
done
note "done2"
