"""Loss ops, forward and forward + backward (``pass_``): weighted_fm_loss and flow_matching_loss;
and flow_path (the point on the path and the regression target, forward only).

Each test is one case x variant (torch, torch.compile, cudagraph, triton, cpp); unavailable variants
are skipped with the reason qipo_kernels.backends gives.
"""
import pytest

from bench.cases import execute, flow_path_cases, loss_cases, params_for


@pytest.mark.parametrize("case,variant", params_for(loss_cases("weighted_fm_loss")))
def test_weighted_fm_loss(benchmark, device, case, variant):
    execute(benchmark, case, variant, device)


@pytest.mark.parametrize("case,variant", params_for(loss_cases("flow_matching_loss")))
def test_flow_matching_loss(benchmark, device, case, variant):
    execute(benchmark, case, variant, device)


@pytest.mark.parametrize("case,variant", params_for(flow_path_cases()))
def test_flow_path(benchmark, device, case, variant):
    execute(benchmark, case, variant, device)
