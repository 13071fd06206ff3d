#!/usr/bin/env bash
# Print a folder holding CUTLASS's headers (include/ and tools/util/include/), for the FP4 GEMM builds.
#
# CUTLASS_DIR when set; otherwise the nvidia-cutlass wheel from PyPI (`pip download`, the registry CI
# can reach), unpacked once into FP4_CACHE_DIR (default ~/.cache/onnxq)/cutlass-<version>. The wheel
# carries the headers under cutlass_library/source/.
# Environment: PYTHON (default .venv/bin/python, else python3), CUTLASS_VERSION (default 4.2.0.0).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${CUTLASS_DIR:-}" ]]; then echo "$CUTLASS_DIR"; exit 0; fi
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
CACHE="${FP4_CACHE_DIR:-$HOME/.cache/onnxq}"
VERSION="${CUTLASS_VERSION:-4.2.0.0}"
TARGET="$CACHE/cutlass-$VERSION"
if [[ ! -f "$TARGET/include/cutlass/version.h" ]]; then
  DOWNLOAD="$CACHE/wheels"
  mkdir -p "$DOWNLOAD"
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: -d "$DOWNLOAD" "nvidia-cutlass==$VERSION" >&2
  "$PYTHON" - "$DOWNLOAD" "$TARGET" "$VERSION" <<'PY'
import sys
import zipfile
from pathlib import Path

download, target, version = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
wheel = next(download.glob(f"nvidia_cutlass-{version}-*.whl"))
prefix = "cutlass_library/source/"
wanted = (prefix + "include/", prefix + "tools/util/include/")
partial = target.with_name(target.name + ".partial")  # an interrupted unpack never looks complete
with zipfile.ZipFile(wheel) as archive:
    for name in archive.namelist():
        if name.startswith(wanted) and not name.endswith("/"):
            destination = partial / name[len(prefix):]
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(archive.read(name))
partial.rename(target)
PY
fi
echo "$TARGET"
