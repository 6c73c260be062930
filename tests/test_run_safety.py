"""Run directories and checkpoints: nothing a user owns is lost, a run folder holds one configuration,
Ctrl-C keeps the work done, and checkpoints load with torch.load(weights_only=True)."""
import errno
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from qipo_kernels import data, rundir
from qipo_kernels.algos import CPQL, QIPO, CPQLConfig, QIPOConfig
from qipo_kernels.algos.common import (CheckpointError, ConfigMismatch, atomic_copy, atomic_write_json,
                                       read_checkpoint)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_ds():
    """200 synthetic Pendulum-like transitions (training only: no environment)."""
    rng = np.random.default_rng(1)
    n = 200
    th = rng.uniform(-np.pi, np.pi, n)
    obs = np.stack([np.cos(th), np.sin(th), rng.normal(size=n)], 1)
    act = rng.uniform(-2, 2, (n, 1))
    trunc = np.zeros(n)
    trunc[99::100] = 1
    return data.OfflineDataset.from_arrays(obs, act, -(th ** 2), obs + 0.05 * rng.normal(size=obs.shape),
                                           np.zeros(n), trunc, action_low=np.array([-2.0]),
                                           action_high=np.array([2.0]), dataset_id="tiny", env_id="Pendulum-v1")


def _ccfg(**kw):
    c = dict(hidden=8, depth=2, critic_hidden=8, critic_depth=2, steps=12, batch=16, step_start_ema=4,
             eval_episodes=0, log_every=3, checkpoint_every=5, tensorboard=False, lr=1e-3)
    c.update(kw)
    return CPQLConfig(**c)


def _same(a, b):
    for k in a.modules:
        for (n1, p1), (n2, p2) in zip(a.modules[k].state_dict().items(), b.modules[k].state_dict().items()):
            assert n1 == n2 and torch.equal(p1, p2), f"{k}.{n1} differs"


# ---- checkpoints -------------------------------------------------------------------------------

def test_checkpoints_load_weights_only_and_files_are_0644(tiny_ds, tmp_path):
    old = os.umask(0o022)
    try:
        tr = CPQL(tiny_ds, _ccfg(), out_dir=str(tmp_path / "c"), progress_bar=False)
        tr.fit()
        q = QIPO(tiny_ds, QIPOConfig(hidden=8, critic_hidden=8, pretrain_steps=2, q_steps=2, policy_steps=2,
                                     q_support=2, num_support=2, renew_every=2, q_support_refresh=2, sample_steps=1,
                                     pretrain_batch=8, q_batch=8, policy_batch=8, eval_episodes=0,
                                     tensorboard=False), out_dir=str(tmp_path / "q"), progress_bar=False)
        q.fit()
        atomic_write_json({"a": 1}, str(tmp_path / "r.json"))
    finally:
        os.umask(old)
    for d in ("c", "q"):
        st = torch.load(str(tmp_path / d / "checkpoint.pt"), weights_only=True)
        assert st["step"] > 0 and isinstance(st["rng"]["numpy"], dict)
    csv_mode = os.stat(tmp_path / "c" / "train.csv").st_mode & 0o777
    assert csv_mode == 0o644
    for p in ("c/checkpoint.pt", "c/summary.json", "c/config.json", "r.json"):
        assert os.stat(tmp_path / p).st_mode & 0o777 == 0o644, p


def test_atomic_copy_is_exact_and_leaves_nothing_half_written(tmp_path):
    """atomic_copy: the bytes of src at path (0644 under umask 022, as the other atomic writes); a copy that fails
    leaves path as it was and no temporary file beside it."""
    src, dst = tmp_path / "a.bin", tmp_path / "out" / "b.bin"
    src.write_bytes(os.urandom(1000) + b"\x00tail")
    old = os.umask(0o022)
    try:
        atomic_copy(str(src), str(dst))
    finally:
        os.umask(old)
    assert dst.read_bytes() == src.read_bytes() and os.stat(dst).st_mode & 0o777 == 0o644
    before = dst.read_bytes()
    with pytest.raises(FileNotFoundError):
        atomic_copy(str(tmp_path / "missing"), str(dst))
    assert dst.read_bytes() == before and os.listdir(dst.parent) == ["b.bin"]


def test_corrupt_truncated_and_unsafe_checkpoints_are_one_line_errors(tiny_ds, tmp_path):
    out = tmp_path / "run"
    CPQL(tiny_ds, _ccfg(steps=5), out_dir=str(out), progress_bar=False).fit()
    ck = out / "checkpoint.pt"
    blob = ck.read_bytes()
    for bad in (blob[: len(blob) // 2], b"garbage" * 10, b""):
        ck.write_bytes(bad)
        with pytest.raises(CheckpointError, match="cannot read checkpoint .*checkpoint.pt.*--fresh") as ei:
            CPQL(tiny_ds, _ccfg(steps=5), out_dir=str(out), progress_bar=False).fit()
        assert "\n" not in str(ei.value) and str(ck) in str(ei.value)
    # a pickle that would build an arbitrary object is refused, not run
    torch.save({"algo": "cpql", "config": {}, "step": 0, "modules": {}, "x": _Evil()}, str(ck))
    with pytest.raises(CheckpointError, match="not loaded"):
        read_checkpoint(str(ck))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        read_checkpoint(str(tmp_path / "none.pt"))


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


# ---- one configuration per run folder --------------------------------------------------------

def test_changed_config_is_refused_or_really_applied(tiny_ds, tmp_path, capsys):
    out = str(tmp_path / "run")
    CPQL(tiny_ds, _ccfg(), out_dir=out, progress_bar=False).fit()
    before = open(os.path.join(out, "summary.json")).read()
    with pytest.raises(ConfigMismatch, match=r"another configuration \(hidden 8 -> 16\).*--fresh.*--out") as ei:
        CPQL(tiny_ds, _ccfg(hidden=16), out_dir=out, progress_bar=False).fit()
    assert "\n" not in str(ei.value)
    assert open(os.path.join(out, "summary.json")).read() == before   # nothing touched
    with pytest.raises(ConfigMismatch, match="past the 6 steps"):
        CPQL(tiny_ds, _ccfg(steps=6), out_dir=out, progress_bar=False).fit()
    # steps and lr may change: the run is extended and the restored optimizers get the new lr
    capsys.readouterr()
    tr = CPQL(tiny_ds, _ccfg(steps=15, lr=2.5e-4), out_dir=out, progress_bar=False)
    s = tr.fit()
    assert "resuming from step 12 of 15" in capsys.readouterr().out
    assert s["steps"] == 15 and s["config"]["lr"] == 2.5e-4
    assert all(g["lr"] == 2.5e-4 for o in tr.optims.values() for g in o.param_groups)
    st = read_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert all(g["lr"] == 2.5e-4 for o in st["optims"].values() for g in o["param_groups"])
    assert json.load(open(os.path.join(out, "config.json")))["config"]["lr"] == 2.5e-4


# ---- Ctrl-C --------------------------------------------------------------------------------------

def test_ctrl_c_writes_a_checkpoint_and_the_run_resumes_identically(tiny_ds, tmp_path):
    # the handler in place before (Python's default, or SIG_IGN when pytest was started in the background)
    handler_before = signal.getsignal(signal.SIGINT)
    ref = CPQL(tiny_ds, _ccfg(checkpoint_every=0), out_dir=str(tmp_path / "ref"), progress_bar=False)
    ref.fit()

    # Ctrl-C between steps (here: from the callback after step 7): checkpoint of step 7
    def cb(tr, m):
        if tr.step == 7:
            os.kill(os.getpid(), signal.SIGINT)
    a = CPQL(tiny_ds, _ccfg(checkpoint_every=0), out_dir=str(tmp_path / "a"), progress_bar=False, callback=cb)
    with pytest.raises(KeyboardInterrupt):
        a.fit()
    assert read_checkpoint(str(tmp_path / "a" / "checkpoint.pt"))["step"] == 7
    a2 = CPQL(tiny_ds, _ccfg(checkpoint_every=0), out_dir=str(tmp_path / "a"), progress_bar=False)
    a2.fit()
    _same(ref, a2)

    # Ctrl-C inside a training step: the step is finished, then the checkpoint written
    b = CPQL(tiny_ds, _ccfg(checkpoint_every=0), out_dir=str(tmp_path / "b"), progress_bar=False)
    step = b.train_step

    def interrupted_step():
        out = step()
        if b.step == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return out
    b.train_step = interrupted_step
    with pytest.raises(KeyboardInterrupt):
        b.fit()
    assert b.step == 5 and read_checkpoint(str(tmp_path / "b" / "checkpoint.pt"))["step"] == 5
    b2 = CPQL(tiny_ds, _ccfg(checkpoint_every=0), out_dir=str(tmp_path / "b"), progress_bar=False)
    b2.fit()
    _same(ref, b2)
    assert signal.getsignal(signal.SIGINT) is handler_before   # handler restored


# ---- the run folder: marker, lock, --fresh ---------------------------------------------------------

# holds the lock from another process (rundir.py loaded alone: no torch import, starts in a blink)
_HOLD = ("import importlib.util, sys\n"
         "spec = importlib.util.spec_from_file_location('rundir', sys.argv[2]); m = importlib.util.module_from_spec(spec)\n"
         "spec.loader.exec_module(m)\n"
         "with m.run_lock(sys.argv[1]):\n    print('held', flush=True); sys.stdin.read()\n")


def test_lock_keeps_a_second_process_off(tiny_ds, tmp_path):
    out = str(tmp_path / "run")
    p = subprocess.Popen([sys.executable, "-c", _HOLD, out, rundir.__file__], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(rundir.RunDirBusy, match=f"in use by another process \\(pid {p.pid}\\)"):
            CPQL(tiny_ds, _ccfg(), out_dir=out, progress_bar=False).fit()
        assert not os.path.exists(os.path.join(out, "train.csv"))
    finally:
        p.stdin.close()
        p.wait(timeout=60)
    CPQL(tiny_ds, _ccfg(steps=3), out_dir=out, progress_bar=False).fit()   # free again once it is gone


def test_clear_run_dir_only_deletes_what_the_package_made(tmp_path):
    mine = tmp_path / "user"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(rundir.RunDirError, match="refuses to delete"):
        rundir.clear_run_dir(str(mine))
    assert (mine / "thesis.tex").read_text() == "years of work"
    made = tmp_path / "made" / "run"
    rundir.ensure_run_dir(str(made))
    assert rundir.is_package_run_dir(str(made)) and not rundir.is_package_run_dir(str(tmp_path / "made"))
    (made / "checkpoint.pt").write_bytes(b"x")
    (made / "tb").mkdir()
    rundir.clear_run_dir(str(made))
    assert sorted(os.listdir(made)) == [rundir.MARKER_NAME]
    empty = tmp_path / "empty"
    empty.mkdir()
    rundir.clear_run_dir(str(empty))   # an empty folder: nothing to lose


def test_check_writable_one_line_errors(tmp_path, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(rundir.RunDirError, match="cannot write to .*file/run"):
        rundir.check_writable(str(f / "run"))
    with pytest.raises(rundir.RunDirError, match="exists and is not a folder"):
        rundir.check_writable(str(f))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(rundir.tempfile, "NamedTemporaryFile", full)
    with pytest.raises(rundir.RunDirError, match="cannot write to .*: no space left on the device"):
        rundir.check_writable(str(tmp_path))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write to read-only folders")
def test_check_writable_read_only(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(rundir.RunDirError, match="cannot write to .*ro.*ermission denied"):
            rundir.check_writable(str(ro))
    finally:
        ro.chmod(0o755)


def test_a_folder_of_yours_with_run_file_names_is_never_written_into(tmp_path):
    """--out pointing at a folder the package did not make, with no checkpoint, that holds a
    config.json / summary.json / CSV: refused (a run would overwrite or append to them); unrelated
    files are left alone beside a new run."""
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": true}')
    (mine / "results.csv").write_text("a,b\n1,2\n")
    with pytest.raises(rundir.RunDirError, match="not made by qipo-kernels and holds config.json, results.csv"):
        with rundir.run_lock(str(mine)):
            pass
    assert (mine / "config.json").read_text() == '{"mine": true}'
    other = tmp_path / "notes-only"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with rundir.run_lock(str(other)):   # nothing it would overwrite: allowed
        pass
    assert (other / "notes.txt").read_text() == "keep"
