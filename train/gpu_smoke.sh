#!/usr/bin/env bash
# GPU smoke run of the training pipeline at the default preset.
#
#   bash train/gpu_smoke.sh [stages|ddp|all] [OUT]        (default: all, out/gpu_smoke)
#
# stages: records episodes (procedural world; synthetic frames if no world can run here), then
#         runs every stage on one GPU, each about SMOKE_SECONDS (default 60) or a fixed step count,
#         chaining outputs as in the real pipeline, and prints per stage: steps, step time,
#         frames/s, peak memory; for causal CD (3a) and causal ODE (3b) the wall clock of the
#         whole stage at the same step count (3b: including trajectory generation).
# ddp:    needs 2 GPUs. Runs the teacher and the DMD stage for a few steps on 1 GPU and with
#         torchrun on 2 GPUs at the same global batch (fp32) and prints the largest loss difference.
# Needs the Python packages of pyproject.toml (omegaconf, safetensors, tqdm, numpy, imageio) and
# the repository on PYTHONPATH (run from the repository root).
set -euo pipefail

MODE=${1:-all}
OUT=${2:-out/gpu_smoke}
PRESET=${SMOKE_PRESET:-default}
SECONDS_PER_STAGE=${SMOKE_SECONDS:-60}
DISTILL_STEPS=${SMOKE_DISTILL_STEPS:-300}   # steps of 3a and 3b (the same for both)
ODE_BATCHES=${SMOKE_ODE_BATCHES:-100}        # stored trajectory batches of 3b (x data.batch clips)
PY=${PYTHON:-python3}
DEVICE=${SMOKE_DEVICE:-cuda}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
DATA="$OUT/episodes"
COMMON=("preset=$PRESET" data.source=recordings "data.recordings=$DATA" run.log_every=10 run.sample_every=0
        run.checkpoint_every=1000000 data.workers=6)

record_episodes() {
  [ -d "$DATA" ] && return
  if ! "$PY" -m worldmodel.data collect --world procedural --episodes 64 --frames 80 --batch 64 --device "$DEVICE" --out "$DATA"; then
    echo "no world could run here: writing synthetic 128x128 episodes instead"
    rm -rf "$DATA"
    "$PY" - "$DATA" <<'EOF'
import math, sys, torch
from pathlib import Path
from worldmodel.actions import ActionSpec
from worldmodel.camera import ControllerSpec, integrate
from worldmodel.data.episode import EpisodeMeta, EpisodeWriter
root, spec, ctrl, size, g = Path(sys.argv[1]), ActionSpec(), ControllerSpec(), 128, torch.Generator().manual_seed(0)
xs = torch.linspace(0, 1, size)
for e in range(64):
    actions = torch.cat([(torch.rand(1, 80, len(spec.keys), generator=g) < 0.3).float(),
                         torch.randint(-20, 21, (1, 80, 2), generator=g).float()], -1)
    actions[:, 0] = 0
    poses, _ = integrate(actions, spec, ctrl)
    meta = EpisodeMeta(action_spec=spec, controller=ctrl, fps=20.0, height=size, width=size, source="synthetic", seed=e)
    with EpisodeWriter(root / f"ep{e:03d}", meta) as w:
        for t in range(80):
            yaw = torch.atan2(poses[0, t, 0, 2], poses[0, t, 2, 2])
            red = ((xs[None, :] + yaw / math.pi) % 1.0).expand(size, size)
            w.append((torch.stack([red, xs[:, None].expand(size, size), torch.full((size, size), e / 64)], -1) * 255).byte(),
                     actions[0, t], poses[0, t])
EOF
  fi
}

stage() {  # stage NAME RUN [overrides...]: run one stage into $OUT/RUN, append its wall clock to wall_clock.txt
  local name=$1 key=$2; shift 2
  local start; start=$(date +%s.%N)
  "$PY" -m train "$name" "${COMMON[@]}" "run.dir=$OUT/$key" "$@"
  awk -v key="$key" -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%s wall_clock_s %.1f\n", key, b - a }' \
    >> "$OUT/wall_clock.txt"
}

summary() {
  "$PY" - "$OUT" <<'EOF'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"\n{'stage':26s} {'steps':>6s} {'step ms':>8s} {'frames/s':>9s} {'peak GB':>8s} {'prepare s':>9s} {'run s':>7s}")
for run in ["autoencoder", "teacher", "ar_teacher", "causal_cd", "causal_ode", "causal_ode_bidirectional", "dmd"]:
    log = out / run / "log.jsonl"
    if not log.exists():
        continue
    recs = [json.loads(l) for l in log.read_text().splitlines()]
    windows = [r for r in recs if "step_seconds" in r][1:] or [r for r in recs if "step_seconds" in r]
    med = lambda k: statistics.median(r[k] for r in windows)
    prepare = sum(r.get("prepare_seconds", 0.0) for r in recs)
    wall = sum(r.get("wall_seconds", 0.0) for r in recs)
    print(f"{run:26s} {recs[-1]['step']:6d} {1e3 * med('step_seconds'):8.1f} {med('frames_per_second'):9.0f} "
          f"{max(r.get('peak_memory_gb', 0) for r in windows):8.2f} {prepare:9.1f} {wall:7.1f}")
print("(step ms, frames/s: medians over log windows after the first; run s: the stage's whole run incl. prepare)")
EOF
}

run_stages() {
  record_episodes
  : > "$OUT/wall_clock.txt"
  stage autoencoder autoencoder run.steps=1000000 "run.time_limit_s=$SECONDS_PER_STAGE"
  stage teacher teacher run.steps=1000000 "run.time_limit_s=$SECONDS_PER_STAGE" \
    "init.autoencoder=$OUT/autoencoder/model.safetensors"
  stage ar_teacher ar_teacher run.steps=1000000 "run.time_limit_s=$SECONDS_PER_STAGE" \
    "init.teacher=$OUT/teacher/model.safetensors"
  stage causal_cd causal_cd "run.steps=$DISTILL_STEPS" "init.teacher=$OUT/ar_teacher/model.safetensors"
  stage causal_ode causal_ode "run.steps=$DISTILL_STEPS" "ode.num_batches=$ODE_BATCHES" \
    "init.teacher=$OUT/ar_teacher/model.safetensors"
  stage causal_ode causal_ode_bidirectional run.steps=50 ode.num_batches=10 ode.trajectories=bidirectional \
    "init.teacher=$OUT/teacher/model.safetensors"
  stage dmd dmd run.steps=1000000 "run.time_limit_s=$SECONDS_PER_STAGE" \
    "init.student=$OUT/causal_cd/model.safetensors" "init.teacher=$OUT/teacher/model.safetensors"
  summary
  echo; echo "3a vs 3b at $DISTILL_STEPS steps each (3b with $ODE_BATCHES stored trajectory batches):"
  grep -E "^causal_(cd|ode) " "$OUT/wall_clock.txt"
}

compare_losses() {  # compare_losses DIR1 DIR2 KEY...
  "$PY" - "$@" <<'EOF'
import json, sys
a, b, keys = sys.argv[1], sys.argv[2], sys.argv[3:]
read = lambda d: {r["step"]: r for r in map(json.loads, open(f"{d}/log.jsonl")) if any(k in r for k in keys)}
ra, rb = read(a), read(b)
worst = 0.0
for step in sorted(ra):
    for k in keys:
        if k in ra[step]:
            x, y = ra[step][k], rb[step][k]
            worst = max(worst, abs(x - y) / max(abs(x), 1e-8))
            print(f"step {step:3d} {k:15s} 1 GPU {x:.7g}   2 GPUs {y:.7g}")
print(f"largest relative difference: {worst:.2e} ({'PASS' if worst < 1e-3 else 'FAIL'}: < 1e-3 expected in fp32)")
EOF
}

run_ddp() {
  if [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -lt 2 ]; then
    echo "ddp check skipped: fewer than 2 GPUs"; return
  fi
  record_episodes
  [ -f "$OUT/autoencoder/model.safetensors" ] || stage autoencoder autoencoder run.steps=50
  [ -f "$OUT/teacher/model.safetensors" ] || stage teacher teacher run.steps=50 \
    "init.autoencoder=$OUT/autoencoder/model.safetensors"
  [ -f "$OUT/causal_cd/model.safetensors" ] || { stage ar_teacher ar_teacher run.steps=20 \
    "init.teacher=$OUT/teacher/model.safetensors"; stage causal_cd causal_cd run.steps=20 \
    "init.teacher=$OUT/ar_teacher/model.safetensors"; }
  local ddp=(run.precision=fp32 run.log_every=1 data.batch=16)
  rm -rf "$OUT"/ddp_*
  CUDA_VISIBLE_DEVICES=0 "$PY" -m train teacher "${COMMON[@]}" "${ddp[@]}" run.steps=20 run.dir="$OUT/ddp_teacher_1" \
    "init.autoencoder=$OUT/autoencoder/model.safetensors"
  torchrun --standalone --nproc_per_node=2 -m train teacher "${COMMON[@]}" "${ddp[@]}" run.steps=20 \
    run.dir="$OUT/ddp_teacher_2" "init.autoencoder=$OUT/autoencoder/model.safetensors"
  local dmd=(dmd.critic_updates=2 "init.student=$OUT/causal_cd/model.safetensors" "init.teacher=$OUT/teacher/model.safetensors")
  CUDA_VISIBLE_DEVICES=0 "$PY" -m train dmd "${COMMON[@]}" "${ddp[@]}" run.steps=6 run.dir="$OUT/ddp_dmd_1" "${dmd[@]}"
  torchrun --standalone --nproc_per_node=2 -m train dmd "${COMMON[@]}" "${ddp[@]}" run.steps=6 run.dir="$OUT/ddp_dmd_2" "${dmd[@]}"
  echo; echo "DDP teacher (flow matching), global batch 16:"
  compare_losses "$OUT/ddp_teacher_1" "$OUT/ddp_teacher_2" loss
  echo; echo "DDP dmd (self-forcing rollouts, generator + critic), global batch 16:"
  compare_losses "$OUT/ddp_dmd_1" "$OUT/ddp_dmd_2" generator_loss critic_loss
}

case "$MODE" in
  stages) run_stages ;;
  ddp) run_ddp ;;
  all) run_stages; run_ddp ;;
  *) echo "usage: bash train/gpu_smoke.sh [stages|ddp|all] [OUT]" >&2; exit 2 ;;
esac
