#!/usr/bin/env bash
# Creates .venv and installs o2mkd-ray with the right torch for this host.
#   O2MKD_TORCH  torch requirement to install first (default torch==2.13.0: the CPU wheel that lies on
#                these dev machines' disk via pip's find-links; on a GPU host PyPI serves the CUDA build)
#   O2MKD_TORCH_INDEX  optional --index-url for torch (e.g. https://download.pytorch.org/whl/cu124)
#   O2MKD_EXTRAS  extras to install (default: test)
#   O2MKD_CONSTRAINTS  pip constraints file (default constraints.txt: the versions CI tested; "" for none)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  if [ -n "${O2MKD_TORCH_INDEX:-}" ]; then
    $PIP install -q "${O2MKD_TORCH:-torch==2.13.0}" --index-url "$O2MKD_TORCH_INDEX"
  else
    $PIP install -q "${O2MKD_TORCH:-torch==2.13.0}"
  fi
fi
CONSTRAINTS=${O2MKD_CONSTRAINTS-constraints.txt}
# what the install depends on: when none of it changed since the last successful setup, pip is not run again
# (a no-op `pip install -e` re-resolves every dependency: about 25 s here, paid by every `make demo` / `make test`)
STAMP=.venv/.o2mkd-setup
KEY=$(cat pyproject.toml ${CONSTRAINTS:+"$CONSTRAINTS"} | sha256sum | cut -d' ' -f1)"|${O2MKD_EXTRAS:-test}|$CONSTRAINTS"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ] && .venv/bin/python -c "import o2mkd_ray" >/dev/null 2>&1; then
  echo "setup: .venv is up to date with pyproject.toml and ${CONSTRAINTS:-no constraints} (rm $STAMP to reinstall)"
  exit 0
fi
rm -f "$STAMP"
$PIP install -q -e ".[${O2MKD_EXTRAS:-test}]" ${CONSTRAINTS:+-c "$CONSTRAINTS"}
.venv/bin/python -c "import o2mkd_ray, torch, ray, diffusers; print('o2mkd-ray', o2mkd_ray.__version__, '| torch', torch.__version__, '| ray', ray.__version__, '| diffusers', diffusers.__version__)"
echo "$KEY" > "$STAMP"
