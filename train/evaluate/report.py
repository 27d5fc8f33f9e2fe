"""The report: ``report.json`` (plain numbers), ``report.md`` (one table per measure) and the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

from train.evaluate.plots import plots


def plain(value):
    """JSON-safe copy: non-finite floats become the strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def fmt(value, digits: int = 3) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return "/".join(fmt(v, 1) for v in value)
    if not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.3g}"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines)


CONTROL_COLUMNS = ("key_accuracy", "key_exact", "mouse_error", "yaw_error_deg", "pitch_error_deg",
                   "rotation_error_deg", "translation_error")


def stability_table(stability: dict) -> str:
    """The table of a stability report (:func:`train.evaluate.measures.stability_report`): one row per window."""
    rows = []
    for w in stability["windows"]:
        fr, fs, c = w.get("frechet", {}), w["frames_stats"], w["controllability"]
        rows.append([f"{w['frames'][0]}-{w['frames'][1] - 1}", fr.get("model", "n/a"), fr.get("repeat_last_frame", "n/a"),
                     fr.get("ground_truth_reference", "n/a"), fs["model"]["sharpness"], fs["ground_truth"]["sharpness"],
                     fs["model"]["colour_mean"], fs["ground_truth"]["colour_mean"], c["model"]["key_accuracy"],
                     c["ground_truth"]["key_accuracy"], c["model"]["yaw_error_deg"], c["ground_truth"]["yaw_error_deg"]])
    return table(["frames", "FD model", "FD repeat", "FD GT ref", "sharp model", "sharp GT", "RGB mean model",
                  "RGB mean GT", "keys model", "keys GT", "yaw err model", "yaw err GT"], rows)


def markdown(report: dict, title: str) -> str:
    """The readable report: one table per measure."""
    fid, horizons = report["fidelity"], report["fidelity"]["horizons"]
    out = [f"# Evaluation: {title}", ""]
    s = report["settings"]
    out += [
        f"World `{s['world']}`, {s['clips']} held-out clips of {s['horizon']} steps, {s['long_clips']} long "
        f"rollouts of {s['long_frames']} frames, seed {s['seed']}, device `{s['device']}`.",
        "",
    ]
    if "checkpoint" in report:
        ck, sampler = report["checkpoint"], report["checkpoint"]["sampler"]
        out += [f"Checkpoint of stage `{ck['stage']}`, sampled with {sampler.get('solver', 'renoise')} over "
                f"{len(sampler['steps'])} noise levels, guidance {sampler.get('guidance', 1.0)}, context noise "
                f"{sampler.get('context_noise', 0.0)}."]
        if "kv_cache" in ck:
            out[-1] += f" KV cache: {ck['kv_cache']['sink_frames']} sink frames and a window of {ck['kv_cache']['window_frames']}."
        out += [""]
    out += ["## Fidelity at frame h (PSNR in dB of the mean MSE over clips; mean SSIM)", ""]
    header = ["run"] + [f"PSNR@{h}" for h in horizons] + [f"SSIM@{h}" for h in horizons]
    rows = [[name] + [r["psnr"][str(h)] for h in horizons] + [r["ssim"][str(h)] for h in horizons]
            for name, r in fid["rows"].items()]
    out += [table(header, rows), "", "![fidelity](fidelity.png)", ""]
    out += ["## Controllability (inverse-dynamics model; errors are mean absolute, translation in world units)", ""]
    idm_heldout = report["idm"].get("accuracy", {}).get("heldout")
    if idm_heldout:
        out += [f"The IDM ({report['idm']['world']}, {report['idm']['frame_size'][0]}x{report['idm']['frame_size'][1]}) "
                f"scored key accuracy {fmt(idm_heldout['key_accuracy'])}, yaw error {fmt(idm_heldout['yaw_error_deg'])} deg, "
                f"translation error {fmt(idm_heldout['translation_error'])} on its own held-out episodes.", ""]
    out += [table(["frames"] + list(CONTROL_COLUMNS),
                  [[name] + [r[c] for c in CONTROL_COLUMNS] for name, r in report["controllability"].items()]), ""]
    out += ["## Swap test (rollout under own actions closer to ground truth than under another clip's)", ""]
    swap = report["swap_test"]
    within = list(next(iter(swap.values()))["by_horizon"])
    out += [table(["run", "pass fraction", "95% interval", *(f"over frames 1-{h}" for h in within), "MSE own", "MSE swapped"],
                  [[n, r["pass_fraction"], "{:.2f}-{:.2f}".format(*r["pass_interval_95"]),
                    *(r["by_horizon"][h] for h in within), r["mse_own"], r["mse_swapped"]] for n, r in swap.items()]), ""]
    st = report["stability"]
    out += [f"## Stability (windows of {st['window']} frames; sharpness and colour in 0..255 units)", ""]
    sheets = report.get("sheets")
    picks = "" if sheets is None else ", ".join(str(t) for t in sheets["frames"])
    out += [stability_table(st), "", "![stability](stability.png)", ""]
    if sheets:
        out += [f"Each long clip, truth above model, at frames {picks}:", "", f"![long rollouts]({sheets['long']})", ""]
    if "gaze_stability" in report:
        out += [f"## Stability while looking up and down (the long rollouts' worlds, played by the "
                f"`{report['protocol']['gaze_policy']}` policy)", "", stability_table(report["gaze_stability"]), ""]
        if sheets:
            out += [f"Truth above model, at frames {picks}:", "", f"![gaze rollouts]({sheets['gaze']})", ""]
    if "autoencoder" in report:
        ae = report["autoencoder"]
        out += ["## Autoencoder (the held-out clips' frames, encoded and decoded)", ""]
        row = [ae[k] for k in ("frames", "psnr", "ssim", "sharpness", "sharpness_truth", "sharpness_ratio")]
        out += [table(["frames", "PSNR", "SSIM", "sharpness", "sharpness GT", "ratio"], [row]), ""]
        if "sheet" in ae:
            out += ["Held-out start frames (top), their reconstructions, then both centres at 2x:", "",
                    f"![autoencoder]({ae['sheet']})", ""]
    if "speed" in report:
        sp = report["speed"]
        out += [f"## Speed (batch 1, {sp['dtype']}, worldmodel.bench)", ""]
        out += [table(["first frame ms", "step latency ms (median)", "FPS (step + cache write)"],
                      [[sp["first_frame_ms"], sp["latency_ms"], sp["fps"]]]), ""]
    if report["notes"]:
        out += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(out) + "\n"


def write_report(report: dict, out_dir: Path, title: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {**report, "plots": plots(report, out_dir)}
    (out_dir / "report.json").write_text(json.dumps(plain(report), indent=1) + "\n")
    (out_dir / "report.md").write_text(markdown(report, title))
