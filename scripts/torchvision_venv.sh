#!/usr/bin/env bash
# A separate Python environment with torchvision, for the reference processors that need it (Molmo2, Fuyu's
# torchvision processor, PixtralProcessor). mmexport itself never needs torchvision; torchvision does not import
# beside the pinned CPU torch of the main environment, so this pair (a CUDA build that runs on the CPU, ~5.5 GB)
# lives in its own venv. Usage: scripts/torchvision_venv.sh [DIR]   (default /tmp/mmexport-tv-venv), then
#   MMEXPORT_TORCHVISION_VENV=DIR python -m pytest tests/test_molmo2.py tests/test_fuyu.py tests/test_mistral3.py
# runs the opt-in tests that regenerate the golden data live, and `DIR/bin/python scripts/NAME_golden.py` rewrites it.
set -euo pipefail
DIR="${1:-/tmp/mmexport-tv-venv}"
TRANSFORMERS="$(python -c 'import transformers; print(transformers.__version__)')"
python3 -m venv "$DIR"
"$DIR/bin/pip" install -q --upgrade pip
"$DIR/bin/pip" install -q torch==2.14.1 torchvision==0.29.1 "transformers==$TRANSFORMERS" pillow "numpy<2" tokenizers safetensors
"$DIR/bin/python" -c "import torch, torchvision, transformers; print(torch.__version__, torchvision.__version__, transformers.__version__)"
