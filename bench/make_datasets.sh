#!/usr/bin/env bash
# Make the two development locomotion datasets with `qipo-kernels make-dataset` (see bench/README.md).
# Usage: bash bench/make_datasets.sh AGENT_DIR   (AGENT_DIR holds sac-HalfCheetah-v3.zip, sac-Walker2d-v3.zip)
# Datasets go to $MINARI_DATASETS_PATH (default ~/.minari/datasets); about 5 CPU-minutes in all.
set -euo pipefail
agents="${1:?usage: bash bench/make_datasets.sh AGENT_DIR}"
python -m qipo_kernels make-dataset --env HalfCheetah-v5 --agent "$agents/sac-HalfCheetah-v3.zip" \
    --id qipo/halfcheetah/noisy-sac-v0 --episodes 100 --noise 0.5 --seed 0
python -m qipo_kernels make-dataset --env Walker2d-v5 --agent "$agents/sac-Walker2d-v3.zip" \
    --id qipo/walker2d/noisy-sac-v0 --episodes 100 --noise 0.5 --seed 0
