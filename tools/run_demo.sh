#!/usr/bin/env bash
# The main job end to end on an embedded dataset: scikit-learn's handwritten digits (1797 real images,
# 10 classes) written as class folders at 32x32, then the user flow of the README: instantiate the
# mobilenet_v3_large_1 template, train from scratch, evaluate, compress to int8 (NNCF, within a 1-point top-1
# budget), export to OpenVINO IR and ONNX (parity-checked), evaluate the IR, predict with it and evaluate the
# predictions end to end.  About 6 minutes on 2 CPU cores.
#
#   DEMO_DIR   where everything goes (default: ./demo_output)
#   EPOCHS     training epochs (default: 12)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${ROOT}/.venv/bin/python"
[ -x "${PYTHON}" ] || { echo "error: ${ROOT}/.venv is missing; run ./init_venv.sh first" >&2; exit 1; }
DEMO_DIR="$(mkdir -p "${DEMO_DIR:-${ROOT}/demo_output}" && cd "${DEMO_DIR:-${ROOT}/demo_output}" && pwd)"
EPOCHS="${EPOCHS:-12}"
DATA_DIR="${DEMO_DIR}/digits"
WORK_DIR="${DEMO_DIR}/my_model"

rm -rf "${DATA_DIR}" "${WORK_DIR}"
"${PYTHON}" "${ROOT}/tools/make_digits_dataset.py" "${DATA_DIR}" --size 32

cd "${ROOT}/models/image_classification"
MODEL_TEMPLATE=$(realpath ./model_templates/custom-classification/mobilenet_v3_large_1/template.yaml)
"${PYTHON}" ../../tools/instantiate_template.py "${MODEL_TEMPLATE}" "${WORK_DIR}" --do-not-load-snapshot
export TRAIN_DATA_ROOT=${DATA_DIR}/train VAL_DATA_ROOT=${DATA_DIR}/val TEST_DATA_ROOT=${DATA_DIR}/val
cd "${WORK_DIR}"
# 32x32 digits: the template's 224x224 input is overridden; everything else is the template's defaults, whose
# `auto` values train.py decides from the data and the epochs and logs (batch, optimizer, schedule, LR finder,
# small-input stem, SAM and the auxiliary model).
"${PYTHON}" train.py --train-ann-files '' --train-data-roots "${TRAIN_DATA_ROOT}" \
                     --val-ann-files '' --val-data-roots "${VAL_DATA_ROOT}" --save-checkpoints-to "${WORK_DIR}/outputs" \
                     --epochs "${EPOCHS}" input.size=[32,32]
"${PYTHON}" eval.py --load-weights "${WORK_DIR}/outputs/best.pth" --test-ann-files '' \
                    --test-data-roots "${TEST_DATA_ROOT}" --save-metrics-to "${WORK_DIR}/metrics.yaml"
# Int8: post-training quantization (fine-tuning only if the int8 IR loses more than the budget); prints
# float vs int8 top-1 and writes the int8 IR to outputs_int8/export/.
"${PYTHON}" compress.py --load-weights "${WORK_DIR}/outputs/best.pth" --train-ann-files '' \
                        --train-data-roots "${TRAIN_DATA_ROOT}" --val-ann-files '' --val-data-roots "${VAL_DATA_ROOT}" \
                        --save-checkpoints-to "${WORK_DIR}/outputs_int8" --nncf-quantization
# Deployment: export (parity-checked against PyTorch on validation images), measure the shipped IR,
# then predict with it and evaluate those predictions against the ground truth.
"${PYTHON}" export.py --load-weights "${WORK_DIR}/outputs/best.pth" --save-model-to "${WORK_DIR}/export"
"${PYTHON}" eval.py --load-weights "${WORK_DIR}/export/model.xml" --test-data-roots "${TEST_DATA_ROOT}" \
                    --save-metrics-to "${WORK_DIR}/export/metrics.yaml"
"${PYTHON}" predict.py --load-weights "${WORK_DIR}/export/model.xml" --input "${TEST_DATA_ROOT}" \
                       --save-to "${WORK_DIR}/predictions"
"${PYTHON}" eval.py --preds "${WORK_DIR}/predictions" --gts "${DATA_DIR}/val_ground_truth.json"
echo
echo "Demo finished. Results:"
echo "  work dir          ${WORK_DIR}"
echo "  checkpoints, logs ${WORK_DIR}/outputs (best.pth, latest.pth, train.log, history.csv, training_curves.png)"
echo "  metrics           ${WORK_DIR}/metrics.yaml (+ confusion_matrix.png)"
echo "  TensorBoard       tensorboard --logdir ${WORK_DIR}/outputs/tensorboard"
echo "  int8 model        ${WORK_DIR}/outputs_int8 (best.pth, export/model.xml, metrics.yaml: float vs int8)"
echo "  exported models   ${WORK_DIR}/export (model.xml + model.bin, model.onnx, parity.yaml, metrics.yaml of the IR)"
echo "  predictions       ${WORK_DIR}/predictions (one JSON per image, summary.csv, eval_results.txt)"
