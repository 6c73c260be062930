"""bench/host_overhead.py (mocked-launch host timer) and bench/static_sm90.py's traffic model."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


CASES = ("sampler", "sampler.ot-eps", "ops.integrate", "ops.consistency_sample", "ops.act", "ops.act.ot-eps",
         "policy.act.ot-eps", "critic.q_min")
ONE_ACT = {"ops": ["act"], "launches": 1}


def test_host_overhead_measures_the_prepared_and_functional_paths():
    from bench import host_overhead
    from qipo_kernels.triton import sampler_launch, select

    real = sampler_launch._policy_kernel, select._select_kernel
    res = host_overhead.measure(calls=5, rounds=2, repeat=2)
    assert (sampler_launch._policy_kernel, select._select_kernel) == real  # the mocks are removed again
    us, mn = res["us_per_call"], res["us_per_call_min"]
    assert set(us) == set(mn) == set(CASES) | {"watch"}
    # FlowPolicy.act from t0 = 0.05 ("ot-eps") is one ops.act call and one (mocked) launch, as ops.act
    assert res["dispatches"] == {"ops.act": ONE_ACT, "ops.act.ot-eps": ONE_ACT, "policy.act.ot-eps": ONE_ACT}
    assert all(0 < mn[k] <= us[k] for k in us)  # the minimum of the rounds is at most their median
    assert len(res["load_1min"]) == 3 and res["repeat"] == 2
    assert res["watched_slots"] >= 10 and set(res["meets_targets"]) == {"sampler", "ops.integrate"}
    assert res["meets_targets"] == {k: mn[k] <= v for k, v in res["targets_us"].items()}


def test_host_overhead_compare_runs_two_trees_back_to_back():
    from bench import host_overhead

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = host_overhead.compare(root, calls=3, rounds=2)  # (this tree against itself)
    assert set(res["us_per_call"]) == {"this", "other"} and res["rounds"] == 2
    for side in ("this", "other"):
        us = res["us_per_call"][side]
        assert set(us) == set(CASES)
        assert all(0 < v["wall_min"] <= v["wall_median"] and v["cpu_min"] > 0 for v in us.values())
        assert res["trees"][side]["prepared"] == {"sampler": True, "sampler.ot-eps": True}
        assert res["trees"][side]["dispatches"] == {"ops.act": ONE_ACT, "ops.act.ot-eps": ONE_ACT,
                                                    "policy.act.ot-eps": ONE_ACT}


def test_traffic_model_counts_weights_once_per_evaluation_and_no_scratch():
    pytest.importorskip("triton")
    before = os.environ.get("TRITON_INTERPRET")
    from bench.static_sm90 import CASES, NET, traffic

    assert os.environ.get("TRITON_INTERPRET") == before  # importing the tool leaves the environment alone

    case = CASES["integrate_256x50x10_bf16"]
    meta = dict(BM=128, BN=32, HP=256, AP=16, SP=32, DEPTH=3, SOLVER=0, KP=1)
    r = traffic(meta, case, programs=100)
    tiles = -(-256 * 50 // 128)
    assert r["tiles"] == tiles == 100 and r["evals_per_tile"] == 10
    # every evaluation of every tile reads all weights once (bf16): W1x, W1o (the obs share is
    # recomputed), two hidden, Wo; no activation scratch
    w = 2 * (16 * 256 + 32 * 256 + 2 * 256 * 256 + 16 * 256)
    assert r["weight_gb"] == pytest.approx(tiles * 10 * w / 1e9)
    assert r["scratch_gb"] == 0 and r["scratch_bytes_allocated"] == 0
    # plus per evaluation the float32 biases and time row, per tile the row inputs / outputs
    small = 4 * (256 + 2 * 256 + 16 + 256)
    io = 128 * NET["S"] * 2 + 2 * 128 * NET["A"] * 2 + 10 * 8 * 4
    assert r["gb"] == pytest.approx(tiles * (10 * (w + small) + io) / 1e9)
    # FLOPs (padded): per row per evaluation 2 (16*256 + 32*256 + 2*256*256 + 256*16)
    fl = tiles * 10 * 2 * 128 * (16 * 256 + 32 * 256 + 2 * 256 * 256 + 256 * 16)
    assert r["gflop_padded"] == pytest.approx(fl / 1e9)
    # each weight byte feeds 2 * BM FLOPs (bf16: 2 bytes an element): FLOP/B just under BM
    assert 120 < r["flop_per_byte"] < 128
    # the column block no longer changes the traffic; halving the tile doubles it
    assert traffic(dict(meta, BN=16), case, 100)["gb"] == pytest.approx(r["gb"])
    assert traffic(dict(meta, BM=64), case, 200)["gb"] == pytest.approx(2 * r["gb"], rel=0.01)
    # a LayerNorm critic reads its blocked (first-of-pair) layers twice
    act = CASES["act_cons_256x50_bf16"]
    m2 = dict(meta, KP=64, SOLVER=0)
    assert traffic(dict(m2, LNQ=True), act, 100)["weight_gb"] > traffic(m2, act, 100)["weight_gb"]
