"""bench/qipo_bc_diagnosis.py's --checkpoints mode and bench/time_to_score.py's report (preset grouping, partial runs)."""
import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import qipo_bc_diagnosis as D  # noqa: E402
from bench import time_to_score as T  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bc_diagnosis_checkpoints_rows(demo_minari_root, tmp_path):
    from qipo_kernels import data

    out = str(tmp_path / "steps.md")
    D.main(["--dataset", data.DEMO_DATASET_ID, "--checkpoints", "3,1", "--batch", "8", "--lrs", "1e-3",
            "--variants", "default,ot-fourier", "--bc-episodes", "1", "--states", "20", "--out", out])
    rows = json.load(open(os.path.splitext(out)[0] + ".json"))["rows"]
    # MLP, then each variant, each measured at every checkpoint in increasing order
    assert [(r[0].split(" ")[0], r[3]) for r in rows] == [("MLP", 1), ("MLP", 3), ("default", 1), ("default", 3),
                                                          ("ot-fourier", 1), ("ot-fourier", 3)]
    for r in rows:
        assert math.isfinite(r[4]) and r[4] <= 1.0           # R^2
        assert 0.0 <= r[5] <= 1.0                             # saturation
        assert math.isfinite(r[7])                            # evaluated BC score
        assert r[9] >= 0.0                                    # CPU seconds so far
        assert 0.0 <= r[10] <= 2.0                            # spread of actions in [-1, 1]
    assert rows[0][9] <= rows[1][9] and rows[2][9] <= rows[3][9]
    assert rows[2][2] == "dpm2 x 8 from t0=0.05" and rows[4][2] == "euler x 10 from t0=0"
    text = open(out).read()
    assert "| spread | BC score |" in text and text.count("\n| ") == 1 + len(rows)  # the header and one line per row
    # --skip-mlp: no MLP rows
    D.main(["--dataset", data.DEMO_DATASET_ID, "--checkpoints", "2", "--batch", "8", "--lrs", "1e-3",
            "--variants", "ot-fourier", "--bc-episodes", "0", "--states", "20", "--skip-mlp", "--out", out])
    rows = json.load(open(os.path.splitext(out)[0] + ".json"))["rows"]
    assert len(rows) == 1 and rows[0][0].startswith("ot-fourier") and math.isnan(rows[0][7])


def test_time_to_score_groups_qipo_by_preset(tmp_path):
    def curve(algo, preset, seed, cmd, score):
        c = {"algo": algo, "dataset": "d/x/v0", "seed": seed, "budget_s": 10, "behaviour_normalized": 30.0,
             "ref": [0.0, 100.0], "command": cmd, "points": []}
        if preset is not None:
            c["preset"] = preset
        c["final"] = {"tag": "final", "step": 5, "cpu_s": 1.0, "normalized": score, "normalized_se": 0.0,
                      "episodes": 2, "per_episode": [score, score]}
        c["points"].append(c["final"])
        return c

    runs = {"qipo-old": curve("qipo", None, 0, "time_to_score.py run --algo qipo", 10.0),  # before presets were recorded
            "qipo-a-s0": curve("qipo", "cpu-30min", 0, "run --algo qipo --preset cpu-30min", 40.0),
            "qipo-a-s1": curve("qipo", "cpu-30min", 1, "run --algo qipo --preset cpu-30min", 50.0),
            "cpql-s0": curve("cpql", None, 0, "run --algo cpql", 70.0),
            "cpql-long-s0": curve("cpql", None, 0, "run --algo cpql --budget-s 40", 90.0)}
    runs["cpql-long-s0"]["budget_s"] = 40
    assert T._label(runs["qipo-old"]) == "qipo cpu-quick"
    assert T._label({"algo": "qipo", "command": "x --preset cpu-30min --seed 1"}) == "qipo cpu-30min"
    assert T._label(runs["cpql-s0"]) == "cpql"
    # a diagnostic run with --set overrides is labelled (and so grouped) apart from its preset
    assert T._label({"algo": "qipo", "preset": "cpu-30min", "set": ["path=ot"]}) == "qipo cpu-30min --set path=ot"
    # and so is a CPQL run with CPQLConfig overrides, in its own folder
    assert T._label({"algo": "cpql", "set": ["lr=0.001"]}) == "cpql --set lr=0.001"
    assert T.run_name("cpql", "cpu-quick", ["lr=0.001"], "qipo/halfcheetah/medium-a2c-v0", 2) == \
        "cpql-lr_0.001-halfcheetah-s2-medium-a2c"
    assert T.run_name("cpql", "cpu-quick", [], "qipo/halfcheetah/medium-a2c-v0", 2) == "cpql-halfcheetah-s2-medium-a2c"
    # a --set the algorithm's config does not have, or a value out of range, is refused by name before the
    # dataset (here: none by that name) is loaded or a folder made
    for algo, kv, msg in (("cpql", "path=ot", "unknown CPQLConfig field 'path'"),
                          ("qipo", "eta=2", "unknown QIPOConfig field 'eta'"),
                          ("cpql", "lr=-1", "lr"), ("qipo", "beta=-1", "beta")):
        with pytest.raises(SystemExit, match=msg):
            T.main(["run", "--algo", algo, "--dataset", "d/halfcheetah/v0", "--set", kv, "--out", str(tmp_path / "no")])
    assert not os.path.exists(tmp_path / "no")
    for name, c in runs.items():
        os.makedirs(tmp_path / name)
        json.dump(c, open(tmp_path / name / "curve.json", "w"))
    T.main(["report", "--out", str(tmp_path)])
    table = open(tmp_path / "README.md").read()
    rows = {ln.split(" | ")[0].lstrip("| "): ln for ln in table.splitlines() if ln.startswith("| ") and "---" not in ln}
    assert " | 2 | " in rows["qipo cpu-30min"] and "45.0 ± " in rows["qipo cpu-30min"]
    assert " | 1 | " in rows["qipo cpu-quick"] and "10.0 ± " in rows["qipo cpu-quick"]
    # the same algorithm and dataset with another budget: a row of its own, named by its budget
    assert "70.0 ± " in rows["cpql (budget 10 s)"] and " | 1 | " in rows["cpql (budget 10 s)"]
    assert "90.0 ± " in rows["cpql (budget 40 s)"] and " | 1 | " in rows["cpql (budget 40 s)"]


def test_time_to_score_report_plots_the_final_scores(tmp_path, monkeypatch):
    """report also draws final_scores.png: per dataset, each finished row's final mean ± s.e. over its final
    episodes, its seeds' means and QIPO's behaviour model, the numbers of the table's row; a run stopped before
    its final evaluation is not drawn."""
    pytest.importorskip("matplotlib")

    def curve(algo, seed, scores, beh=None, final=True):
        f = {"tag": "final", "step": 5, "cpu_s": 1.0, "normalized": sum(scores) / len(scores),
             "normalized_se": 0.0, "episodes": len(scores), "per_episode": list(scores)}
        pts = ([{"tag": "behaviour", "step": 2, "cpu_s": 0.5, "normalized": beh, "normalized_se": 0.0}]
               if beh is not None else [])
        c = {"algo": algo, "dataset": "d/w/v0", "seed": seed, "budget_s": 10, "behaviour_normalized": 30.0,
             "ref": [0.0, 100.0], "command": f"run --algo {algo} --seed {seed}", "points": pts + ([f] if final else [])}
        if algo == "qipo":
            c["preset"] = "cpu-30min"
        if final:
            c["final"] = f
        return c
    runs = {"q0": curve("qipo", 0, [40.0, 44.0], beh=31.0), "q1": curve("qipo", 1, [50.0, 54.0], beh=35.0),
            "c0": curve("cpql", 0, [60.0, 70.0]), "c1": curve("cpql", 1, [1.0], final=False)}
    for name, c in runs.items():
        os.makedirs(tmp_path / name)
        json.dump(c, open(tmp_path / name / "curve.json", "w"))
    seen = []
    plot = T.plot_finals
    monkeypatch.setattr(T, "plot_finals", lambda plt, rows, path: (seen.extend(rows), plot(plt, rows, path)))
    T.main(["report", "--out", str(tmp_path)])
    rows = {r["label"]: r for r in seen}
    assert set(rows) == {"qipo cpu-30min", "cpql"}   # cpql seed 1 has no final evaluation: seed 0's row alone
    q = rows["qipo cpu-30min"]
    assert (q["dataset"], q["data"], q["seed_means"], q["behaviour"]) == ("d/w/v0", 30.0, [42.0, 52.0], 33.0)
    assert q["mean"] == pytest.approx(47.0) and q["se"] == pytest.approx(math.sqrt(116.0 / 3) / 2)
    assert rows["cpql"]["behaviour"] is None and rows["cpql"]["mean"] == pytest.approx(65.0)
    with open(tmp_path / "final_scores.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not any(n.endswith(".tmp.png") for n in os.listdir(tmp_path))


def test_time_to_score_report_never_pools_two_builds_of_a_dataset(tmp_path, capsys):
    """Runs of one command on two builds of one dataset id (rebuilt on another machine: other reference scores
    and data score) are rows of their own, each named by its build and with its own data score; a dataset with
    one build keeps its plain name."""
    def curve(seed, ref_max, data, score, dataset="d/w/v0"):
        ret = 1.0 + score / 100 * (ref_max - 1.0)   # per_episode holds returns
        f = {"tag": "final", "step": 5, "cpu_s": 1.0, "normalized": score, "normalized_se": 0.0, "episodes": 2,
             "per_episode": [ret, ret]}
        return {"algo": "cpql", "dataset": dataset, "seed": seed, "budget_s": 10, "behaviour_normalized": data,
                "ref": [1.0, ref_max], "command": f"run --algo cpql --seed {seed} --dataset {dataset}",
                "points": [f], "final": f}
    runs = {"a0": curve(0, 3894.7, 74.6, 90.0), "a1": curve(1, 3894.7, 74.6, 94.0),
            "b3": curve(3, 3905.5, 73.9, 80.0), "other": curve(0, 50.0, 10.0, 20.0, dataset="d/h/v0")}
    for name, c in runs.items():
        os.makedirs(tmp_path / name)
        json.dump(c, open(tmp_path / name / "curve.json", "w"))
    T.main(["report", "--out", str(tmp_path)])
    rows = {ln.split(" | ")[1]: ln.split(" | ") for ln in open(tmp_path / "README.md").read().splitlines()
            if ln.startswith("| ") and "---" not in ln and "algorithm" not in ln}
    assert set(rows) == {"d/w/v0 (data 74.6, ref max 3894.7)", "d/w/v0 (data 73.9, ref max 3905.5)", "d/h/v0"}
    a, b = rows["d/w/v0 (data 74.6, ref max 3894.7)"], rows["d/w/v0 (data 73.9, ref max 3905.5)"]
    assert (a[2], a[3], a[7].split(" ± ")[0]) == ("74.6", "2", "92.0")
    assert (b[2], b[3], b[7].split(" ± ")[0]) == ("73.9", "1", "80.0")
    # each command says which build it ran on, where there are two
    text = open(tmp_path / "README.md").read()
    assert "    run --algo cpql --seed 3 --dataset d/w/v0   # on d/w/v0 (data 73.9, ref max 3905.5)\n" in text
    assert "    run --algo cpql --seed 0 --dataset d/h/v0\n" in text
    # gain: each run's final minus its own build's data score, pooled over the builds
    capsys.readouterr()
    T.main(["gain", "--out", str(tmp_path), "--dataset", "d/w/v0", "--label", "cpql"])
    out = capsys.readouterr().out
    assert "| 3 | d/w/v0 (data 73.9, ref max 3905.5) | 73.9 | 80.0 | +6.1 |" in out
    assert "| 1 | d/w/v0 (data 74.6, ref max 3894.7) | 74.6 | 94.0 | +19.4 |" in out
    assert "3 runs, 6 final episodes: gain +13.6 ± " in out   # (15.4 + 19.4 + 6.1) / 3, two episodes each
    with pytest.raises(SystemExit, match="no finished run of it on d/w/v0 .* labels there: \\['cpql'\\]"):
        T.main(["gain", "--out", str(tmp_path), "--dataset", "d/w/v0", "--label", "qipo cpu-30min"])
    runs["a1"]["budget_s"] = 40
    json.dump(runs["a1"], open(tmp_path / "a1" / "curve.json", "w"))
    with pytest.raises(SystemExit, match="budgets \\[10.0, 40.0\\]: pick one with --budget-s"):
        T.main(["gain", "--out", str(tmp_path), "--dataset", "d/w/v0", "--label", "cpql"])
    T.main(["gain", "--out", str(tmp_path), "--dataset", "d/w/v0", "--label", "cpql", "--budget-s", "40"])
    assert "1 run, 2 final episodes: gain +19.4 ± 0.0" in capsys.readouterr().out
    runs["a1"]["behaviour_normalized"] = None
    json.dump(runs["a1"], open(tmp_path / "a1" / "curve.json", "w"))
    with pytest.raises(SystemExit, match=r"seeds \[1\] have no data score"):
        T.main(["gain", "--out", str(tmp_path), "--dataset", "d/w/v0", "--label", "cpql", "--budget-s", "40"])


def test_time_to_score_seeds_averages_a_configuration_over_its_seeds_at_shared_steps(tmp_path, capsys):
    """seeds: at each step every run of the configuration evaluated (a step one seed lacks is left out), the
    mean over seeds ± the s.e. of the seeds' scores, mean CPU seconds and the gain over the data; two builds are
    never averaged (--data picks one); --plot writes a PNG through a temporary file."""
    def curve(seed, scores, data=30.0, ref_max=100.0, extra=None):
        pts = [{"tag": "behaviour", "step": 10, "cpu_s": 5.0 + seed, "normalized": scores[0], "normalized_se": 1.0,
                "episodes": 20}]
        pts += [{"tag": "train", "step": 10 * (i + 2), "cpu_s": 10.0 * (i + 2) + seed, "normalized": v,
                 "normalized_se": 1.0, "episodes": 5} for i, v in enumerate(scores[1:-1])]
        pts += [{"tag": "final", "step": 10 * len(scores), "cpu_s": 10.0 * len(scores) + seed,
                 "normalized": scores[-1], "normalized_se": 1.0, "episodes": 30, "per_episode": [0.0]}]
        pts += extra or []
        return {"algo": "qipo", "preset": "cpu-30min", "set": ["path=ot"], "dataset": "d/w/v0", "seed": seed,
                "budget_s": 100, "behaviour_normalized": data, "ref": [0.0, ref_max], "command": "run",
                "points": sorted(pts, key=lambda p: p["step"]), "final": pts[-1 - len(extra or [])]}
    odd = [{"tag": "train", "step": 25, "cpu_s": 26.0, "normalized": 99.0, "normalized_se": 1.0, "episodes": 5}]
    runs = {"s0": curve(0, [20.0, 40.0, 50.0]), "s1": curve(1, [30.0, 44.0, 62.0], extra=odd),
            "s2": curve(2, [40.0, 48.0, 56.0])}
    for name, c in runs.items():
        os.makedirs(tmp_path / name)
        json.dump(c, open(tmp_path / name / "curve.json", "w"))
    args = ["seeds", "--out", str(tmp_path), "--dataset", "d/w/v0", "--label", "qipo cpu-30min --set path=ot"]
    T.main(args + ["--plot", str(tmp_path / "p.png")])
    out = capsys.readouterr().out
    assert "(data 30.0, target 50.0): seeds 0, 1, 2" in out
    assert "| 10 | behaviour | 6 | 30.0 ± 5.8 | 20.0 / 30.0 / 40.0 | +0.0 | 60 |" in out
    assert "| 20 | train | 21 | 44.0 ± 2.3 | 40.0 / 44.0 / 48.0 | +14.0 | 15 |" in out
    assert "| 30 | final | 31 | 56.0 ± 3.5 | 50.0 / 62.0 / 56.0 | +26.0 | 90 |" in out
    assert "| 25 |" not in out   # seed 1 alone evaluated there
    with open(tmp_path / "p.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not any(n.endswith(".tmp.png") for n in os.listdir(tmp_path))
    os.makedirs(tmp_path / "r3")   # the same command on a rebuilt dataset
    json.dump(curve(3, [10.0, 10.0, 10.0], data=29.0, ref_max=101.0), open(tmp_path / "r3" / "curve.json", "w"))
    with pytest.raises(SystemExit, match=r"on 2 builds of it \(data scores \[29.0, 30.0\]\): pick one with --data"):
        T.main(args)
    T.main(args + ["--data", "29"])
    assert "| 30 | final | 33 | 10.0 ± nan | 10.0 | -19.0 | 30 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"--data 31: .* data scores \[29.0, 30.0\]"):
        T.main(args + ["--data", "31"])
    with pytest.raises(SystemExit, match="no finished run of it"):
        T.main(["seeds", "--out", str(tmp_path), "--dataset", "d/w/v0", "--label", "cpql"])


def test_time_to_score_collect_copies_finished_runs_and_never_overwrites(tmp_path, capsys):
    """collect: a finished run goes to <to>/<run>; the same run already there is left as it is, even when its
    results copy differs (reeval rewrote it); a run of the same name on another build of the dataset goes to
    <run>-rebuilt, then -rebuilt2; a longer budget of a run goes beside it (<run>-<budget>s); an unfinished run
    is named and skipped; an empty --from is refused."""
    def curve(ref_max, data, score, final=True):
        f = {"tag": "final", "step": 5, "cpu_s": 1.0, "normalized": score, "normalized_se": 0.0, "episodes": 1,
             "per_episode": [score]}
        c = {"algo": "cpql", "dataset": "d/w/v0", "seed": 0, "budget_s": 10, "behaviour_normalized": data,
             "ref": [0.0, ref_max], "command": "run --algo cpql --seed 0 --dataset d/w/v0", "points": [f]}
        return dict(c, final=f) if final else c
    src, to = tmp_path / "out", tmp_path / "results"

    def put(name, c):
        os.makedirs(src / name, exist_ok=True)
        json.dump(c, open(src / name / "curve.json", "w"))
    with pytest.raises(SystemExit, match="no runs in"):
        T.main(["collect", "--from", str(src), "--to", str(to)])
    put("cpql-s0", curve(100.0, 50.0, 70.0))
    put("cpql-s1", curve(100.0, 50.0, 60.0, final=False))
    T.main(["collect", "--from", str(src), "--to", str(to)])
    out = capsys.readouterr().out
    assert json.load(open(to / "cpql-s0" / "curve.json")) == curve(100.0, 50.0, 70.0)
    assert "cpql-s1: not finished" in out and not (to / "cpql-s1").exists()
    # the results copy re-evaluated in place: collect again leaves it
    kept = dict(curve(100.0, 50.0, 70.0), reeval_commands=["reeval ..."])
    json.dump(kept, open(to / "cpql-s0" / "curve.json", "w"))
    T.main(["collect", "--from", str(src), "--to", str(to)])
    assert "left as it is" in capsys.readouterr().out
    assert json.load(open(to / "cpql-s0" / "curve.json")) == kept
    # the same run name on a rebuilt dataset (other reference max and data score), twice
    put("cpql-s0", curve(101.0, 51.0, 71.0))
    T.main(["collect", "--from", str(src), "--to", str(to)])
    put("cpql-s0", curve(102.0, 52.0, 72.0))
    T.main(["collect", "--from", str(src), "--to", str(to)])
    assert json.load(open(to / "cpql-s0" / "curve.json")) == kept
    assert json.load(open(to / "cpql-s0-rebuilt" / "curve.json"))["ref"] == [0.0, 101.0]
    assert json.load(open(to / "cpql-s0-rebuilt2" / "curve.json"))["ref"] == [0.0, 102.0]
    T.main(["collect", "--from", str(src), "--to", str(to)])
    assert "already in" in capsys.readouterr().out and sorted(os.listdir(to)) == ["cpql-s0", "cpql-s0-rebuilt",
                                                                                   "cpql-s0-rebuilt2"]
    # a run continued to a larger budget (--resume) goes beside the shorter one, on its build
    put("cpql-s0", dict(curve(101.0, 51.0, 75.0), budget_s=40))
    T.main(["collect", "--from", str(src), "--to", str(to)])
    assert json.load(open(to / "cpql-s0-rebuilt-40s" / "curve.json"))["final"]["normalized"] == 75.0
    assert json.load(open(to / "cpql-s0-rebuilt" / "curve.json"))["final"]["normalized"] == 71.0


def test_time_to_score_collect_knows_a_runs_older_folder_name(tmp_path, capsys):
    """A run kept under its folder's older name (without the dataset's kind) holds that run's first build: a
    rebuilt run goes to <run>-rebuilt, the same build is found there; an older-named folder of another dataset
    of the env is not that run."""
    def curve(dataset, ref_max, score):
        f = {"tag": "final", "step": 5, "cpu_s": 1.0, "normalized": score, "normalized_se": 0.0, "episodes": 1}
        return {"algo": "cpql", "dataset": dataset, "seed": 0, "budget_s": 10, "behaviour_normalized": 30.0,
                "ref": [0.0, ref_max], "command": "run", "points": [f], "final": f}
    src, to = tmp_path / "out", tmp_path / "results"
    ns, med = "q/walker2d/noisy-sac-v0", "q/walker2d/medium-ppo-v0"
    assert T.run_name("cpql", None, [], ns, 0) == "cpql-walker2d-s0-noisy-sac"
    os.makedirs(to / "cpql-walker2d-s0")
    json.dump(curve(ns, 100.0, 70.0), open(to / "cpql-walker2d-s0" / "curve.json", "w"))
    for name, c in (("cpql-walker2d-s0-noisy-sac", curve(ns, 101.0, 71.0)),
                    ("cpql-walker2d-s0-medium-ppo", curve(med, 100.0, 60.0))):
        os.makedirs(src / name)
        json.dump(c, open(src / name / "curve.json", "w"))
    T.main(["collect", "--from", str(src), "--to", str(to)])
    assert json.load(open(to / "cpql-walker2d-s0-noisy-sac-rebuilt" / "curve.json"))["ref"] == [0.0, 101.0]
    assert json.load(open(to / "cpql-walker2d-s0-medium-ppo" / "curve.json"))["dataset"] == med
    assert json.load(open(to / "cpql-walker2d-s0" / "curve.json"))["ref"] == [0.0, 100.0]
    assert not (to / "cpql-walker2d-s0-noisy-sac").exists()
    capsys.readouterr()
    json.dump(curve(ns, 100.0, 70.0), open(src / "cpql-walker2d-s0-noisy-sac" / "curve.json", "w"))
    T.main(["collect", "--from", str(src), "--to", str(to)])
    assert f"already in {to / 'cpql-walker2d-s0' / 'curve.json'} (identical)" in capsys.readouterr().out
    assert not (to / "cpql-walker2d-s0-noisy-sac").exists()


def test_time_to_score_report_points_reeval_at_the_folder_the_run_command_makes(tmp_path):
    """A reeval line recorded with a run folder of an older naming is shown with the checkpoint path the run
    command listed above it creates today; a command that does not parse is shown as recorded."""
    old = "bench/time_to_score.py reeval --curve c.json --ckpt /data/tts/qipo-walker2d-s1/run/checkpoint.pt --episodes 30"
    c = {"command": "bench/time_to_score.py run --algo qipo --preset cpu-30min --set path=ot "
                    "--dataset qipo/walker2d/noisy-sac-v0 --seed 1 --out /data/tts",
         "reeval_commands": [old]}
    assert T._reeval_lines(c) == [old.replace("qipo-walker2d-s1", "qipo-cpu-30min-path_ot-walker2d-s1-noisy-sac")]
    c["command"] = "bench/time_to_score.py run --algo nope --dataset x"  # argparse refuses: kept as recorded
    assert T._reeval_lines(c) == [old]
    assert T._reeval_lines({"command": "x"}) == []


def test_time_to_score_partial_runs_show_the_behaviour_model_only_from_stage_1(tmp_path):
    """A run stopped before its final evaluation: the "QIPO behaviour model" column shows the evaluation
    tagged "behaviour" (end of stage 1) or "-", never the last training evaluation."""
    def pt(tag, step, score):
        return {"tag": tag, "step": step, "cpu_s": float(step), "normalized": score, "normalized_se": 1.0,
                "episodes": 2}

    def curve(algo, dataset, points):
        return {"algo": algo, "preset": "cpu-30min" if algo == "qipo" else None, "dataset": dataset, "seed": 0,
                "budget_s": 10, "behaviour_normalized": 30.0, "ref": [0.0, 100.0], "command": f"run {dataset}",
                "points": points}

    runs = {"after-stage-1": curve("qipo", "d/a/v0", [pt("train", 100, 21.5), pt("behaviour", 200, 44.4),
                                                      pt("train", 300, 12.3)]),
            "in-stage-1": curve("qipo", "d/b/v0", [pt("train", 100, 17.7)]),
            "cpql": curve("cpql", "d/c/v0", [pt("train", 100, 33.3)]),
            "no-points": curve("qipo", "d/a/v0", [])}
    for name, c in runs.items():
        os.makedirs(tmp_path / name)
        json.dump(c, open(tmp_path / name / "curve.json", "w"))
    T.main(["report", "--out", str(tmp_path)])
    rows = [ln.split(" | ") for ln in open(tmp_path / "README.md").read().splitlines()
            if ln.startswith("| ") and "---" not in ln and "algorithm" not in ln]
    by_ds = {r[1]: r for r in rows}
    assert len(rows) == 3  # the run without any evaluation has no row
    # columns: algorithm, dataset, behaviour (data), seeds, steps, CPU-s, QIPO behaviour model, final, final episodes per seed, best
    assert by_ds["d/a/v0"][4:7] == ["300", "300", "44.4 (at 200 CPU-s)"]
    assert by_ds["d/b/v0"][4:7] == ["100", "100", "-"]
    assert by_ds["d/c/v0"][6] == "-"
    for r in rows:
        assert "(train)" not in " | ".join(r) and r[7].startswith("not reached")
    assert not os.path.exists(tmp_path / "final_scores.png")   # no finished run: nothing to draw
    assert by_ds["d/a/v0"][8] == "-" and by_ds["d/a/v0"][9] == "44.4 (so far) |" and by_ds["d/b/v0"][9] == "17.7 (so far) |"


def test_stage3_diagnosis_variants_with_renewal_period_and_foreign_critic(demo_minari_root, tmp_path, monkeypatch):
    """bench/qipo_stage3_diagnosis.py on a tiny finished QIPO run: a sharper-beta variant with --renew-every
    (renewals only at that period) and --critic-from (here the run's own checkpoint: the same critic); a
    variant's points reach the result files at every evaluation, before the variant ends."""
    from bench import qipo_stage3_diagnosis as S3
    from qipo_kernels import data
    from qipo_kernels.algos.qipo import QIPO
    from tests.conftest import tiny_qipo_config

    run = tmp_path / "run"
    QIPO(data.load_minari(data.DEMO_DATASET_ID), tiny_qipo_config(), out_dir=str(run), progress_bar=False).fit()
    ck, out = str(run / "checkpoint.pt"), str(tmp_path / "diag")
    written, write = [], S3.write
    monkeypatch.setattr(S3, "write", lambda res, o: (written.append(json.loads(json.dumps(res))), write(res, o)))
    S3.main(["--ckpt", ck, "--critic-from", ck, "--steps", "7", "--renew-every", "3", "--eval-at", "3", "7",
             "--episodes", "1", "--variants", "beta10_b512", "beta10_lr1e-3", "--skip-checks", "--cache", "", "--out", out])
    res = json.load(open(out + ".json"))
    assert res["renew_every"] == 3 and res["critic_from"]["algo"] == "qipo"
    assert [r["variant"] for r in res["variants"]] == ["beta10_b512", "beta10_lr1e-3"]
    for r in res["variants"]:
        assert [x["step"] for x in r["renewals"]] == [3, 6]             # every 3 steps, not the run's 5
        assert [p["step"] for p in r["points"]] == [3, 7] and all(math.isfinite(p["normalized"]) for p in r["points"])
    assert r["settings"] == {"beta": 10.0, "lr": 1e-3}
    assert "renewal every 3 steps" in open(out + ".md").read() and "(running)" not in open(out + ".md").read()
    partial = [w["variants"][-1] for w in written if w["variants"] and w["variants"][-1].get("partial")]
    assert [(r["variant"], [p["step"] for p in r["points"]]) for r in partial] == [("beta10_b512", [3]),
                                                                                    ("beta10_lr1e-3", [3])]
    assert not any(r.get("partial") for r in res["variants"])
    res["variants"][0]["stopped_at"] = 3           # a variant stopped by hand after its step-3 evaluation
    S3.write(res, out)
    assert "| beta10_b512 (stopped after step 3) |" in open(out + ".md").read()
    with pytest.raises(SystemExit, match="--renew-every must be >= 1"):
        S3.main(["--ckpt", ck, "--renew-every", "0", "--out", out])



def test_stage3_diagnosis_sample_steps_reach_every_sampler_and_key_the_support_cache(demo_minari_root, tmp_path,
                                                                                      monkeypatch):
    """--sample-steps sets the solver steps of the supports, renewals and evaluation, and a support cached
    with other sampler steps is drawn again, not reused."""
    from bench import qipo_stage3_diagnosis as S3
    from qipo_kernels import data
    from qipo_kernels.algos.qipo import QIPO
    from tests.conftest import tiny_qipo_config

    run = tmp_path / "run"
    cfg = tiny_qipo_config()
    QIPO(data.load_minari(data.DEMO_DATASET_ID), cfg, out_dir=str(run), progress_bar=False).fit()
    ck, out, cache = str(run / "checkpoint.pt"), str(tmp_path / "diag"), str(tmp_path / "sup.pt")
    base = ["--ckpt", ck, "--steps", "2", "--eval-at", "2", "--episodes", "1", "--variants", "uniform",
            "--skip-checks", "--cache", cache, "--out", out]
    S3.main(base)
    first = json.load(open(out + ".json"))
    assert first["sample_steps"] == cfg.sample_steps and not first["support_cached"]
    import torch

    from qipo_kernels.policies import FlowPolicy

    steps_seen, orig = [], FlowPolicy.sample

    def spy(self, *args, **kw):
        steps_seen.append(kw.get("steps") or self.steps)
        return orig(self, *args, **kw)
    with monkeypatch.context() as m:
        m.setattr(FlowPolicy, "sample", spy)
        S3.main(base[:-2] + ["--sample-steps", str(cfg.sample_steps + 3), "--out", out])
    second = json.load(open(out + ".json"))
    assert second["sample_steps"] == cfg.sample_steps + 3 and not second["support_cached"]   # redrawn
    assert steps_seen and set(steps_seen) == {cfg.sample_steps + 3}
    assert torch.load(cache)["sample_steps"] == cfg.sample_steps + 3
    S3.main(base[:-2] + ["--sample-steps", str(cfg.sample_steps + 3), "--out", out])
    again = json.load(open(out + ".json"))
    assert again["support_cached"]                                                          # same steps: reused
    # argmax_bc: flow matching on each state's highest-Q support action, no renewal
    S3.main(base[:-6] + ["argmax_bc", "--skip-checks", "--cache", cache, "--renew-every", "1", "--out", out])
    (r,) = json.load(open(out + ".json"))["variants"]
    assert r["variant"] == "argmax_bc" and r["renewals"] == [] and math.isfinite(r["points"][0]["normalized"])
    # sampled_beta3: one support action per state drawn by its weight; renewals as the trainer does them
    S3.main(base[:-6] + ["sampled_beta3", "--skip-checks", "--cache", cache, "--renew-every", "1", "--out", out])
    (r,) = json.load(open(out + ".json"))["variants"]
    assert [x["step"] for x in r["renewals"]] == [1] and math.isfinite(r["points"][0]["normalized"])
    with pytest.raises(SystemExit, match="--sample-steps must be >= 1"):
        S3.main(base[:-2] + ["--sample-steps", "0", "--out", out])

class _FixedSampler:
    """A stand-in policy for bench/qipo_saturation.measure: every sample is ``value`` (before the clip) with
    the sign of its coordinate's data action, whatever the noise."""
    solver = "dpm2"

    def __init__(self, value, signs):
        self.steps, self.value, self.signs, self.calls = 3, value, signs, []

    def sample(self, obs, K, steps=None, noise=None, clip=True):
        self.calls.append(steps)
        x = (self.value * self.signs)[:, None, :].expand(obs.shape[0], K, -1).clone()
        return x.clamp(-1, 1) if clip else x


def test_saturation_profile_counts_bounds_overshoot_and_position_at_the_datas_bounds():
    import torch

    from bench import qipo_saturation as Q

    act = torch.tensor([[1.0, -1.0, 0.5], [-1.0, 0.2, 0.9995], [0.0, 1.0, -0.95]] * 6)[:17]   # 17 states
    obs = torch.zeros(17, 4)
    assert Q.profile(act) == {"0.9": round(float((act.abs() >= 0.9).float().mean()), 4),
                              "0.95": round(float((act.abs() >= 0.95).float().mean()), 4),
                              "0.99": round(float((act.abs() >= 0.99).float().mean()), 4),
                              "0.999": round(float((act.abs() >= 0.999).float().mean()), 4)}
    signs = torch.where(act >= 0, 1.0, -1.0)
    over = _FixedSampler(1.5, signs)                      # every sample past the bound: all clipped to it
    m = Q.measure(over, obs, act, K=6, factors=[1, 4], score_fn=lambda pol: {"steps_seen": pol.steps})
    assert over.calls == [3, 12] and over.steps == 3      # the step factors, and the policy's steps restored
    r = m["rows"][0]
    assert r["beyond_1"] == 1.0 and r["profile"]["0.999"] == 1.0 and r["at_bound_mean"] == 1.0
    assert r["at_bound_within_0.01"] == 1.0 and [x["score"]["steps_seen"] for x in m["rows"]] == [3, 12]
    inside = _FixedSampler(0.995, signs)                  # just inside: within 0.01 of the bound, never at it
    r = Q.measure(inside, obs, act, K=6, factors=[1])["rows"][0]
    assert r["beyond_1"] == 0.0 and r["profile"]["0.999"] == 0.0 and r["profile"]["0.99"] == 1.0
    assert r["at_bound_mean"] == 0.995 and r["at_bound_within_0.01"] == 1.0
    assert m["data_at_bound"] == round(float((act.abs() >= 0.999).float().mean()), 4)


def test_saturation_script_on_a_tiny_run(demo_minari_root, tmp_path):
    from bench import qipo_saturation as Q
    from qipo_kernels import data
    from qipo_kernels.algos.qipo import QIPO
    from tests.conftest import tiny_qipo_config

    run = tmp_path / "run"
    QIPO(data.load_minari(data.DEMO_DATASET_ID), tiny_qipo_config(), out_dir=str(run), progress_bar=False).fit()
    out = str(tmp_path / "sat")
    Q.main(["--ckpts", str(run / "checkpoint.pt"), "--states", "17", "--samples", "6", "--step-factors", "1", "2",
            "--episodes", "1", "--models", "behaviour", "ema", "--out", out])
    res = json.load(open(out + ".json"))
    r, e = res["runs"]
    assert (r["model"], e["model"]) == ("behaviour", "ema") and "final EMA policy" in e["label"]
    base = tiny_qipo_config().sample_steps
    assert [x["steps"] for x in r["measure"]["rows"]] == [base, 2 * base]
    assert all(math.isfinite(x["score"]["normalized"]) for x in r["measure"]["rows"] + e["measure"]["rows"])
    assert "| data |" in open(out + ".md").read()
    # a run that stopped before stage 3 has no trained EMA policy to measure
    early = tmp_path / "early"
    QIPO(data.load_minari(data.DEMO_DATASET_ID), tiny_qipo_config(policy_steps=0), out_dir=str(early),
         progress_bar=False).fit()
    with pytest.raises(SystemExit, match="--models ema: .* before stage 3"):
        Q.main(["--ckpts", str(early / "checkpoint.pt"), "--models", "ema", "--states", "5", "--out", out])
    for bad, msg in ((["--states", "0"], "--states must be >= 1"), (["--episodes", "-1"], "--episodes must be >= 0"),
                     (["--step-factors", "0"], "--step-factors must be >= 1")):
        with pytest.raises(SystemExit, match=msg):
            Q.main(["--ckpts", str(run / "checkpoint.pt"), *bad, "--out", out])
    with pytest.raises(SystemExit, match="--ckpts: no such file"):
        Q.main(["--ckpts", str(tmp_path / "nope.pt"), "--out", out])


def _null_every_se(x):
    """A copy of a result with every "se" set to None, as a one-episode evaluation reads after a JSON round trip."""
    if isinstance(x, dict):
        return {k: (None if k == "se" else _null_every_se(v)) for k, v in x.items()}
    if isinstance(x, list):
        return [_null_every_se(v) for v in x]
    return x


@pytest.mark.parametrize("module,writer,result", [
    ("qipo_critic_budget", "write_md", "qipo_critic_budget.json"),
    ("qipo_noise_scale", "write_md", "qipo_noise_scale_halfcheetah.json"),
    ("qipo_saturation", "write", "qipo_saturation.json"),
    ("qipo_stage3_diagnosis", "write", "qipo_stage3_diagnosis.json"),     # with the --only-compare table
])
def test_reports_rewrite_from_json_with_one_episode_evaluations(module, writer, result, tmp_path):
    """Every report of the diagnosis scripts can be rewritten from its committed JSON when an evaluation
    had one episode (s.e. null): "mean ± -" instead of a TypeError or "nan"."""
    import importlib

    from bench._common import pm, score_text

    mod = importlib.import_module(f"bench.{module}")
    res = _null_every_se(json.load(open(os.path.join(ROOT, "bench", "results", result))))
    out = str(tmp_path / "report")
    getattr(mod, writer)(res, out)
    md = open(out + ".md").read()
    assert "± -" in md and "nan" not in md.replace("nanoseconds", "")
    assert pm(1.25, None) == pm(1.25, float("nan")) == "1.2 ± -" and pm(-3.0, 0.26) == "-3.0 ± 0.3"
    assert score_text({"normalized": 40.04, "se": 1.46}) == "40.0 ± 1.5"


class _ConstModel:
    """A stand-in behaviour model for bench/qipo_closed_loop: every sample is ``value`` ([-1, 1] units)."""

    def __init__(self, value):
        self.value = value

    def sample(self, obs, K, generator=None):
        import torch

        return torch.full((obs.shape[0], K, 1), float(self.value))


class _CountingAgent:
    """A stand-in agent (raw obs -> env action): its k-th call since reset() returns ``start + step * k``."""

    def __init__(self, start, step):
        self.start, self.step, self.k, self.resets = start, step, 0, 0

    def reset(self):
        self.k, self.resets = 0, self.resets + 1

    def __call__(self, obs):
        a = self.start + self.step * self.k
        self.k += 1
        return [a]


def test_closed_loop_driver_errors_falls_and_actions(demo_minari_root, monkeypatch):
    import numpy as np

    from bench import qipo_closed_loop as CL
    from qipo_kernels import data

    ds = data.load_minari(data.DEMO_DATASET_ID)          # Pendulum: actions in [-2, 2], 200 steps, never falls
    half = float(ds.info._act_half[0])
    # the data driver acts as the agent, the model driver with its first sample, both on the same reset seeds:
    # a constant model and an agent giving that model's action in env units are the same controller
    c = 0.3
    agent = CL.Probe(lambda o: [0.0], _ConstModel(c), ds.info, "model", 1, 0)
    assert np.allclose(agent(np.zeros(3)), ds.info.to_env_action(np.array([c])))
    m = CL.run_driver(lambda o: ds.info.to_env_action(np.array([c])), _ConstModel(c), ds, "model", 2, 0.0, 3, 50)
    d = CL.run_driver(lambda o: ds.info.to_env_action(np.array([c])), _ConstModel(c), ds, "data", 2, 0.0, 3, 50)
    assert m["normalized"] == d["normalized"] and m["steps"] == d["steps"] == 400 and m["falls"] == 0
    assert m["error"] < 1e-6 and m["spread"] == 0.0 and m["error_before_fall"] != m["error_before_fall"]  # nan
    # errors: the model's mean minus the agent's action in [-1, 1] units, rms over steps
    a = CL.run_driver(_CountingAgent(-1.0, 0.001), _ConstModel(c), ds, "data", 1, 0.0, 2, 50)
    want = c - (-1.0 + 0.001 * np.arange(200)) / half
    assert abs(a["error"] - float(np.sqrt(np.mean(want ** 2)))) < 1e-6  # the model samples float32
    # falls: the error over the last --tail steps of the episodes that terminated, all steps of the others
    lengths = {0: 7, 1: 5, 2: 9}

    def fake_rollout(env, policy, seed, rng, noise):
        policy.reset()
        for _ in range(lengths[seed]):
            policy(np.zeros(3))
        T = lengths[seed]
        return None, None, np.ones(T), np.array([False] * (T - 1) + [seed != 1]), np.zeros(T, bool)

    monkeypatch.setattr(CL, "rollout_episode", fake_rollout)
    ag = _CountingAgent(0.0, 0.1)
    r = CL.run_driver(ag, _ConstModel(0.0), ds, "data", 3, 0.0, 2, 3)
    err = lambda T: -(0.1 * np.arange(T)) / half  # noqa: E731
    assert r["falls"] == 2 and ag.resets == 3 and r["steps"] == 21
    assert abs(r["error_before_fall"] - float(np.sqrt(np.mean(np.r_[err(7)[-3:], err(9)[-3:]] ** 2)))) < 1e-9
    assert abs(r["error_no_fall"] - float(np.sqrt(np.mean(err(5) ** 2)))) < 1e-9
    with pytest.raises(ValueError, match="driver must be one of"):
        CL.Probe(ag, _ConstModel(0.0), ds.info, "expert", 2, 0)


def test_closed_loop_script_on_a_tiny_run(demo_minari_root, tmp_path):
    import torch

    from bench import qipo_closed_loop as CL
    from qipo_kernels import data
    from qipo_kernels.algos.qipo import QIPO
    from tests.conftest import tiny_qipo_config

    run = tmp_path / "run"
    QIPO(data.load_minari(data.DEMO_DATASET_ID), tiny_qipo_config(policy_steps=0), out_dir=str(run),
         progress_bar=False).fit()
    out = str(tmp_path / "cl")
    CL.main(["--ckpts", str(run / "checkpoint.pt"), "--episodes", "2", "--samples", "3", "--out", out],
            agent=lambda o: [0.5])
    res = json.load(open(out + ".json"))
    (r,) = res["runs"]
    assert [d["driver"] for d in r["drivers"]] == ["data", "model"] and "stage 1 12 steps" in r["label"]
    for d in r["drivers"]:
        assert d["steps"] == 400 and d["falls"] == 0 and 0.0 < d["error"] < 2.0 and 0.0 <= d["spread"] <= 1.0
    text = open(out + ".md").read()
    assert text.count("\n| qipo") == 2 and "| error before a fall |" in text
    for bad, msg in ((["--episodes", "0"], "--episodes must be >= 1"), (["--noise", "-1"], "--noise must be >= 0")):
        with pytest.raises(SystemExit, match=msg):
            CL.main(["--ckpts", str(run / "checkpoint.pt"), *bad, "--out", out], agent=lambda o: [0.5])
    with pytest.raises(SystemExit, match="--agent: the SB3 agent zip"):
        CL.main(["--ckpts", str(run / "checkpoint.pt"), "--out", out])
    with pytest.raises(SystemExit, match="--ckpts: no such file"):
        CL.main(["--ckpts", str(tmp_path / "nope.pt"), "--out", out], agent=lambda o: [0.5])
    other = tmp_path / "other.pt"                     # a run on another dataset: refused, by name
    ck = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=False)
    ck["dataset_id"] = "qipo/other/x-v0"
    torch.save(ck, other)
    with pytest.raises(SystemExit, match="one agent made one dataset"):
        CL.main(["--ckpts", str(run / "checkpoint.pt"), str(other), "--episodes", "1", "--drivers", "data",
                 "--out", out], agent=lambda o: [0.5])
