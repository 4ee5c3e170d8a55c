#!/usr/bin/env bash
# The release build as a user gets it: an sdist of the checkout (tracked and
# untracked files, ignored ones left out), a wheel built from it without the
# emulator (CRELU_EXT_TESTING unset) and, to keep it quick, without CUDA,
# installed into a fresh venv that sees PYTHON's torch, and imported from a
# folder outside the checkout; the LICENSE must ship in the sdist and the wheel.
# `make release-check` runs it.
#
#   PYTHON=.venv/bin/python JOBS=2 bash tools/release_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

mkdir "$tmp/src" "$tmp/dist" "$tmp/run"
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$tmp/src"
(cd "$tmp/src" && "$PYTHON" -c "from setuptools import build_meta; build_meta.build_sdist('$tmp/dist')" >/dev/null)
sdist=$(ls "$tmp"/dist/*.tar.gz)
echo "release-check: built $(basename "$sdist")"

env -u CRELU_EXT_TESTING CRELU_EXT_CUDA=0 MAX_JOBS="${JOBS:-2}" \
  "$PYTHON" -m pip wheel --quiet --no-build-isolation --no-deps "$sdist" -w "$tmp/dist"
wheel=$(ls "$tmp"/dist/*.whl)
echo "release-check: built $(basename "$wheel")"

# The license's text ships in both: at the sdist's top, in the wheel's metadata
# (.dist-info/licenses/ from setuptools 77 on, .dist-info/ before).
"$PYTHON" - "$sdist" "$wheel" <<'EOF'
import re
import sys
import tarfile
import zipfile
from pathlib import Path

text = Path("LICENSE").read_bytes()
sdist, wheel = sys.argv[1:]
with tarfile.open(sdist) as archive:
    found = [m.name for m in archive.getmembers() if re.fullmatch(r"[^/]+/LICENSE", m.name)]
    assert found, f"{sdist} has no LICENSE"
    assert archive.extractfile(found[0]).read() == text, f"{sdist}: LICENSE differs"
with zipfile.ZipFile(wheel) as archive:
    pattern = r"[^/]+\.dist-info/(licenses/)?LICENSE"
    found = [name for name in archive.namelist() if re.fullmatch(pattern, name)]
    assert found, f"{wheel} has no LICENSE in its .dist-info"
    assert archive.read(found[0]) == text, f"{wheel}: LICENSE differs"
print(f"release-check: LICENSE in the sdist and in the wheel ({found[0]})")
EOF

# A venv of its own, seeing PYTHON's site-packages (torch) after its own.
"$PYTHON" -m venv --without-pip "$tmp/venv"
site=$("$tmp/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" >"$site/torch-env.pth"
"$PYTHON" -m pip --python "$tmp/venv/bin/python" install --quiet --no-deps --no-index "$wheel"

cd "$tmp/run"
"$tmp/venv/bin/python" -I - "$wheel" <<'EOF'
import sys
from pathlib import Path

wheel = Path(sys.argv[1]).name
tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
assert f"-{tag}-{tag}-" in wheel, f"{wheel}: expected the {tag}-{tag} tag of a per-Python build"

import torch

# torch and its own dependencies only: the extras' packages are hidden.
for name in ("numpy", "matplotlib", "sklearn", "tqdm", "onnx", "onnxscript", "onnxruntime",
             "pytest", "hypothesis"):
    sys.modules[name] = None

import crelu_ext
from crelu_ext.testing import emulated

package = Path(crelu_ext.__file__).parent
assert str(package).startswith(sys.prefix), f"imported from {package}, not the venv"
assert crelu_ext.available_backends()[0] == "native", crelu_ext.available_backends()
test_ops = [name for name in ("emulated_crelu", "emulated64_crelu", "emulated_launch_plan")
            if hasattr(torch.ops.crelu_ext, name)]
assert not test_ops, f"the release build registers test ops: {test_ops}"
assert not emulated.AVAILABLE and "CRELU_EXT_TESTING=1" in emulated.UNAVAILABLE_REASON, (
    emulated.UNAVAILABLE_REASON
)
assert not list(package.glob("testing/*.so")), "the release build ships the emulator"
x = torch.randn(4, 256)
assert torch.equal(crelu_ext.crelu(x, -1), crelu_ext.reference.crelu(x, -1))
print(f"release-check: ok ({wheel}; emulator unavailable: {emulated.UNAVAILABLE_REASON})")
EOF
