#!/usr/bin/env bash
# CI, second job: the test suite on the oldest versions pyproject.toml allows (fresh virtual environment).
#
#   .ci/oldest.sh                      # all of tests/
#   .ci/oldest.sh tests/test_callback.py -k resume
#   LIGHTNING_CLIP_NAMESPACES="lightning.pytorch pytorch_lightning" .ci/oldest.sh   # one pass per namespace
#
# torch 2.6.0 exists on PyPI for Linux only as the CUDA 12.4 build (0.8 GB wheel + 2.5 GB of nvidia-* wheels,
# 5 GB installed); it runs on CPU, and its import needs the nvidia-* wheels (`--no-deps` fails on libcudart.so.12).
# Cold install: ~1.5-2 min at ~35 MB/s; tests: ~1.5 min per namespace on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg PIP_DISABLE_PIP_VERSION_CHECK=1

VENV=.venv-oldest
PYTHON=${PYTHON:-python3}

# The tested floor of every requirement in pyproject.toml; a pin above the floor written there says why.
PINS=(
    "torch==2.6.0"
    "lightning==2.4.0"
    # lightning 2.4.0 requires `pytorch-lightning` with no version: unpinned, pip would take the newest.
    "pytorch-lightning==2.4.0"
    # 2.14.0 lacks its `six` requirement (the server dies at import); < 2.17.1 serves no custom-scalars layout
    # with protobuf >= 5 (MessageToJson(including_default_value_fields=...) was removed).
    "tensorboard==2.17.1"
    # Lightning 2.4's LightningCLI requires >= 4.27.7.
    "jsonargparse[signatures]==4.27.7"
    # 0.0.2 itself is not on PyPI.
    "mnist1d==0.0.2.post1"
    "matplotlib==3.7.0"
    "pytest==7.0.0"
    # Not floors: what the pinned versions need to work together.
    "numpy<2"          # matplotlib 3.7.0 is built against numpy 1.x (torch 2.6 itself takes numpy 2)
    "setuptools<82"    # tensorboard < 2.21 imports pkg_resources, removed in setuptools 82
)

echo "== oldest: fresh $VENV"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"

start=$SECONDS
# One resolution: the pins and the project's own requirements together, so a floor in pyproject.toml above a pin
# fails here (ResolutionImpossible) instead of being silently upgraded.
pip install --quiet --progress-bar off "${PINS[@]}" -e ".[dev]"
echo "== oldest: installed in $((SECONDS - start)) s"

python - "${PINS[@]}" <<'EOF'
"""Print the versions under test; warn about each floor in pyproject.toml that is below the version tested here."""
import sys
from importlib.metadata import version

from packaging.requirements import Requirement
from packaging.version import Version

for dist in ("torch", "lightning", "pytorch-lightning", "jsonargparse", "tensorboard", "numpy", "python"):
    print(f"   {dist:18} {sys.version.split()[0] if dist == 'python' else version(dist)}")

try:
    import tomllib  # Python >= 3.11
except ImportError:
    sys.exit(0)
pins = {Requirement(p).name.lower() for p in sys.argv[1:]}
with open("pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
reqs = list(project["dependencies"]) + [r for extra in project.get("optional-dependencies", {}).values() for r in extra]
for text in reqs:
    req = Requirement(text)
    floors = [Version(s.version) for s in req.specifier if s.operator == ">="]
    tested = Version(version(req.name)) if req.name.lower() in pins else None
    if floors and tested is not None and max(floors) < tested:
        print(f"   WARNING: pyproject.toml has {text!r}, but the oldest version tested here is {tested}")
EOF

read -r -a namespaces <<<"${LIGHTNING_CLIP_NAMESPACES:-${LIGHTNING_CLIP_NAMESPACE:-lightning.pytorch}}"
(($#)) || set -- tests
for ns in "${namespaces[@]}"; do
    echo "== oldest: pytest $* (LIGHTNING_CLIP_NAMESPACE=$ns)"
    LIGHTNING_CLIP_NAMESPACE=$ns python -m pytest -q -p no:cacheprovider "$@"
done
echo "== oldest: done in $SECONDS s"
