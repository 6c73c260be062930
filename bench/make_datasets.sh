#!/usr/bin/env bash
# Make the development locomotion datasets with `qipo-kernels make-dataset` (see bench/README.md).
# Usage: bash bench/make_datasets.sh AGENT_DIR
#   AGENT_DIR holds sac-HalfCheetah-v3.zip and sac-Walker2d-v3.zip (rl-trained-agents sac/<Env>-v3_1/<Env>-v3.zip)
#   and, for the medium dataset, a2c-HalfCheetah-v3.zip with a2c-HalfCheetah-v3-vecnormalize.pkl
#   (a2c/HalfCheetah-v3_1/HalfCheetah-v3.zip and a2c/HalfCheetah-v3_1/HalfCheetah-v3/vecnormalize.pkl),
#   and ppo-Walker2d-v3.zip with ppo-Walker2d-v3-vecnormalize.pkl (ppo/Walker2d-v3_1/Walker2d-v3.zip and
#   ppo/Walker2d-v3_1/Walker2d-v3/vecnormalize.pkl; trained with rl-zoo's TimeFeatureWrapper).
# Datasets go to $MINARI_DATASETS_PATH (default ~/.minari/datasets); about 6 CPU-minutes in all.
# noisy-sac: an expert plus N(0, 0.5^2) action noise (their headroom is mostly that noise:
# bench/results/qipo_stage3_findings.md section 6); medium-a2c: an A2C agent (~1/3 of the expert) with
# N(0, 0.1^2) noise, normalised against the SAC expert; medium-ppo: a PPO agent (~3/4 of the SAC expert's
# return) with N(0, 0.1^2) noise, normalised against the SAC expert.
set -euo pipefail
agents="${1:?usage: bash bench/make_datasets.sh AGENT_DIR}"
python -m qipo_kernels make-dataset --env HalfCheetah-v5 --agent "$agents/sac-HalfCheetah-v3.zip" \
    --id qipo/halfcheetah/noisy-sac-v0 --episodes 100 --noise 0.5 --seed 0
python -m qipo_kernels make-dataset --env Walker2d-v5 --agent "$agents/sac-Walker2d-v3.zip" \
    --id qipo/walker2d/noisy-sac-v0 --episodes 100 --noise 0.5 --seed 0
if [ -f "$agents/a2c-HalfCheetah-v3.zip" ]; then
    python -m qipo_kernels make-dataset --env HalfCheetah-v5 --agent "$agents/a2c-HalfCheetah-v3.zip" \
        --vecnormalize "$agents/a2c-HalfCheetah-v3-vecnormalize.pkl" --ref-agent "$agents/sac-HalfCheetah-v3.zip" \
        --id qipo/halfcheetah/medium-a2c-v0 --episodes 100 --noise 0.1 --seed 0
fi
if [ -f "$agents/ppo-Walker2d-v3.zip" ]; then
    python -m qipo_kernels make-dataset --env Walker2d-v5 --agent "$agents/ppo-Walker2d-v3.zip" \
        --vecnormalize "$agents/ppo-Walker2d-v3-vecnormalize.pkl" --time-feature 1000 \
        --ref-agent "$agents/sac-Walker2d-v3.zip" --id qipo/walker2d/medium-ppo-v0 --episodes 100 --noise 0.1 --seed 0
fi
