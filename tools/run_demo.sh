#!/usr/bin/env bash
# The main job end to end on an embedded dataset: scikit-learn's handwritten digits (1797 real images,
# 10 classes) written as class folders at 32x32, then the user flow of the README: instantiate the
# mobilenet_v3_large_1 template, train from scratch within a time budget, evaluate, compress to int8 (NNCF's
# post-training quantization of the OpenVINO IR, within a 1-point top-1 budget), export to OpenVINO IR and
# ONNX (parity-checked), evaluate the IR, predict with it and evaluate the predictions end to end; a summary
# of every step's result and time at the end. About 3 minutes on 2 CPU cores (README: measured figures).
#
#   DEMO_DIR      where everything goes (default: ./demo_output)
#   TIME_BUDGET   training time budget in seconds: train.py fits its epochs to it (default: 90)
#   EPOCHS        at most this many epochs (default: 12)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${ROOT}/.venv/bin/python"
[ -x "${PYTHON}" ] || { echo "error: ${ROOT}/.venv is missing; run ./init_venv.sh first" >&2; exit 1; }
DEMO_DIR="$(mkdir -p "${DEMO_DIR:-${ROOT}/demo_output}" && cd "${DEMO_DIR:-${ROOT}/demo_output}" && pwd)"
TIME_BUDGET="${TIME_BUDGET:-90}"
EPOCHS="${EPOCHS:-12}"
DATA_DIR="${DEMO_DIR}/digits"
WORK_DIR="${DEMO_DIR}/my_model"
TIMES="${DEMO_DIR}/step_seconds.txt"

rm -rf "${DATA_DIR}" "${WORK_DIR}" "${TIMES}"
started=${SECONDS}
step() {  # step NAME COMMAND...: runs it and records its wall time
  local name=$1 begin=${SECONDS}
  shift
  "$@"
  echo "${name} $((SECONDS - begin))" >> "${TIMES}"
}

step data "${PYTHON}" "${ROOT}/tools/make_digits_dataset.py" "${DATA_DIR}" --size 32
cd "${ROOT}/models/image_classification"
MODEL_TEMPLATE=$(realpath ./model_templates/custom-classification/mobilenet_v3_large_1/template.yaml)
step instantiate "${PYTHON}" ../../tools/instantiate_template.py "${MODEL_TEMPLATE}" "${WORK_DIR}" --do-not-load-snapshot
export TRAIN_DATA_ROOT=${DATA_DIR}/train VAL_DATA_ROOT=${DATA_DIR}/val TEST_DATA_ROOT=${DATA_DIR}/val
cd "${WORK_DIR}"
# 32x32 digits: the template's 224x224 input is overridden; everything else is the template's defaults, whose
# `auto` values train.py decides from the data and the budget and logs (epochs that fit the time budget, batch,
# optimizer, schedule, LR finder, small-input stem, SAM and the auxiliary model).
step train "${PYTHON}" train.py --train-ann-files '' --train-data-roots "${TRAIN_DATA_ROOT}" \
                     --val-ann-files '' --val-data-roots "${VAL_DATA_ROOT}" --save-checkpoints-to "${WORK_DIR}/outputs" \
                     --time-budget "${TIME_BUDGET}" --epochs "${EPOCHS}" input.size=[32,32]
step eval "${PYTHON}" eval.py --load-weights "${WORK_DIR}/outputs/best.pth" --test-ann-files '' \
                    --test-data-roots "${TEST_DATA_ROOT}" --save-metrics-to "${WORK_DIR}/metrics.yaml"
# Int8: post-training quantization of the exported IR (fine-tuning only if the int8 IR loses more than the
# budget); prints float vs int8 top-1 and writes the int8 IR to outputs_int8/export/.
step compress "${PYTHON}" compress.py --load-weights "${WORK_DIR}/outputs/best.pth" --train-ann-files '' \
                        --train-data-roots "${TRAIN_DATA_ROOT}" --val-ann-files '' --val-data-roots "${VAL_DATA_ROOT}" \
                        --save-checkpoints-to "${WORK_DIR}/outputs_int8" --nncf-quantization
# Deployment: export (parity-checked against PyTorch on validation images), measure the shipped IR,
# then predict with it and evaluate those predictions against the ground truth.
step export "${PYTHON}" export.py --load-weights "${WORK_DIR}/outputs/best.pth" --save-model-to "${WORK_DIR}/export"
step eval_ir "${PYTHON}" eval.py --load-weights "${WORK_DIR}/export/model.xml" --test-data-roots "${TEST_DATA_ROOT}" \
                    --save-metrics-to "${WORK_DIR}/export/metrics.yaml"
step predict "${PYTHON}" predict.py --load-weights "${WORK_DIR}/export/model.xml" --input "${TEST_DATA_ROOT}" \
                       --save-to "${WORK_DIR}/predictions"
step eval_predictions "${PYTHON}" eval.py --preds "${WORK_DIR}/predictions" --gts "${DATA_DIR}/val_ground_truth.json"
"${PYTHON}" "${ROOT}/tools/demo_summary.py" "${WORK_DIR}" "${TIMES}" "$((SECONDS - started))"
