"""bench/speed_accuracy_env.py on tiny settings: training (a few steps), every measurement, the report."""
import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import speed_accuracy_env as E  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(
    qipo=dict(pretrain_steps=6, q_steps=6, policy_steps=6, renew_every=6, q_support_refresh=6, q_support=2,
              num_support=2, sample_steps=1, eval_episodes=1, checkpoint_every=0, tensorboard=False, hidden=16,
              critic_hidden=16, pretrain_batch=32, q_batch=32, policy_batch=32, renew_chunk=512),
    cpql=dict(steps=6, step_start_ema=2, eval_episodes=1, eval_candidates=2, checkpoint_every=0, tensorboard=False,
              hidden=16, critic_hidden=16, batch=32),
)


@pytest.fixture(scope="module")
def study(demo_minari_root, tmp_path_factory):
    runs = str(tmp_path_factory.mktemp("sa_env_runs"))
    res = E.run_study(runs, quick=True, episodes=1, steps=(1, 2), solvers=("euler", "rk4"), n_states=16,
                      candidates=3, time_budget=0.0, overrides=TINY, verbose=False)
    return runs, res


def _finite(x):
    return isinstance(x, float) and math.isfinite(x)


def test_structure_and_finite(study):
    _, res = study
    assert set(res) == {"meta", "behaviour", "training", "reference", "flow", "consistency"}
    assert os.environ.get("MINARI_DATASETS_PATH")  # the fixture's root was respected (not replaced)
    assert res["meta"]["env"] == "Pendulum-v1" and res["meta"]["episodes"] == 1
    assert list(res["flow"]) == ["euler", "rk4"]
    assert res["training"]["qipo"]["steps"] == 18 and res["training"]["cpql"]["steps"] == 6
    rows = [r for rs in res["flow"].values() for r in rs] + res["consistency"]
    assert [r["steps"] for r in res["flow"]["rk4"]] == [1, 2] and [r["nfe"] for r in res["flow"]["rk4"]] == [4, 8]
    assert [r["steps"] for r in res["consistency"]] == [1, 2, 3]
    assert [r["sigmas"] for r in res["consistency"]] == [E.CM_SIGMAS[k] for k in (1, 2, 3)]
    for r in rows:
        for k in ("ms_torch", "ms_auto", "ms_act", "q_qipo", "q_cpql"):
            assert _finite(r[k]), (k, r)
        assert r["ms_torch"] > 0 and r["backend_auto"] in ("torch", "cpp", "triton")
        for k in ("return", "return_sel"):
            assert len(r[k]["returns"]) == 1 and all(math.isfinite(v) for v in r[k]["returns"])
            assert -2000.0 < r[k]["mean"] <= 0.0  # Pendulum's reward is in [-16.3, 0] per step, 200 steps
    for r in res["flow"]["rk4"] + res["flow"]["euler"]:
        assert _finite(r["dist"]) and r["dist"] >= 0.0
    # a finer solve is closer to the rk4 x 64 reference than euler x 1
    assert res["flow"]["rk4"][1]["dist"] < res["flow"]["euler"][0]["dist"]
    assert all(_finite(v) for v in res["reference"].values())
    json.dumps(res)  # JSON-able


def test_reproducible_and_reuses_runs(study):
    """A second run on the same run dirs reuses the finished training and gives the same numbers."""
    runs, res = study
    again = E.run_study(runs, quick=True, episodes=1, steps=(1,), solvers=("euler",), n_states=16, candidates=3,
                        time_budget=0.0, overrides=TINY, verbose=False, with_selection=False)
    a, b = res["flow"]["euler"][0], again["flow"]["euler"][0]
    assert a["q_qipo"] == b["q_qipo"] and a["dist"] == b["dist"] and a["return"] == b["return"]
    assert "return_sel" not in b
    assert again["consistency"][0]["return"] == res["consistency"][0]["return"]


def test_save_and_replot(study, tmp_path):
    _, res = study
    written = E.save(res, str(tmp_path))
    names = sorted(os.path.basename(p) for p in written)
    assert names == ["critic_vs_steps.png", "results.json", "return_vs_steps.png", "return_vs_time.png",
                     "speed_accuracy_env.md"]
    for p in written:
        assert os.path.getsize(p) > 0
    with open(tmp_path / "results.json") as fh:
        assert json.load(fh)["meta"] == json.loads(json.dumps(res["meta"]))
    md = (tmp_path / "speed_accuracy_env.md").read_text()
    assert md.count("| flow euler |") == 2 and md.count("| consistency ") == 3
    out = tmp_path / "replot"
    assert E.main(["--replot", str(tmp_path / "results.json"), "--out", str(out)]) == 0
    assert (out / "return_vs_time.png").exists()


def test_private_minari_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MINARI_DATASETS_PATH", raising=False)
    with E.minari_root(str(tmp_path)) as root:
        assert root == os.path.join(str(tmp_path), "minari") == os.environ["MINARI_DATASETS_PATH"]
    assert "MINARI_DATASETS_PATH" not in os.environ
    monkeypatch.setenv("MINARI_DATASETS_PATH", "/somewhere")
    with E.minari_root(str(tmp_path)) as root:
        assert root == "/somewhere"
