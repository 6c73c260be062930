"""Process entries of tests/test_distributed.py (torch.multiprocessing, 2 processes, gloo): QIPO / CPQL
runs and support renewals on the embedded demo dataset ($MINARI_DATASETS_PATH), and a run whose rank 0
is SIGKILLed mid-way. The configs are shared with the test (QIPO_BASE, CPQL_BASE, RUNS).
"""
import os
import signal

import torch

QIPO_BASE = dict(hidden=16, depth=2, critic_hidden=16, critic_depth=2, pretrain_steps=5, pretrain_batch=32, q_steps=5,
                 q_batch=32, q_support=3, q_support_refresh=3, policy_steps=6, policy_batch=16, num_support=4,
                 renew_every=3, renew_chunk=3000, sample_steps=2, eval_episodes=0, log_every=1, checkpoint_every=4,
                 tensorboard=False, seed=3)
CPQL_BASE = dict(hidden=16, depth=2, critic_hidden=16, critic_depth=2, steps=6, batch=32, step_start_ema=4,
                 update_ema_every=2, eval_episodes=0, log_every=1, checkpoint_every=0, tensorboard=False, seed=5)
# name -> (algo, config overrides); "killed" is the QIPO "support" run, killed at KILL_AT then resumed.
RUNS = {
    "qipo_support": ("qipo", {}),
    "qipo_batch": ("qipo", dict(normalize="batch", keep_data_action=True)),
    "qipo_sampled": ("qipo", dict(support_estimator="sampled")),
    "qipo_dequant": ("qipo", dict(bound_dequant=0.2)),
    "cpql_sigmas": ("cpql", dict(sigmas=(2.0, 0.5))),
    "cpql_maxq": ("cpql", dict(max_q_backup=True, q_norm=False)),
}
KILL_AT = 13   # a policy-improvement step, after the checkpoint at step 12


def config(algo, **kw):
    from qipo_kernels.algos import CPQLConfig, QIPOConfig

    if algo == "qipo":
        return QIPOConfig(**{**QIPO_BASE, **kw})
    return CPQLConfig(**{**CPQL_BASE, **kw})


def make(algo, ds, out_dir, callback=None, **kw):
    from qipo_kernels.algos import CPQL, QIPO

    cls = QIPO if algo == "qipo" else CPQL
    return cls(ds, config(algo, **kw), out_dir=out_dir, progress_bar=False, callback=callback)


def recorder(store):
    def cb(tr, metrics):
        store.append({k: float(v) for k, v in metrics.items()})
    return cb


def renewal(tr):
    """The Q-support refresh and the support renewal of a fresh QIPO trainer, at step 7."""
    tr.step = 7
    tr._refresh_q_support()
    tr._renew_support()
    return {"q_support": tr.q_support_actions.clone(), "support": tr.support.clone(), "support_q": tr.support_q.clone()}


def scenarios(rank, world, init_method, out):
    """torch.multiprocessing entry: renewals and the runs of RUNS on ``world`` processes; rank 0 saves
    OUT/results.pt, rank 1 OUT/rank1_losses.pt."""
    torch.set_num_threads(1)
    from qipo_kernels import data
    from qipo_kernels.algos import distributed

    ctx = distributed.init(rank, world, init_method, "cpu")
    assert ctx.backend == "gloo"
    ds = data.load_minari(data.DEMO_DATASET_ID)
    res = {"losses": {}}

    tr = make("qipo", ds, os.path.join(out, "renew"))
    ctx.attach(tr)
    res["renew"] = renewal(tr)
    res["renew_range"] = ctx.shard_range(len(ds))

    try:
        ctx.attach(make("qipo", ds, os.path.join(out, "bad"), policy_batch=15))
    except ValueError as e:
        res["batch_error"] = str(e)

    for name, (algo, kw) in RUNS.items():
        losses = []
        tr = make(algo, ds, os.path.join(out, name), recorder(losses), **kw)
        ctx.attach(tr)
        tr.fit()
        res["losses"][name] = losses
    if ctx.rank == 0:
        torch.save(res, os.path.join(out, "results.pt"))
    else:
        torch.save(res["losses"], os.path.join(out, "rank1_losses.pt"))
    ctx.barrier()
    ctx.close()


def killed(rank, world, init_method, out):
    """torch.multiprocessing entry: the QIPO run of QIPO_BASE in OUT/killed, rank 0 SIGKILLed at step KILL_AT."""
    torch.set_num_threads(1)
    from qipo_kernels import data
    from qipo_kernels.algos import distributed

    ctx = distributed.init(rank, world, init_method, "cpu")
    ds = data.load_minari(data.DEMO_DATASET_ID)

    def kill(tr, metrics):
        if tr.step == KILL_AT and ctx.rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    tr = make("qipo", ds, os.path.join(out, "killed"), kill)
    ctx.attach(tr)
    tr.fit()
    ctx.close()


def cli(rank, world, init_method, out, argv):
    """torch.multiprocessing entry: ``qipo-kernels ARGV`` as torchrun would start it (RANK, WORLD_SIZE,
    MASTER_ADDR / MASTER_PORT in the environment; ``init_method`` is tcp://HOST:PORT)."""
    torch.set_num_threads(1)
    from qipo_kernels.cli import main

    host, port = init_method[len("tcp://"):].rsplit(":", 1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR=host, MASTER_PORT=port)
    assert main(argv) == 0


INTERRUPT_AT = 3


def interrupted(rank, world, init_method, out, who, where):
    """torch.multiprocessing entry: a CPQL run in OUT/interrupted-WHO-WHERE whose rank WHO (alone) gets a
    SIGINT at step INTERRUPT_AT, inside the step ("step") or after it, between steps ("between"). Each rank
    writes OUT/interrupted-WHO-WHERE/outcome<rank>.pt: how fit() ended and at which step."""
    torch.set_num_threads(1)
    from qipo_kernels import data
    from qipo_kernels.algos import distributed

    ctx = distributed.init(rank, world, init_method, "cpu", timeout_s=120)
    ds = data.load_minari(data.DEMO_DATASET_ID)
    run = os.path.join(out, f"interrupted-{who}-{where}")

    def between(tr, metrics):
        if where == "between" and ctx.rank == who and tr.step == INTERRUPT_AT:
            os.kill(os.getpid(), signal.SIGINT)

    tr = make("cpql", ds, run, between, steps=200)
    step = tr.train_step

    def inside():
        if where == "step" and ctx.rank == who and tr.step == INTERRUPT_AT - 1:
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs here, in the middle of the step
        return step()
    tr.train_step = inside
    ctx.attach(tr)
    try:
        tr.fit()
        outcome = "finished"
    except KeyboardInterrupt:
        outcome = "interrupted"
    except Exception as e:  # noqa: BLE001 - recorded for the test to show
        outcome = f"{type(e).__name__}: {e}"
    torch.save({"outcome": outcome, "step": tr.step}, os.path.join(run, f"outcome{rank}.pt"))
    ctx.close()
