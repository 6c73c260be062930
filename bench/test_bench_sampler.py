"""Sampling ops: integrate (every solver), consistency_sample, act (sample + score + pick), select_action.

Each test is one case x variant (torch, torch.compile, cudagraph, triton, cpp); unavailable variants
are skipped with the reason qipo_kernels.backends gives.
"""
import pytest

from bench.cases import act_cases, consistency_cases, execute, integrate_cases, params_for, select_cases


@pytest.mark.parametrize("case,variant", params_for(integrate_cases()))
def test_integrate(benchmark, device, case, variant):
    execute(benchmark, case, variant, device)


@pytest.mark.parametrize("case,variant", params_for(consistency_cases()))
def test_consistency_sample(benchmark, device, case, variant):
    execute(benchmark, case, variant, device)


@pytest.mark.parametrize("case,variant", params_for(act_cases()))
def test_act(benchmark, device, case, variant):
    execute(benchmark, case, variant, device)


@pytest.mark.parametrize("case,variant", params_for(select_cases()))
def test_select_action(benchmark, device, case, variant):
    execute(benchmark, case, variant, device)
