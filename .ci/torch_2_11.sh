#!/usr/bin/env bash
# The test suite on the GPU machine's stack, torch 2.11.0 (+cu130) on Python 3.12, beside CI's newest torch:
# a copy of the tree in build/torch-2.11/tree with its own virtualenv (build/torch-2.11/venv), built for
# sm_90 alone (the GPU machine's) and tested with the README's command. Both are kept for the next run
# (pip and the build are incremental).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
LEG=$ROOT/build/torch-2.11
VENV=$LEG/venv
mkdir -p "$LEG/tree"

# Python 3.12 from pyenv (its bare `python3.12` shim refuses while another version is the global one).
if [[ ! -x $VENV/bin/python ]]; then
  PYENV_VERSION=3.12.1 python3.12 -m venv "$VENV" 2>/dev/null || python3.12 -m venv "$VENV" || {
    echo "torch_2_11.sh: needs Python 3.12 (pyenv 3.12.1 or python3.12 on PATH)" >&2; exit 1; }
fi
"$VENV/bin/python" -m pip install -q torch==2.11.0 -r requirements.txt
"$VENV/bin/python" -c "import sys, torch; print('torch', torch.__version__, 'on Python', sys.version.split()[0])"

# The committed tree plus untracked files that are not ignored (what a clone would have, and local edits).
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$LEG/tree"
cd "$LEG/tree"
make test PYTHON="$VENV/bin/python" TORCH_CUDA_ARCH_LIST=9.0
