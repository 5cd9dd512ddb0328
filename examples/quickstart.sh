#!/usr/bin/env bash
# The main job on the built-in synthetic data: prepare -> pretrain -> contrast -> finetune -> evaluate.
# Settings are scaled for ~2,000 users on a laptop CPU (smaller batches than the paper's 2048,
# which would mean one step per epoch here). Usage: examples/quickstart.sh [path/to/uclr]
set -euo pipefail
UCLR=${1:-uclr}
HERE=$(cd "$(dirname "$0")" && pwd)
DATA=data/synthetic
RUN=runs/synthetic
"$UCLR" prepare synthetic --out "$DATA"
"$UCLR" pretrain --data "$DATA" --run "$RUN" --config "$HERE"/quickstart/pretrain.toml
"$UCLR" contrast --data "$DATA" --run "$RUN" --config "$HERE"/quickstart/contrast.toml
"$UCLR" finetune --data "$DATA" --run "$RUN" --domain all --config "$HERE"/quickstart/finetune.toml
"$UCLR" evaluate --data "$DATA" --run "$RUN" --by-activity
