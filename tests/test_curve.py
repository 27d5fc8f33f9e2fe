import json

from train import curve


def report(psnr8: float, swap: float, key: float = 0.9) -> dict:
    rows = {"model (autoregressive)": {"psnr": {"1": 30.0, "8": psnr8, "32": psnr8 - 3}},
            "repeat last frame (autoregressive)": {"psnr": {"1": 25.0, "8": 16.0, "32": 13.0}}}
    return {"fidelity": {"rows": rows},
            "swap_test": {"model": {"pass_fraction": swap}, "repeat last frame": {"pass_fraction": 0.0}},
            "controllability": {"model (autoregressive)": {"key_accuracy": key}, "repeat last frame": {"key_accuracy": 0.8}}}


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def write_run(runs, name, exports, wall, step):
    """A run's log.jsonl: export records {label seconds: (run seconds, step)}, then the wall record."""
    lines = [{"step": 0, "prepare_seconds": 0.0}]
    lines += [{"step": s, "export": f"/x/{name}/exports/model_{label:06d}s.safetensors", "run_seconds": t}
              for label, (t, s) in exports.items()]
    lines.append({"step": step, "wall_seconds": wall})
    (runs / name).mkdir(parents=True)
    (runs / name / "log.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")


def curve_inputs(tmp_path):
    ev, runs = tmp_path / "eval", tmp_path / "runs"
    write_run(runs, "causal_cd", {30: (31.5, 40), 60: (61.0, 90)}, 92.0, 140)
    write_run(runs, "causal_scm", {30: (32.0, 20), 60: (62.5, 45)}, 93.0, 70)
    for name, (psnr, swap) in {"causal_cd_000030s": (14.0, 0.6), "causal_cd_000060s": (15.0, 0.7),
                               "causal_cd_final": (16.0, 0.8), "causal_scm_000030s": (15.5, 0.5),
                               "causal_scm_000060s": (16.5, 0.9), "causal_scm_final": (17.0, 0.9),
                               "ar_teacher": (18.0, 0.95)}.items():
        write(ev / f"curve_{name}" / "report.json", report(psnr, swap))
    return ev, runs


def test_points_take_seconds_and_steps_from_the_run_logs(tmp_path):
    runs, references = curve.points(*curve_inputs(tmp_path))
    assert [(p.seconds, p.step, p.psnr8) for p in runs["causal_cd"]] == [(31.5, 40, 14.0), (61.0, 90, 15.0), (92.0, 140, 16.0)]
    assert [p.swap for p in runs["causal_scm"]] == [0.5, 0.9, 0.9]
    assert references["ar_teacher"] == (18.0, 15.0, 0.95, 0.9)
    assert references["repeat last frame"] == (16.0, 13.0, 0.0, 0.8)


def test_first_reach_and_the_speed_up_line(tmp_path):
    runs, references = curve.points(*curve_inputs(tmp_path))
    assert curve.first_reach(runs["causal_scm"], 16.0) == 62.5
    assert curve.first_reach(runs["causal_scm"], 17.5) is None
    text = curve.markdown(runs, references)
    assert "causal_scm first reached causal_cd's final PSNR@8 (16.00 dB at 92 s) at 62 s (1.5x sooner)" in text


def test_cli_writes_the_table_and_the_plot(tmp_path, capsys):
    ev, runs = curve_inputs(tmp_path)
    assert curve.main([str(ev), "--runs", str(runs), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "curve.png").stat().st_size > 1000
    assert "| causal_scm | 62 | 45 | 16.500 |" in (tmp_path / "out" / "curve.md").read_text()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["curve.md", "curve.png"]


def test_bad_inputs_give_one_line_and_status_2(tmp_path, capsys):
    ev, runs = curve_inputs(tmp_path)
    (runs / "causal_scm" / "log.jsonl").unlink()
    assert curve.main([str(ev), "--runs", str(runs)]) == 2
    assert "log.jsonl is missing" in capsys.readouterr().err
    assert curve.main([str(tmp_path / "nothing"), "--runs", str(runs)]) == 2
    assert "holds no curve_" in capsys.readouterr().err
    write(ev / "curve_causal_cd_000045s" / "report.json", report(1.0, 0.1))
    assert curve.main([str(ev), "--runs", str(runs)]) == 2
    assert "no export of 000045 s" in capsys.readouterr().err
    write(ev / "curve_causal_cd_000045s" / "report.json", {"fidelity": {}})
    assert curve.main([str(ev), "--runs", str(runs)]) == 2
    assert "is not a train.evaluate report" in capsys.readouterr().err
