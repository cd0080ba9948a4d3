#!/usr/bin/env bash
# Make .venv hold exactly requirements.lock plus this project (editable), on a fresh clone or an old one.
# A stamp of the inputs makes a repeated run a fast no-op; any change to them re-runs the install.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3.11}
VENV=.venv
STAMP=$VENV/.bootstrap-stamp

stamp_inputs() {
    cat requirements.lock pyproject.toml
    # The editable install maps the top-level packages that exist when it runs,
    # so a package folder added later must trigger a reinstall too.
    ls -d -- */__init__.py 2>/dev/null || true
}
want=$(stamp_inputs | sha256sum | cut -d' ' -f1)

build_deepspeed_ops() {
    # DeepSpeed compiles its CPU shared-memory all-reduce on first tensor-parallel use (30-90 s).
    # Build it here, once per machine, so no service start or test deadline pays for it and two
    # ranks never race on the build lock. A no-op (an import, a few seconds) once built.
    DS_ACCELERATOR=cpu "$VENV/bin/python" -c \
        'from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder; ShareMemCommBuilder().load()' \
        >/dev/null 2>&1 || { echo "bootstrap: building DeepSpeed's CPU communication op failed" >&2; exit 1; }
}

build_gemm_kernel() {
    # The native kernels (engine/kernels/*.c: packed linear layers, row-exact attention) build in about
    # a second on first use; build here so a service start or a test never compiles. A no-op once built.
    "$VENV/bin/python" -c 'from engine import native; native.library()' \
        || { echo "bootstrap: building the small-GEMM kernel failed (services fall back to stock kernels)" >&2; }
}

if [[ -x $VENV/bin/python && -f $STAMP && $(<"$STAMP") == "$want" ]]; then
    build_deepspeed_ops
    build_gemm_kernel
    exit 0
fi

if [[ ! -x $VENV/bin/python ]]; then
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
        echo "bootstrap: need Python 3.11 as '$PYTHON' (set PYTHON=/path/to/python3.11)" >&2
        exit 1
    fi
    echo "bootstrap: creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi

# An interrupted install must not leave a stamp that claims success.
rm -f "$STAMP"
start=$SECONDS
echo "bootstrap: installing requirements.lock into $VENV"
# torch==2.13.0 resolves to the CPU wheel these machines' pip configuration points at (find-links).
"$VENV/bin/python" -m pip install -q -r requirements.lock
# No build isolation: the lock already brings setuptools (via torch), and isolation would fetch another one.
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
build_deepspeed_ops
build_gemm_kernel
echo "$want" >"$STAMP"
echo "bootstrap: done in $((SECONDS - start)) s"
