#!/usr/bin/env bash
# The one way a subq node is built: the launcher's setup commands (ray_cluster.yaml), the project image
# (Dockerfile) and tests/test_cluster_check.py's sandbox test all run this script from a checkout.
#
#   bash cluster/install_node.sh cpu|gpu [PIP_OPTION...]
#
#   cpu  torch's CPU build (index $SUBQ_TORCH_INDEX_URL, default https://download.pytorch.org/whl/cpu: no CUDA
#        download on CPU nodes)
#   gpu  torch's CUDA build (index $SUBQ_TORCH_INDEX_URL, default PyPI: its Linux x86_64 wheel is the CUDA one)
#
# then this checkout, editable: pyproject.toml pins Ray (ray[train,serve,data]==...) and torch, so the node gets
# exactly the pinned versions. Nothing else: no sudo, no system packages, no venv of its own. It installs into
# the `python` first on PATH ($SUBQ_PYTHON overrides): the rayproject/ray image's Python, or an activated venv.
# PIP_OPTIONs go to every pip call (e.g. --find-links DIR for a local wheel cache).
set -euo pipefail

kind="${1:-}"
if [ "$#" -gt 0 ]; then shift; fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${SUBQ_PYTHON:-python}"

case "$kind" in
  cpu) index="${SUBQ_TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;;
  gpu) index="${SUBQ_TORCH_INDEX_URL:-https://pypi.org/simple}" ;;
  *) echo "usage: bash cluster/install_node.sh cpu|gpu [PIP_OPTION...]" >&2; exit 2 ;;
esac

torch_pin="$(grep -oE '"torch==[^"]+"' "$root/pyproject.toml" | head -n1 | tr -d '"')"
if [ -z "$torch_pin" ]; then
  echo "install_node.sh: no torch==X pin in $root/pyproject.toml" >&2; exit 2
fi

echo "install_node.sh: $kind node, $("$py" -c 'import sys; print(sys.executable, sys.version.split()[0])'), $torch_pin from $index"
"$py" -m pip install -q "$@" "$torch_pin" --index-url "$index"
"$py" -m pip install -q "$@" -e "$root"
"$py" -c "import ray, torch, subq, actors, pipelines, training, cluster; print('install_node.sh: ray', ray.__version__, 'torch', torch.__version__)"
