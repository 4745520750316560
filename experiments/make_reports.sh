#!/bin/bash
# Aggregate the reference runs (runs/experiments/*) into the reports quoted by
# docs/results.md, and keep a copy of every run's results.json/csv under
# experiments/results/ so the tables can be re-derived without retraining:
#   bash experiments/make_reports.sh
set -e
cd "$(dirname "$0")/.."
R=runs/experiments
rep() { out=$1; shift; dirs=(); for d in "$@"; do [ -d "$R/$d" ] && dirs+=("$R/$d"); done
  if [ ${#dirs[@]} -gt 0 ]; then coinfer report "${dirs[@]}" --out "docs/results/$out" > /dev/null && echo "docs/results/$out"; fi; }
rep mnist_k2r1 mnist_class-split_k2r1 mnist_dirichlet_k2r1 mnist_iid_k2r1
rep mnist_class-split_k mnist_class-split_k2r1 mnist_class-split_k3r1 mnist_class-split_k4r1 mnist_class-split_k3r2
rep fashion_k2r1 fashion_class-split_k2r1 fashion_dirichlet_k2r1 fashion_iid_k2r1
rep cifar10_reduced cifar10_class-split_k2r1_reduced cifar10_dirichlet_k2r1_reduced cifar10_iid_k2r1_reduced
# the heads runs (each config rerun as <config>_heads), and the tables that lead docs/results.md
rep heads_mnist_class-split_k mnist_class-split_k2r1_heads mnist_class-split_k3r1_heads mnist_class-split_k4r1_heads mnist_class-split_k3r2_heads
rep heads_mnist_k2r1 mnist_class-split_k2r1_heads mnist_dirichlet_k2r1_heads mnist_iid_k2r1_heads
rep heads_fashion_k2r1 fashion_class-split_k2r1_heads fashion_dirichlet_k2r1_heads fashion_iid_k2r1_heads
rep heads_cifar10_reduced cifar10_class-split_k2r1_reduced_heads cifar10_dirichlet_k2r1_reduced_heads cifar10_iid_k2r1_reduced_heads
for f in $R/*/seed*/results.*; do
  d=experiments/results/$(basename $(dirname $(dirname $f)))/$(basename $(dirname $f)); mkdir -p $d; cp $f $d/
done
python experiments/summarize_heads.py > docs/results/heads_summary.md && echo docs/results/heads_summary.md
# the ViT and MNIST k = 4 runs (seed 0), and their table in docs/results.md
rep vit_fashion fashion_class-split_k2r1_vit fashion_class-split_k2r1_vit_coin fashion_class-split_k4r1_vit fashion_class-split_k4r1_vit_cost2
rep mnist_k4_seed0 mnist_class-split_k4r1_seed0 mnist_mlp_class-split_k4r1_seed0
python experiments/summarize_modern.py > docs/results/modern_summary.md && echo docs/results/modern_summary.md
python experiments/quote_table.py docs/results.md modern docs/results/modern_summary.md
# the lead table's heads cells (seed 0) against a rerun of the same configs with the current code
python experiments/summarize_regression.py > docs/results/regression_summary.md && echo docs/results/regression_summary.md
python experiments/quote_table.py docs/results.md regression docs/results/regression_summary.md
# corrupt workers (model coding, r = 2) and the Berrut code over queries
python benchmarks/summarize_coding.py byzantine > docs/results/byzantine_summary.md
python benchmarks/summarize_coding.py query > docs/results/query_summary.md
python experiments/quote_table.py docs/results.md byzantine docs/results/byzantine_summary.md
python experiments/quote_table.py docs/results.md query docs/results/query_summary.md
# ResNet-20 at full width on CIFAR-10
python experiments/summarize_run.py cifar10_class-split_k2r1_resnet20 > docs/results/resnet20_summary.md
python experiments/quote_table.py docs/results.md resnet20 docs/results/resnet20_summary.md
