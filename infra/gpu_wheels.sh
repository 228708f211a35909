#!/usr/bin/env bash
# Fill .whl/ with what a bare GPU machine lacks to run the restore job: a machine that has
# PyTorch, numpy, Pillow, pyarrow, pandas, fsspec and PyYAML but no Ray, pydantic or ISA-L, and
# no network (the lent GPU machines; see infra/gpu_check.sh, which installs them from .whl/).
#
#   infra/gpu_wheels.sh [PYTHON_VERSION]      # default 3.12, the GPU machines' Python
#
# Versions are this checkout's .venv's, so the GPU runs the code with what CI tested. Ray's wheel
# (79 MB) is repacked without what a local run never loads (its Java jars, the dashboard's web
# client, RLlib, Serve, LLM) to about 45 MB, since a GPU call carries at most 64 MiB in all.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-3.12}
[ -x .venv/bin/python ] || { echo "no .venv here: run 'make demo' or 'make test' first" >&2; exit 2; }
venv_version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }

rm -rf .whl && mkdir -p .whl/raw
pkgs=()
for name in ray pydantic pydantic_core annotated-types typing-inspection typing_extensions isal \
            jsonschema jsonschema-specifications referencing rpds-py; do
    pkgs+=("$name==$(venv_version "$name")")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl/raw "${pkgs[@]}"

python3 - .whl/raw .whl <<'EOF'
"""Copy the wheels to .whl/, Ray's without the parts a local run never imports (and its
RECORD without them, so pip checks what is left)."""
import shutil
import sys
import zipfile
from pathlib import Path

DROP = ("ray/jars/", "ray/dashboard/client/build/", "ray/rllib/", "ray/serve/", "ray/llm/")
raw, out = Path(sys.argv[1]), Path(sys.argv[2])
for wheel in sorted(raw.glob("*.whl")):
    if not wheel.name.startswith("ray-"):
        shutil.copy(wheel, out / wheel.name)
        continue
    with zipfile.ZipFile(wheel) as src, \
            zipfile.ZipFile(out / wheel.name, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if item.filename.startswith(DROP):
                continue
            data = src.read(item)
            if item.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not line.startswith(DROP)).encode()
            dst.writestr(item, data)
EOF
rm -rf .whl/raw
du -sh .whl
