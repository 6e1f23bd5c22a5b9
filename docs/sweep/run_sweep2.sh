#!/usr/bin/env bash
# Round 2 of the preset sweep (docs/sweep/README.md): the factors round 1 left out (teacher
# momentum and its cosine end, the teacher-temperature warm-up, crop / patch size, subset
# against epochs at equal steps, a second seed), all scored on HELD-OUT TRAIN queries
# (--knn_queries train) so that choosing a preset never looks at the test split.
# Usage: bash docs/sweep/run_sweep2.sh [OUTPUT_ROOT] [NAME ...]   (default output/sweep2, all)
set -euo pipefail
cd "$(dirname "$0")/../.."
root=${1:-output/sweep2}
shift || true
g="--teacher_temp 0.02 --out_dim 256 --lr 0.01 --freeze_last_layer 0 --drop_path_rate 0"
g="$g --local_crops_number 0 --batch_size_per_gpu 32"
configs=(
  "r_g --arch locatvit_t --epochs 4 $g"
  "r_g_seed1 --arch locatvit_t --epochs 4 $g --seed 1"
  "r_m95 --arch locatvit_t --epochs 4 $g --momentum_teacher 0.95"
  "r_m996 --arch locatvit_t --epochs 4 $g --momentum_teacher 0.996"
  "r_mconst --arch locatvit_t --epochs 4 $g --momentum_teacher_end 0.99"
  "r_tw --arch locatvit_t --epochs 4 $g --warmup_teacher_temp 0.04 --warmup_teacher_temp_epochs 2"
  "r_sub --arch locatvit_t --epochs 2 $g --subset 4096"
  "r_p7 --arch locatvit_t --epochs 4 $g --global_crops_size 28 --patch_size 7 --local_crops_size 14"
  "r_p4 --arch locatvit_t --epochs 4 $g --global_crops_size 28 --patch_size 4 --local_crops_size 12"
  "r_vit --arch vit_t --epochs 4 $g"
  "r_m95c --arch locatvit_t --epochs 4 $g --momentum_teacher 0.95 --momentum_teacher_end 0.95"
  "r_m90c --arch locatvit_t --epochs 4 $g --momentum_teacher 0.9 --momentum_teacher_end 0.9"
  "s_mconst --arch locatvit_s --epochs 4 $g --momentum_teacher_end 0.99"
)
wanted=" $* "
dirs=()
for config in "${configs[@]}"; do
  read -r name flags <<<"$config"
  [[ $# -gt 0 && $wanted != *" $name "* ]] && continue
  dirs+=("$root/$name")
  [[ -f $root/$name/checkpoint.pth && -f $root/$name/done ]] && continue
  # shellcheck disable=SC2086
  python -m dino_locat.training --output_dir "$root/$name" --vis_freq 0 --print_freq 16 \
    --knn_queries train --knn_train_images 2000 --knn_test_images 1000 $flags
  touch "$root/$name/done"
done
