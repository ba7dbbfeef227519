#!/usr/bin/env bash
# On a lent GPU machine (no TensorFlow, no internet): install the wheels carried in .device/p1/whl, then train one
# job under Keras' JAX backend from the carried parts and write what comes back into $OUT.
#   bash trainer/gpu_finetune.sh ham-fold --fold 0 --set time_budget_s=300
# See docs/training.md, "On a lent GPU", for the calls that carry the parts first.
set -euo pipefail
cd "$(dirname "$0")/.."
site="${DERM_SITE:-/tmp/derm-site}"
wheels=(.device/p1/whl/*.whl)
if [ -e "${wheels[0]}" ] && [ ! -f "$site/.installed" ]; then  # none when packed with --no-wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}"
  touch "$site/.installed"
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" KERAS_BACKEND="${KERAS_BACKEND:-jax}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec python3 -m derm.trainer.device run "$@"
