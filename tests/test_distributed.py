"""torch.distributed training (qipo_kernels.algos.distributed): 2 processes with gloo on the CPU.

Two forked process pairs (tests/dist_worker.py) train QIPO and CPQL for a few steps on the embedded demo
dataset, renew QIPO's supports sharded over the 2 ranks, and train a run whose rank 0 is SIGKILLed
mid-way; a third pair resumes that run through the command line, started as torchrun starts it. The results are compared with
the same runs on one process (this one).
"""
import csv
import os
import shutil
import socket
import warnings

import pytest
import torch

import dist_worker as W
from qipo_kernels import data
from qipo_kernels.algos import QIPO, QIPOConfig
from qipo_kernels.algos import distributed as D
from qipo_kernels.policies import FlowPolicy

pytestmark = pytest.mark.usefixtures("one_thread")


def _sets(kw):
    out = []
    for k, v in kw.items():
        if isinstance(v, (tuple, list)):
            v = ",".join(str(x) for x in v)
        out += ["--set", f"{k}={v}"]
    return out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_ds(demo_minari_root):
    return data.load_minari(data.DEMO_DATASET_ID)


def _spawn(fn, out, *args):
    """``fn(rank, 2, init_method, out, *args)`` on 2 processes forked from this one (fork: nothing to
    import again, so a launch takes about a second; torchrun or spawn would import torch in each)."""
    import torch.multiprocessing as mp

    init = f"tcp://127.0.0.1:{_free_port()}"
    mp.start_processes(fn, args=(2, init, out) + args, nprocs=2, join=True, start_method="fork")


@pytest.fixture(scope="module")
def dist_run(demo_minari_root, demo_ds, tmp_path_factory):
    """2-process runs: the scenarios, then a run whose rank 0 is SIGKILLed at step KILL_AT, resumed by
    ``qipo-kernels train`` on 2 processes started as torchrun starts them (environment variables)."""
    import torch.multiprocessing as mp

    out = str(tmp_path_factory.mktemp("dist"))
    _spawn(W.scenarios, out)
    with pytest.raises(mp.ProcessExitedException, match="SIGKILL"):
        _spawn(W.killed, out)
    killed = os.path.join(out, "killed")
    killed_step = torch.load(os.path.join(killed, "checkpoint.pt"), weights_only=False)["step"]
    shutil.copytree(killed, os.path.join(out, "killed_copy"))
    _spawn(W.cli, out, ["train", "qipo", "--dataset", data.DEMO_DATASET_ID, "--out", killed, "--no-progress",
                        "--device", "cpu"] + _sets(W.QIPO_BASE))
    return {"out": out, "killed_step": killed_step,
            "res": torch.load(os.path.join(out, "results.pt"), weights_only=False),
            "rank1": torch.load(os.path.join(out, "rank1_losses.pt"), weights_only=False)}


# ---- pieces that need no process group -------------------------------------------------------------

@pytest.mark.parametrize("path", ["ot", "ot-eps", "vp"])
def test_flow_draws_are_the_ones_the_loss_makes(path):
    """flow_loss draws (t, noise) itself under torch.distributed: they must be FlowPolicy.loss's own draws."""
    torch.manual_seed(0)
    pol = FlowPolicy(5, 3, hidden=16, depth=2, path=path)
    obs, act = torch.randn(17, 5), torch.rand(17, 6, 3) * 2 - 1
    energy = torch.randn(17, 6)
    g1, g2 = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    ref = pol.loss(obs, act, energy=energy, generator=g1, backend="torch")
    t, z = D.flow_draws(pol, 17, 6, obs.dtype, obs.device, g2)
    got = pol.loss(obs, act, energy=energy, t=t, noise=z, backend="torch")
    assert torch.equal(ref, got)
    assert torch.equal(g1.get_state(), g2.get_state())


def test_block_noise_does_not_depend_on_the_split():
    key = (3, D.stream_id("renew-support"), 7)
    full = D.block_noise(key, 0, 1000, (4, 2), torch.float32, torch.device("cpu"), block=64)
    assert full.shape == (1000, 4, 2)
    parts = [D.block_noise(key, lo, hi, (4, 2), torch.float32, torch.device("cpu"), block=64)
             for lo, hi in [(0, 17), (17, 64), (64, 640), (640, 999), (999, 1000)]]
    assert torch.equal(torch.cat(parts), full)
    # another step, stream or seed gives other noise
    for other in [(3, D.stream_id("renew-support"), 8), (3, D.stream_id("q-support"), 7), (4, D.stream_id("renew-support"), 7)]:
        assert not torch.allclose(D.block_noise(other, 0, 1000, (4, 2), torch.float32, torch.device("cpu"), block=64), full)
    assert abs(float(full.mean())) < 0.05 and abs(float(full.std()) - 1) < 0.05
    assert D.block_noise(key, 5, 5, (4, 2), torch.float32, torch.device("cpu")).shape == (0, 4, 2)


def test_resume_note():
    assert D.resume_note(2, 2) is None
    msg = D.resume_note(2, 4)
    assert "2 process" in msg and "with 4" in msg


# ---- two processes ---------------------------------------------------------------------------------

def test_sharded_renewal_equals_unsharded(dist_run, demo_ds, tmp_path):
    got = dist_run["res"]["renew"]
    lo, hi = dist_run["res"]["renew_range"]
    assert lo == 0 and 0 < hi < len(demo_ds)  # rank 0 sampled only its share
    tr = QIPO(demo_ds, W.config("qipo"), out_dir=str(tmp_path), progress_bar=False)
    ref = W.renewal(tr)
    for k in ("q_support", "support", "support_q"):
        assert got[k].shape == ref[k].shape, k
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("name", list(W.RUNS))
def test_losses_equal_one_process(dist_run, demo_ds, tmp_path, name):
    """Same global batch and seed on 1 and 2 processes: the same losses up to float32 summation order."""
    algo, kw = W.RUNS[name]
    ref = []
    W.make(algo, demo_ds, str(tmp_path), W.recorder(ref), **kw).fit()
    got = dist_run["res"]["losses"][name]
    assert len(got) == len(ref) > 0
    for step, (g, r) in enumerate(zip(got, ref)):
        for k in [k for k in r if "loss" in k]:
            assert g[k] == pytest.approx(r[k], rel=1e-4, abs=1e-5), (step, k, g[k], r[k])
    # every rank logs the same (global) metrics
    assert dist_run["rank1"][name] == got


def test_batch_must_divide(dist_run):
    msg = dist_run["res"]["batch_error"]
    assert "policy_batch=15" in msg and "world size 2" in msg


def test_rank0_alone_writes_logs(dist_run):
    run = os.path.join(dist_run["out"], "qipo_support")
    names = sorted(f for f in os.listdir(run) if f.endswith(".csv"))
    assert names == ["policy.csv", "pretrain.csv", "q.csv"]
    steps = []
    for n in names:
        with open(os.path.join(run, n), newline="") as f:
            steps += [int(float(r["step"])) for r in csv.DictReader(f)]
    assert sorted(steps) == list(range(1, 17))  # each step once: one writer


def test_killed_run_resumes(dist_run):
    assert dist_run["killed_step"] == 12  # the last checkpoint before the SIGKILL at step 13
    out = dist_run["out"]
    a = torch.load(os.path.join(out, "killed", "checkpoint.pt"), weights_only=False)
    b = torch.load(os.path.join(out, "qipo_support", "checkpoint.pt"), weights_only=False)
    assert a["step"] == b["step"] == 16 and a["world_size"] == 2
    for m in b["modules"]:  # same world size: bit-identical to the uninterrupted run
        for k, v in b["modules"][m].items():
            assert torch.equal(a["modules"][m][k], v), f"{m}.{k}"
    with open(os.path.join(out, "killed", "policy.csv"), newline="") as f:
        steps = [int(float(r["step"])) for r in csv.DictReader(f)]
    assert steps == list(range(11, 17))


def test_resume_with_another_world_size(dist_run, demo_ds):
    """The 2-process checkpoint resumed by one process: a message, and the run ends where it would have."""
    out = dist_run["out"]
    tr = W.make("qipo", demo_ds, os.path.join(out, "killed_copy"))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        tr.fit()
    assert any("written by 2 process(es) with 1" in str(w.message) for w in rec)
    b = torch.load(os.path.join(out, "qipo_support", "checkpoint.pt"), weights_only=False)
    for m in b["modules"]:
        for k, v in b["modules"][m].items():
            torch.testing.assert_close(tr.modules[m].state_dict()[k], v, rtol=1e-4, atol=1e-5, msg=f"{m}.{k}")


@pytest.mark.parametrize("n", [1, 255, 257, 1000, 20000])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shard_ranges_cover_the_states_in_whole_blocks(n, world):
    ranges = [D.DistContext._range(r, world, n, 256) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    for (lo, hi), (lo2, _) in zip(ranges, ranges[1:]):
        assert hi == lo2
    for lo, hi in ranges:
        assert lo <= hi and (lo % 256 == 0 or lo == n)
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= 256


def test_collective_timeout_from_argument_or_environment(monkeypatch):
    """--dist-timeout / $QIPO_DIST_TIMEOUT_S reach init_process_group; bad values are refused naming the
    argument before any group is made."""
    seen = {}

    def fake_init(backend, **kw):
        seen.update(kw, backend=backend)
        raise RuntimeError("stop here")

    monkeypatch.setattr(D.tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(D.tdist, "init_process_group", fake_init)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv(D.TIMEOUT_ENV, raising=False)
    for arg, env, want in ((None, None, 1800), (None, "7200", 7200), (60.0, "7200", 60)):
        if env is not None:
            monkeypatch.setenv(D.TIMEOUT_ENV, env)
        seen.clear()
        with pytest.raises(RuntimeError, match="stop here"):
            D.from_env("cpu", arg)
        assert seen["timeout"].total_seconds() == want and seen["backend"] == "gloo" and seen["rank"] == 1
    monkeypatch.setenv(D.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match="QIPO_DIST_TIMEOUT_S must be a number of seconds"):
        D.from_env("cpu")
    for bad in (0, -5, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="timeout_s must be a"):
            D.from_env("cpu", bad)
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: nothing distributed, but a bad value still says so
    with pytest.raises(ValueError, match="QIPO_DIST_TIMEOUT_S"):
        D.from_env("cpu")
    monkeypatch.delenv(D.TIMEOUT_ENV)
    assert D.from_env("cpu") is None
    from qipo_kernels.cli import main
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="timeout_s must be a finite"):
        main(["train", "cpql", "--dataset", "x/y-v0", "--dist-timeout", "-1"])


@pytest.mark.parametrize("who,where", [(1, "between"), (0, "step"), (1, "step")])
def test_ctrl_c_on_one_rank_stops_every_rank_at_the_same_step(demo_minari_root, demo_ds, tmp_path, who, where):
    """A SIGINT that reaches one rank only (or the ranks at different moments: torchrun forwards Ctrl-C to
    each worker in turn) stops every rank after the same step, and rank 0 writes that step's checkpoint;
    before, the other ranks went on into the next step's collective and failed there without a checkpoint."""
    out = str(tmp_path)
    _spawn(W.interrupted, out, who, where)
    run = os.path.join(out, f"interrupted-{who}-{where}")
    ends = [torch.load(os.path.join(run, f"outcome{r}.pt"), weights_only=False) for r in range(2)]
    stop = W.INTERRUPT_AT if where == "step" else W.INTERRUPT_AT + 1
    assert [e["outcome"] for e in ends] == ["interrupted", "interrupted"], ends
    assert [e["step"] for e in ends] == [stop, stop]
    assert torch.load(os.path.join(run, "checkpoint.pt"), weights_only=False)["step"] == stop
