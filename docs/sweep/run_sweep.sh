#!/usr/bin/env bash
# The preset sweep of docs/sweep/README.md: each configuration is one DINO run on the embedded
# Fashion-MNIST with the online k-NN on (teacher and student 20-NN top-1 before the first step
# and after every epoch), run one after another; then the table and figure.
# Usage: bash docs/sweep/run_sweep.sh [OUTPUT_ROOT]   (default output/sweep; finished runs are kept)
set -euo pipefail
cd "$(dirname "$0")/../.."
root=${1:-output/sweep}
base="--teacher_temp 0.02 --out_dim 256 --lr 0.01 --freeze_last_layer 0 --drop_path_rate 0"
configs=(
  "s_preset --arch locatvit_s"
  "t_preset --arch locatvit_t --epochs 4"
  "t_a --arch locatvit_t --epochs 4 $base"
  "t_d --arch locatvit_t --epochs 4 ${base/--lr 0.01/--lr 0.03}"
  "t_c --arch locatvit_t --epochs 4 $base --local_crops_scale 0.2 0.5 --global_crops_scale 0.5 1.0"
  "t_e --arch locatvit_t --epochs 4 $base --local_crops_number 0"
  "t_g --arch locatvit_t --epochs 4 $base --local_crops_number 0 --batch_size_per_gpu 32"
  "s_a --arch locatvit_s $base --local_crops_number 0 --batch_size_per_gpu 32 --subset 4096 --epochs 3"
  "t_h --arch locatvit_t --epochs 4 $base --local_crops_number 0 --batch_size_per_gpu 16"
)
dirs=()
for config in "${configs[@]}"; do
  read -r name flags <<<"$config"
  dirs+=("$root/$name")
  # shellcheck disable=SC2086
  python -m dino_locat.training --output_dir "$root/$name" --vis_freq 0 --print_freq 8 \
    --knn_train_images 2000 --knn_test_images 1000 $flags
done
python eval/knn_curves.py --runs "${dirs[@]}" --output_dir docs/sweep \
  --title "Preset sweep: online 20-NN top-1 (2,000-image bank, 1,000 test queries)"
