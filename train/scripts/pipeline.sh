#!/usr/bin/env bash
# The whole method for one world, in phases that each fit a 10-minute GPU command; every stage resumes,
# and a finished stage (marked "done") is skipped when a phase runs again.
#
#   bash train/scripts/pipeline.sh WORLD PHASE...       WORLD: procedural | doom
#
# Phases:
#   data      collect training episodes (COLLECTORS processes in parallel)
#   base      autoencoder -> bidirectional teacher -> frame-wise AR teacher (+ chunk-wise AR teacher if COMPARE=1); the
#             teacher starts from the autoencoder of run AE_RUN (default autoencoder), or with AE_S=0 from AE_INIT's
#             autoencoder unchanged (so the students keep the shipped model's latent space). AE_EXTRA goes to its
#             autoencoder stage: e.g. model.autoencoder.latent_channels=16 widens AE_INIT's latent (and with
#             init.autoencoder=null trains a 16-channel autoencoder from scratch)
#   ae_variants  the autoencoder stage side by side: run autoencoder as configured, and one run per variant of
#             AE_VARIANTS (space-separated; a variant is comma-separated KEY=VALUE overrides, default
#             autoencoder.edge_weight=0.1; run autoencoder_<last part of each key><value>, e.g.
#             model.autoencoder.latent_channels=16,init.autoencoder=null -> autoencoder_latent_channels16_autoencodernull,
#             a wider latent from scratch; a list value keeps its commas: model.autoencoder.decoder_channels=[96,48] ->
#             _decoder_channels96-48), each measured with train.evaluate --autoencoder-only into
#             $OUT/eval/<run>/autoencoder.json; AE_RUN=<run> then gives phase base that autoencoder. AE_EXTRA (space-
#             separated KEY=VALUE) goes to every run of it and AE_NAME (default autoencoder) names them: e.g. AE_NAME=decoder
#             AE_EXTRA=autoencoder.train_encoder=false AE_VARIANTS=autoencoder.adversarial_weight=0.5 trains the decoder
#             of AE_INIT alone, with and without a discriminator, in AE_INIT's latent space
#   distill   CF++: causal CD -> DMD (frame-wise, 2 steps); exports the student (DMD's, or CD's when DMD_S=0) as
#             fp16 shards. DMD_VARIANTS ("NAME:KEY=VALUE,KEY=VALUE ..."): DMD runs NAME from the same student with
#             those overrides, beside dmd on its budget (e.g. long rollouts: data.clip_len=61,dmd.score_frames=13).
#             With COMPARE=1, in parallel (same budgets, same data):
#               Causal Forcing:      causal ODE from the chunk-wise AR teacher -> DMD (chunk, 4 steps)
#               Self-Forcing-style:  ODE from the bidirectional teacher        -> DMD (chunk, 4 steps)
#   cpu_tier  causal CD of the CPU tier's smaller student (CPU_TIER: model.dit.* and data.clip_len keys, default depth 4
#             and a KV window of 8 frames) from the full AR teacher, its first blocks the teacher's evenly spaced ones
#             (train.inputs.kept_blocks), at CD_CPU_LR (default 5e-5 at batch 32, 2.5x CD's: it starts further from
#             its target) for CD_CPU_S seconds: run causal_cd_cpu
#   cd_on     causal CD towards the AR teacher on from an earlier student of its latent space (CD_INIT, default the
#             shipped assets/models/WORLD.safetensors; init.student) instead of from the AR teacher, for CD_S: run
#             CD_ON_RUN (default causal_cd_on)
#   dmd_on    DMD on from an earlier student (DMD_INIT, default the shipped assets/models/WORLD.safetensors) for DMD_S:
#             run dmd_on, and beside it run NAME_on for each DMD_VARIANTS entry. The real score is run teacher: the
#             bidirectional teacher, trained here first (TEACHER_S, TEACHER_EXTRA) on DMD_INIT's autoencoder unless
#             phase base made it already (DMD checks that student and teacher share one autoencoder)
#   scm       Causal-rCM: sCM from the frame-wise AR teacher (stage 3c) -> DMD, on CD's budgets (SCM_S, DMD_SCM_S)
#   guidance  causal CD towards the AR teacher at CFG 3 (the old default; cd.guidance is 1 now) and sCM towards the
#             unguided one, on the same budgets, side by side: runs causal_cd_g3, causal_scm_g1
#   dmd_g1    DMD from causal_scm_g1 (DMD_SCM_S): run dmd_scm_g1
#   evaluate  python -m train.evaluate on every model the runs hold (reports under $OUT/eval/ROW)
#   speed     time every evaluated model again, alone on the GPU (evaluations may have shared it)
#   pack      the reports and stage logs into $OUT/results.tgz (for python -m train.compare)
#   ablate    the recipe ablation after the autoencoder, side by side on the same data and budgets:
#             teacher + AR teacher at flow shift 5 (the old recipe) and at shift 1, and shift 1 with context
#             noise; then causal CD from the shift-1 context-noise AR teacher. Evaluate with EVAL_ROWS="ablation".
#
# The stages' configs hold the recipe the ablation chose (flow shift 1, context noise 0.1, students at sigmas 1, 0.5).
#
# Environment: RUNS (run folders, default /tmp/runs), OUT (results, default out), PRESET (default),
# AE_INIT (a checkpoint of any stage whose autoencoder the autoencoder stage goes on training), AR_INIT (a DiT-only AR
# teacher, from python -m worldmodel.checkpoint dit-only: phase base joins it with AE_INIT's autoencoder, which needs
# AE_S=0, into $RUNS/ar_teacher_init and trains the AR teacher on from it, with no bidirectional teacher stage; with
# AR_S=0 it is the AR teacher as it is), CD_INIT and DMD_INIT
# (the earlier students phases cd_on and dmd_on go on from, default the shipped model),
# DEVICE (cuda), budgets in seconds AE_S TEACHER_S AR_S AR3_S CD_S CD_CPU_S SCM_S ODE_S DMD_S DMD_SCM_S (0 skips the stage), EPISODES, FRAMES,
# POLICY (the exploration policy that collects the episodes, default mix; all adds the gazer, who holds the view up or
# down),
# COLLECTORS, WORKERS (data workers per stage), ODE_BATCHES, ODE_GRID, EXTRA (more KEY=VALUE for every stage), EVAL (more
# train.evaluate arguments), EVAL_ROWS (evaluate only these rows), EVAL_PARALLEL (1: evaluate rows side by side),
# EVAL_THREADS (CPU threads per evaluation, default 4), BATCH (global clips per step, default 64) and LR (the
# teacher's rate, default 4e-4: the rate tuned at batch 32, 3e-4, times sqrt(BATCH / 32); the later stages keep
# their configs' rates times the same factor). Stages after the autoencoder train on latents encoded once
# (data.latents, cached in $RUNS/latent_cache) and compiled (run.compile); a stage whose compiled run fails is
# run once more eagerly.
set -euo pipefail
WORLD=$1
shift
RUNS=${RUNS:-/tmp/runs}/$WORLD
OUT=${OUT:-out}/$WORLD
DEVICE=${DEVICE:-cuda}
mkdir -p "$RUNS" "$OUT"
export PYTHONUNBUFFERED=1
# 4 steps: uniform 1, .75, .5, .25 under shift 5 (Self Forcing's): [1.0,0.9375,0.8333,0.625]
CHUNK_STEPS=$(python3 -c "from worldmodel.flow import step_list; print([round(s, 4) for s in step_list(4, shift=5.0)])" | tr -d ' ')
BATCH=${BATCH:-64}
SCALE=$(python3 -c "print(($BATCH / 32) ** 0.5)")
LR=${LR:-$(python3 -c "print(3e-4 * $SCALE)")}
COMMON=(preset=${PRESET:-default} data.source=recordings "data.recordings=$RUNS/episodes" data.workers=${WORKERS:-6}
        data.batch=$BATCH "data.latent_cache=$RUNS/latent_cache"
        run.sample_every=0 run.log_every=50 run.checkpoint_every=100000 run.steps=1000000 ${EXTRA:-})
rate() { python3 -c "print($1 * $SCALE)"; }  # a stage config's rate (tuned at batch 32) at this batch

log() { echo "[$(date +%H:%M:%S) $WORLD] $*"; }
last_lines() { tr '\r' '\n' | { grep -v -E "it/s\]|s/it\]|^\s*$" || true; } | tail -"$1"; }  # without progress bars

stage() {  # stage RUN STAGE SECONDS KEY=VALUE...: train until the budget is spent, then mark the run done
  local run=$1 name=$2 seconds=$3
  shift 3
  if [ -f "$RUNS/$run/done" ]; then log "$run: done before"; return 0; fi
  if [ "$seconds" = 0 ]; then log "$run: skipped (budget 0)"; return 0; fi
  log "$run: $name for ${seconds}s"
  if ! python3 -m train "$name" "${COMMON[@]}" "run.dir=$RUNS/$run" "run.time_limit_s=$seconds" "$@" >"$RUNS/$run.log" 2>&1; then
    last_lines 5 <"$RUNS/$run.log"
    if grep -q -E "torch._dynamo|torch._inductor|InductorError|BackendCompilerFailed" "$RUNS/$run.log"; then
      log "$run: compiled run failed; once more eagerly"
      rm -rf "${RUNS:?}/$run"
      python3 -m train "$name" "${COMMON[@]}" "run.dir=$RUNS/$run" "run.time_limit_s=$seconds" run.compile=false "$@" \
        >"$RUNS/$run.log" 2>&1 || { last_lines 5 <"$RUNS/$run.log"; return 1; }
    else
      return 1
    fi
  fi
  touch "$RUNS/$run/done"
  python3 - "$RUNS/$run/log.jsonl" "$run" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
last = [r for r in rows if "step_seconds" in r][-1]
wall = sum(r["wall_seconds"] for r in rows if "wall_seconds" in r)
prepare = sum(r["prepare_seconds"] for r in rows if "prepare_seconds" in r)
losses = {k: float(f"{v:.4g}") for k, v in last.items() if k.endswith("loss")}
print(f"  {sys.argv[2]}: {last['step']} steps, {wall:.0f} s (prepare {prepare:.0f} s), "
      f"{last['step_seconds'] * 1000:.1f} ms/step, {last['frames_per_second']:.0f} frames/s, {losses}")
PY
}

model() { echo "$RUNS/$1/model.safetensors"; }

collect() {
  local episodes=${EPISODES:-1024} processes=${COLLECTORS:-8} batch=32 device=$DEVICE
  [ "$WORLD" = doom ] && { episodes=${EPISODES:-512}; batch=8; device=cpu; }
  [ -f "$RUNS/episodes/done" ] && { log "episodes: done before"; return 0; }
  rm -rf "$RUNS/episodes"
  local each=$(( (episodes + processes - 1) / processes )) pids=()
  log "collect $episodes episodes of ${FRAMES:-120} frames in $processes processes, policy ${POLICY:-mix}"
  for i in $(seq 0 $((processes - 1))); do
    python3 -m worldmodel.data collect --world "$WORLD" --episodes "$each" --frames "${FRAMES:-120}" --seed $((i * each)) \
      --policy "${POLICY:-mix}" --batch "$batch" --device "$device" --out "$RUNS/episodes" >"$RUNS/collect-$i.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || { tail -n 3 "$RUNS"/collect-*.log; return 1; }; done
  touch "$RUNS/episodes/done"
  log "collected $(find "$RUNS/episodes" -name meta.json | wc -l) episodes"
}

AE=(optim.lr=3e-4 optim.warmup_steps=200 data.batch=32 ${AE_INIT:+"init.autoencoder=$AE_INIT"})
teacher_stage() {  # teacher_stage CHECKPOINT: run teacher, the bidirectional teacher on CHECKPOINT's autoencoder, for TEACHER_S
  stage teacher teacher "${TEACHER_S:-180}" optim.lr="$LR" optim.warmup_steps=200 "init.autoencoder=$1" ${TEACHER_EXTRA:-}
}
base() {
  local ae init
  ae=$(model "${AE_RUN:-autoencoder}")
  init=$(model teacher)
  if [ "${AE_S:-100}" = 0 ] && [ -n "${AE_INIT:-}" ]; then ae=$AE_INIT; fi  # AE_INIT's autoencoder as it is
  if [ -n "${AR_INIT:-}" ]; then  # the carried AR teacher's DiT, with the autoencoder it was trained against
    if [ "${AE_S:-100}" != 0 ] || [ -z "${AE_INIT:-}" ]; then log "AR_INIT needs AE_INIT (its autoencoder) and AE_S=0"; return 2; fi
    init=$(model ar_teacher_init)
    if [ ! -f "$init" ] || [ ! -d "$RUNS/ar_teacher" ]; then  # kept once a run started from it: its resume checks the bytes
      log "ar_teacher_init: $AR_INIT joined with the autoencoder of $AE_INIT"
      python3 -m worldmodel.checkpoint join "$AR_INIT" "$AE_INIT" "$init" | sed 's/^/  /'
    fi
  else
    stage autoencoder autoencoder "${AE_S:-100}" "${AE[@]}" ${AE_EXTRA:-}
    teacher_stage "$ae"
  fi
  stage ar_teacher ar_teacher "${AR_S:-100}" sample.steps=16 optim.lr="$(rate 5e-5)" "init.teacher=$init" ${AR_EXTRA:-}
  if [ "${AR_S:-100}" = 0 ] && [ -n "${AR_INIT:-}" ] && [ ! -f "$(model ar_teacher)" ]; then  # the carried one as it is
    mkdir -p "$RUNS/ar_teacher" && cp "$init" "$(model ar_teacher)"
  fi
  if [ "${COMPARE:-0}" = 1 ]; then
    stage ar_teacher_chunk ar_teacher "${AR3_S:-50}" sample.steps=16 model.dit.block_size=3 "init.teacher=$(model ar_teacher)"
  fi
}

export_model() {  # export_model RUN NAME: fp16 shards of at most 15 MiB, NAME-01-of-0N.safetensors, in $OUT
  python3 - "$(model "$1")" "$OUT/$2.safetensors" <<'PY'
import sys, torch
from worldmodel import checkpoint
for f in checkpoint.save(sys.argv[2], checkpoint.load(sys.argv[1]), dtype=torch.float16, max_shard_mib=15):
    print("  wrote", f, f"{f.stat().st_size / 2**20:.1f} MiB")
PY
}

DMD=("init.teacher=$(model teacher)")  # the real score: the bidirectional teacher, for every row
dmd_runs() {  # dmd_runs SUFFIX STUDENT: run dmd$SUFFIX from STUDENT, and beside it each DMD_VARIANTS entry as NAME$SUFFIX
  local suffix=$1 student=$2 pids=() v failed=0
  for v in ${DMD_VARIANTS:-}; do  # NAME:KEY=VALUE,KEY=VALUE - DMD from the same student with these overrides
    local over=${v#*:}
    stage "${v%%:*}$suffix" dmd "${DMD_S:-120}" "init.student=$student" "${DMD[@]}" ${DMD_EXTRA:-} ${over//,/ } &
    pids+=($!)
  done
  stage "dmd$suffix" dmd "${DMD_S:-120}" "init.student=$student" "${DMD[@]}" ${DMD_EXTRA:-} || failed=1
  for v in "${pids[@]}"; do wait "$v" || failed=1; done
  return $failed
}
ODE=(ode.num_batches="${ODE_BATCHES:-24}" ode.grid_steps="${ODE_GRID:-48}" model.sampler.steps="$CHUNK_STEPS")
chain_cfpp() {
  stage causal_cd causal_cd "${CD_S:-120}" optim.lr="$(rate 2e-5)" "init.teacher=$(model ar_teacher)" ${CD_EXTRA:-}
  dmd_runs "" "$(model causal_cd)"
}
CPU_TIER=(${CPU_TIER:-model.dit.depth=4 model.dit.window_frames=8 data.clip_len=9})
cpu_tier() {
  stage causal_cd_cpu causal_cd "${CD_CPU_S:-${CD_S:-120}}" optim.lr="$(rate "${CD_CPU_LR:-5e-5}")" "init.teacher=$(model ar_teacher)" \
    "${CPU_TIER[@]}"
}
cd_on() {  # causal CD on from an earlier student (CD_INIT, default the shipped model) towards the AR teacher
  stage "${CD_ON_RUN:-causal_cd_on}" causal_cd "${CD_S:-120}" optim.lr="$(rate 2e-5)" "init.teacher=$(model ar_teacher)" \
    "init.student=${CD_INIT:-assets/models/$WORLD.safetensors}" ${CD_EXTRA:-}
}
dmd_on() {  # DMD on from an earlier student (DMD_INIT, default the shipped model), its real score a teacher on its autoencoder
  local init=${DMD_INIT:-assets/models/$WORLD.safetensors}
  teacher_stage "$init"
  dmd_runs _on "$init"
}
chain_scm() {
  stage causal_scm causal_scm "${SCM_S:-${CD_S:-120}}" optim.lr="$(rate 2e-5)" "init.teacher=$(model ar_teacher)" ${SCM_EXTRA:-}
  stage dmd_scm dmd "${DMD_SCM_S:-${DMD_S:-120}}" "init.student=$(model causal_scm)" "${DMD[@]}" ${DMD_EXTRA:-}
}
chain_guidance() {  # issue 12's lever, side by side: causal CD towards the CFG-3 AR teacher, sCM towards the unguided one
  stage causal_cd_g3 causal_cd "${CD_S:-120}" optim.lr="$(rate 2e-5)" cd.guidance=3 "init.teacher=$(model ar_teacher)" ${CD_EXTRA:-} \
    > "$RUNS/guidance_cd_g3.out" 2>&1 &
  local cd=$! failed=0
  stage causal_scm_g1 causal_scm "${SCM_S:-${CD_S:-120}}" optim.lr="$(rate 2e-5)" scm.guidance=1 "init.teacher=$(model ar_teacher)" \
    ${SCM_EXTRA:-} || failed=1
  wait $cd || failed=1
  cat "$RUNS/guidance_cd_g3.out"
  return $failed
}
chain_cf() {
  stage causal_ode_chunk causal_ode "${ODE_S:-120}" "${ODE[@]}" "init.teacher=$(model ar_teacher_chunk)"
  stage dmd_cf dmd "${DMD_S:-120}" "init.student=$(model causal_ode_chunk)" "${DMD[@]}"
}
chain_sf() {
  stage ode_bidirectional_chunk causal_ode "${ODE_S:-120}" "${ODE[@]}" ode.trajectories=bidirectional model.dit.block_size=3 \
    "init.teacher=$(model teacher)"
  stage dmd_sf dmd "${DMD_S:-120}" "init.student=$(model ode_bidirectional_chunk)" "${DMD[@]}"
}

ae_variants() {  # the autoencoder stage side by side: run autoencoder and one run per variant, each measured on held-out clips
  local runs=() pids=() v kv key name failed=0 extra
  for v in "" ${AE_VARIANTS:-autoencoder.edge_weight=0.1}; do  # "": the baseline
    name=${AE_NAME:-autoencoder}
    mapfile -t extra < <(sed -E ':a; s/(\[[^],]*),/\1;/; ta; s/,/\n/g; s/;/,/g' <<<"$v" | grep .)  # commas in [..] stay
    for kv in "${extra[@]}"; do key=${kv%%=*} value=${kv#*=}; name+="_${key##*.}$(tr -d '[] ' <<<"${value//,/-}")"; done
    stage "$name" autoencoder "${AE_S:-100}" "${AE[@]}" ${AE_EXTRA:-} "${extra[@]}" > "$RUNS/ae_$name.out" 2>&1 &
    pids+=($!); runs+=("$name")
  done
  for p in "${pids[@]}"; do wait "$p" || failed=1; done
  for name in "${runs[@]}"; do
    cat "$RUNS/ae_$name.out"
    [ -f "$(model "$name")" ] || continue
    python3 -m train.evaluate "$(model "$name")" --world "$WORLD" --device "$DEVICE" --autoencoder-only --clips 32 \
      --out "$OUT/eval/$name" 2>&1 | tail -1 | sed "s/^/  $name: /"
  done
  return $failed
}

distill() {
  local pids=()
  chain_cfpp > "$RUNS/chain_cfpp.out" 2>&1 & pids+=($!)
  if [ "${COMPARE:-0}" = 1 ]; then
    chain_cf > "$RUNS/chain_cf.out" 2>&1 & pids+=($!)
    chain_sf > "$RUNS/chain_sf.out" 2>&1 & pids+=($!)
  fi
  local failed=0
  for p in "${pids[@]}"; do wait "$p" || failed=1; done
  cat "$RUNS"/chain_*.out
  [ "$failed" = 0 ] || return 1
  if [ -f "$(model dmd)" ]; then export_model dmd "$WORLD"; else export_model causal_cd "$WORLD"; fi
}

SHIFT5=(flow.shift=5 sample.shift=5)
ablate() {  # after the autoencoder: the recipe rows side by side (see the header)
  stage autoencoder autoencoder "${AE_S:-100}" "${AE[@]}"
  local t=(optim.lr="$LR" optim.warmup_steps=200 "init.autoencoder=$(model autoencoder)")
  local a=(sample.steps=16 optim.lr="$(rate 5e-5)")
  { stage teacher_shift5 teacher "${TEACHER_S:-180}" "${t[@]}" &&
    stage ar_shift5 ar_teacher "${AR_S:-100}" "${a[@]}" "${SHIFT5[@]}" flow.context_noise=0 "init.teacher=$(model teacher_shift5)"; } \
    > "$RUNS/ablate_shift5.out" 2>&1 &
  local p5=$!
  stage teacher_shift1 teacher "${TEACHER_S:-180}" "${t[@]}" > "$RUNS/ablate_shift1.out" 2>&1
  stage ar_shift1 ar_teacher "${AR_S:-100}" "${a[@]}" flow.context_noise=0 "init.teacher=$(model teacher_shift1)" \
    >> "$RUNS/ablate_shift1.out" 2>&1 &
  local p1=$!
  stage ar_shift1_ctx ar_teacher "${AR_S:-100}" "${a[@]}" "init.teacher=$(model teacher_shift1)" > "$RUNS/ablate_ctx.out" 2>&1
  local failed=0
  wait $p1 || failed=1
  stage cd_shift1_ctx causal_cd "${CD_S:-120}" optim.lr="$(rate 2e-5)" "init.teacher=$(model ar_shift1_ctx)" \
    >> "$RUNS/ablate_ctx.out" 2>&1 || failed=1
  wait $p5 || failed=1
  cat "$RUNS"/ablate_*.out
  return $failed
}

# Evaluation rows: NAME RUN [train.evaluate arguments]; EVAL_ROWS=ablation picks the ablation's rows
ROWS=("cf_pp_2step dmd" "ar_teacher ar_teacher" "causal_forcing_4step dmd_cf" "self_forcing_4step dmd_sf"
      "cf_pp_1step dmd --steps 1.0" "causal_cd_2step causal_cd" "scm_2step causal_scm" "scm_dmd_2step dmd_scm"
      "ar_shift5 ar_shift5" "ar_shift1 ar_shift1" "ar_shift1_ctx ar_shift1_ctx" "cd_shift1_ctx cd_shift1_ctx")

evaluate() {  # one train.evaluate per row; EVAL_PARALLEL=1 runs them side by side (then run "speed" after)
  local row name run rest pids=()
  for row in "${ROWS[@]}"; do
    read -r name run rest <<<"$row"
    [ -f "$(model "$run")" ] || continue
    [ "${EVAL_ROWS:-}" = ablation ] && [[ "$name" != ar_shift* && "$name" != cd_shift* ]] && continue
    [ -n "${EVAL_ROWS:-}" ] && [ "${EVAL_ROWS:-}" != ablation ] && [[ " $EVAL_ROWS " != *" $name "* ]] && continue
    [ -f "$OUT/eval/$name/report.json" ] && { log "eval $name: done before"; continue; }
    log "eval $name"
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=${EVAL_THREADS:-4} python3 -m train.evaluate "$(model "$run")" --world "$WORLD" --out "$OUT/eval/$name" --device "$DEVICE" $rest ${EVAL:-} \
      >"$RUNS/eval-$name.log" 2>&1 &
    pids+=($!)
    [ "${EVAL_PARALLEL:-0}" = 1 ] || { wait $!; last_lines 2 <"$RUNS/eval-$name.log"; }
  done
  local failed=0
  for p in "${pids[@]}"; do wait "$p" || failed=1; done
  [ "${EVAL_PARALLEL:-0}" = 1 ] && for f in "$RUNS"/eval-*.log; do last_lines 1 <"$f"; done
  return $failed
}

speed() {  # the speed section of every report measured again, one model at a time, nothing else running
  python3 - "$OUT/eval" "$DEVICE" <<'PY'
import json, sys
from pathlib import Path
import torch
from train import evaluate as ev
from worldmodel import checkpoint
for path in sorted(Path(sys.argv[1]).glob("*/report.json")):
    report = json.loads(path.read_text())
    model = checkpoint.load(report["checkpoint"]["path"])
    settings = ev.EvalSettings(world=report["settings"]["world"], device=sys.argv[2], speed_frames=200)
    dtype = torch.bfloat16 if sys.argv[2] == "cuda" else torch.float32
    report["speed"] = ev.speed_report(model, settings, dtype, report["checkpoint"]["sampler"]["steps"])
    path.write_text(json.dumps(report, indent=1) + "\n")
    (path.parent / "report.md").write_text(ev.markdown(report, f"{path.parent.name} on {settings.world}"))
    print(f"  speed {path.parent.name}: {report['speed']}")
PY
}

pack() {  # the evaluation reports and the stage logs, as one file: $OUT/results.tgz
  (cd "$RUNS/.." && find "$WORLD" -name log.jsonl -o -name '*.out' -o -name '*.log' | grep -v episodes) > "$OUT/.files"
  tar czf "$OUT/results.tgz" -C "$OUT/.." "$WORLD/eval" -C "$RUNS/.." -T "$OUT/.files" 2>/dev/null || true
  log "packed $(du -h "$OUT/results.tgz" | cut -f1) into $OUT/results.tgz"
}

for phase in "$@"; do
  case $phase in
    data) collect ;;
    base) base ;;
    distill) distill ;;
    cpu_tier) cpu_tier ;;
    cd_on) cd_on ;;
    dmd_on) dmd_on ;;
    scm) chain_scm ;;
    ae_variants) ae_variants ;;
    guidance) chain_guidance ;;
    dmd_g1) stage dmd_scm_g1 dmd "${DMD_SCM_S:-${DMD_S:-120}}" "init.student=$(model causal_scm_g1)" "${DMD[@]}" ${DMD_EXTRA:-} ;;
    evaluate) evaluate ;;
    speed) speed ;;
    pack) pack ;;
    ablate) ablate ;;
    *) echo "unknown phase $phase (data | base | ae_variants | distill | cpu_tier | cd_on | dmd_on | scm | guidance | dmd_g1 | evaluate | speed | pack | ablate)" >&2; exit 2 ;;
  esac
done
