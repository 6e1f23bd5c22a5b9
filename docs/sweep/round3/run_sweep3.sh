#!/usr/bin/env bash
# Round 3 of the recipe sweep (docs/sweep/round3/README.md): horizons where DINO learns on
# 2 CPU cores. Every run sees about 57,000 image views, its schedules scaled to its own
# length (lr warm-up = 10% of the run, cosines over the whole run), and is scored on
# HELD-OUT TRAIN queries (--knn_queries train: a 2,000-image bank and 1,000 queries, all
# outside the pretraining set), so that choosing a recipe never looks at the test split.
# --subset 57000 is the whole train split minus the probe's 3,000 images.
# Usage: bash docs/sweep/round3/run_sweep3.sh [OUTPUT_ROOT] [NAME ...]
#   (default output/sweep3, all runs in order; finished runs are skipped, killed ones resume)
set -euo pipefail
cd "$(dirname "$0")/../../.."
root=${1:-output/sweep3}
shift || true
# The study recipe of round 2: global crops only, batch 32, out_dim 256, teacher
# temperature 0.02, lr 0.01, a constant teacher momentum of 0.99.
g="--preset study --knn_queries train --knn_train_images 2000 --knn_test_images 1000"
d2="--subset 28500 --epochs 2 --warmup_epochs 0.2"
configs=(
  "lt_d28k --arch locatvit_t $g $d2"
  "vt_d28k --arch vit_t $g $d2"
  "lt_d57k --arch locatvit_t $g --subset 57000 --epochs 1 --warmup_epochs 0.1"
  "lt_d28k_koleo --arch locatvit_t $g $d2 --koleo_loss_weight 0.1"
  "lt_d28k_sk --arch locatvit_t $g $d2 --centering sinkhorn_knopp"
  "lt_d2k --arch locatvit_t $g --subset 2375 --epochs 24 --warmup_epochs 2.4"
  "lt_d14k --arch locatvit_t $g --subset 14250 --epochs 4 --warmup_epochs 0.4"
  "lt_d28k_lr003 --arch locatvit_t $g $d2 --lr 0.003"
  "lt_d28k_wu0 --arch locatvit_t $g --subset 28500 --epochs 2 --warmup_epochs 0"
  "lt_d28k_t04 --arch locatvit_t $g $d2 --teacher_temp 0.04"
  "lt_d28k_tw --arch locatvit_t $g $d2 --warmup_teacher_temp 0.04 --warmup_teacher_temp_epochs 1"
  "lt_d28k_mcos --arch locatvit_t $g $d2 --momentum_teacher 0.99 --momentum_teacher_end 1.0"
  "lt_d28k_k1024 --arch locatvit_t $g $d2 --out_dim 1024"
  "lt_d28k_local --arch locatvit_t $g $d2 --local_crops_number 2"
  "lt_d28k_p4 --arch locatvit_t $g $d2 --patch_size 4 --local_crops_size 16"
  "vt_d28k_koleo --arch vit_t $g $d2 --koleo_loss_weight 0.1"
  "vt_d28k_sk --arch vit_t $g $d2 --centering sinkhorn_knopp"
  # Second seeds (finalists and the two DINOv2 options), identical apart from --seed.
  "lt_d28k_s1 --arch locatvit_t $g $d2 --seed 1"
  "vt_d28k_s1 --arch vit_t $g $d2 --seed 1"
  "lt_d28k_koleo_s1 --arch locatvit_t $g $d2 --koleo_loss_weight 0.1 --seed 1"
  "lt_d28k_sk_s1 --arch locatvit_t $g $d2 --centering sinkhorn_knopp --seed 1"
  "lt_d28k_lr003_s1 --arch locatvit_t $g $d2 --lr 0.003 --seed 1"
  "lt_d28k_k1024_s1 --arch locatvit_t $g $d2 --out_dim 1024 --seed 1"
  "vt_d28k_koleo_s1 --arch vit_t $g $d2 --koleo_loss_weight 0.1 --seed 1"
  "vt_d28k_sk_s1 --arch vit_t $g $d2 --centering sinkhorn_knopp --seed 1"
)
# shellcheck source=docs/sweep/round3/run_configs.sh
source docs/sweep/round3/run_configs.sh
run_configs "$root" "--vis_freq 0 --print_freq 50" "$@"
