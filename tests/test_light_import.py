import subprocess
import sys

HEAVY = ("tensorflow", "keras", "tf_keras", "torch", "coremltools", "tf2onnx")


def test_sdk_imports_no_heavy_framework():
    code = (
        "import sys, derm, derm.cli, derm.splits, derm.datasets, derm.classifier, derm.triage, derm.manifest\n"
        "derm.default_taxonomy()\n"
        f"heavy = [m for m in sys.modules if m.split('.')[0] in {HEAVY!r}]\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"SDK import pulled in: {result.stdout} {result.stderr}"
