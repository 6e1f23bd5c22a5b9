#!/usr/bin/env bash
# Candidates for the README main job (LocAtViT-S, <= 10 minutes on 2 cores), scored on
# HELD-OUT TRAIN queries of the main job's probe size (--knn_queries train: a 700-image bank
# and 500 queries outside the pretraining subset), so that the choice never reads the test
# split. docs/sweep/round3/README.md#candidates-for-the-readme-main-job reads them.
# Usage: bash docs/sweep/round3/main_candidates/run_main_candidates.sh [OUTPUT_ROOT] [NAME ...]
set -euo pipefail
cd "$(dirname "$0")/../../../.."
root=${1:-output/main_candidates}
shift || true
# m_preset spells out the main preset of 2026-12-01 (the main preset is now m_study3's
# recipe at 4 epochs).
configs=(
  "ls_study_d6k --preset study --subset 6144 --epochs 2 --warmup_epochs 0.2"
  "m_preset --local_crops_number 4 --out_dim 4096 --batch_size_per_gpu 64 --epochs 3 --lr 0.002 --teacher_temp 0.04 --momentum_teacher_end 1.0 --freeze_last_layer 1 --drop_path_rate 0.1"
  "m_study3 --preset study --epochs 3"
  "m_study3_sk --preset study --epochs 3 --centering sinkhorn_knopp"
  "m_study5 --preset study --epochs 5"
  "m_study5_lr3 --preset study --epochs 5 --lr 0.003"
)
# shellcheck source=docs/sweep/round3/run_configs.sh
source docs/sweep/round3/run_configs.sh
run_configs "$root" "--arch locatvit_s --knn_queries train --print_freq 20" "$@"
