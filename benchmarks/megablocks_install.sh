#!/usr/bin/env bash
# MegaBlocks (dMoE, mlp_impl="grouped") for the `megablocks` contender of benchmarks/layer_bench.py,
# built from carried sdists on a machine without PyPI.
#
#   here (with network):  make megablocks-carry   # = bash benchmarks/megablocks_install.sh --download
#   on the device:        bash benchmarks/megablocks_install.sh
#                         PYTHONPATH=$PWD/build/megablocks/site python -m benchmarks.layer_bench \
#                           --device cuda --dtype bfloat16 --contenders grouped megablocks ...
#
# --download puts into $MB_DIR (default build/megablocks, git-ignored; ~18 MB):
#  * the sdists of megablocks 0.10.0, grouped_gemm 0.3.0 and stanford-stk 0.7.1, from PyPI's
#    simple index, sha256-checked (`pip download --no-binary :all:` cannot fetch them: it runs
#    each setup.py for its metadata, and megablocks' and grouped_gemm's query the GPU when
#    TORCH_CUDA_ARCH_LIST is unset, or pull torch<2.7.1 into an isolated build environment);
#  * wheels/ for the device's Python ($MB_PYVER, default 3.12): numpy and packaging (imported by
#    megablocks and stk, not dependencies of torch) and ninja (parallel builds); each is used
#    there only when the device lacks it.
#
# The install unpacks the sdists under $MB_WORK (default $MB_DIR/src), patches them (below) and
# installs each with `pip install --no-deps --no-build-isolation --no-index --target $MB_SITE`
# (default $MB_DIR/site, to put on PYTHONPATH; without a usable pip: `setup.py build_ext
# --inplace` and a copy): nothing enters the interpreter's site-packages and megablocks' pin
# torch<2.7.1 is never resolved. CXX=/usr/bin/g++ CC=/usr/bin/gcc (the device image's default
# CXX wrapper breaks C++ exceptions), TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16, the pip nvidia-*
# packages' include dirs (cublas_v2.h, ...) on CPATH. GROUPED_GEMM_CUTLASS=1 builds grouped_gemm's
# CUTLASS (Sm80 kernel) grouped GEMM instead of its default, one cuBLAS GEMM per expert (what
# `pip install grouped_gemm` gives). An $MB_SITE that already imports is kept (MB_REBUILD=1
# rebuilds). Env: PY, MB_DIR, MB_SITE, MB_WORK, MAX_JOBS, TORCH_CUDA_ARCH_LIST, MB_NO_PIP=1.
set -euo pipefail
MB_DIR=${MB_DIR:-build/megablocks}
MB_SITE=${MB_SITE:-$MB_DIR/site}
MB_WORK=${MB_WORK:-$MB_DIR/src}
SDISTS=(stanford_stk-0.7.1 grouped_gemm-0.3.0 megablocks-0.10.0)  # install order
WHEELS=(numpy==2.4.6 packaging==26.3 ninja==1.13.2)
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac  # builds cd

die() { echo "megablocks_install: ERROR: $*" >&2; exit 1; }

if [ "${1:-}" = "--download" ]; then
  mkdir -p "$MB_DIR/wheels"
  "$PY" - "$MB_DIR" stanford-stk==0.7.1 grouped_gemm==0.3.0 megablocks==0.10.0 <<'EOF'
import hashlib, json, os, re, sys, urllib.request
dest, specs = sys.argv[1], sys.argv[2:]
for spec in specs:
    name, version = spec.split("==")
    norm = re.sub(r"[-_.]+", "_", name).lower()
    req = urllib.request.Request(f"https://pypi.org/simple/{norm.replace('_', '-')}/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    files = json.load(urllib.request.urlopen(req, timeout=120))["files"]
    want = f"{norm}-{version}.tar.gz"
    sdists = [f for f in files if not f.get("yanked") and f["filename"].lower() in
              (want, want.replace("_", "-"))]
    if not sdists:
        sys.exit(f"no sdist of {spec} on PyPI")
    f = sdists[0]
    path = os.path.join(dest, want)
    if os.path.exists(path) and \
            hashlib.sha256(open(path, "rb").read()).hexdigest() == f["hashes"]["sha256"]:
        print(f"{want}: already there")
        continue
    data = urllib.request.urlopen(f["url"], timeout=300).read()
    if hashlib.sha256(data).hexdigest() != f["hashes"]["sha256"]:
        sys.exit(f"sha256 mismatch for {f['filename']}")
    with open(path, "wb") as out:
        out.write(data)
    print(f"{want}: {len(data)} bytes")
EOF
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary :all: \
    --python-version "${MB_PYVER:-3.12}" --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$MB_DIR/wheels" "${WHEELS[@]}"
  ls -l "$MB_DIR" "$MB_DIR/wheels"
  exit 0
fi

[ $# -eq 0 ] || die "unknown argument $1 (only --download)"
for f in "${SDISTS[@]}"; do
  [ -f "$MB_DIR/$f.tar.gz" ] || die "$MB_DIR/$f.tar.gz missing: run 'make megablocks-carry' on a machine with PyPI and carry build/megablocks"
done
"$PY" -c "import torch, setuptools" || die "$PY lacks torch or setuptools"
mkdir -p "$MB_SITE"
MB_DIR=$(cd "$MB_DIR" && pwd) MB_SITE=$(cd "$MB_SITE" && pwd)
IMPORTS="import torch, numpy, packaging, grouped_gemm, stk, megablocks_ops, megablocks.layers.dmoe"
if [ -z "${MB_REBUILD:-}" ] && [ -d "$MB_SITE/megablocks" ] && \
   PYTHONPATH=$MB_SITE "$PY" -W ignore -c "$IMPORTS" 2>/dev/null; then
  echo "megablocks_install: $MB_SITE already imports (MB_REBUILD=1 rebuilds)"; exit 0
fi

# A carried wheel's contents (a zip) into $2 when module $1 does not import.
unwheel() {
  "$PY" -c "import $1" 2>/dev/null && return 0
  local whl
  whl=$(ls "$MB_DIR"/wheels/"$1"-*.whl 2>/dev/null | head -1)
  [ -n "$whl" ] || die "$PY lacks $1 and no $1 wheel was carried (make megablocks-carry)"
  "$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$whl" "$2"
  echo "megablocks_install: $1 from $(basename "$whl")"
}
unwheel numpy "$MB_SITE"
unwheel packaging "$MB_SITE"
PYTHONPATH=$MB_SITE "$PY" -c "import numpy, packaging" || \
  die "the carried numpy/packaging do not import here (wheels are for Python ${MB_PYVER:-3.12})"
if ! command -v ninja >/dev/null; then  # torch's BuildExtension compiles serially without it
  whl=$(ls "$MB_DIR"/wheels/ninja-*.whl 2>/dev/null | head -1)
  if [ -n "$whl" ]; then
    "$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" \
      "$whl" "$MB_DIR/tools"
    bin=$(dirname "$(ls "$MB_DIR"/tools/ninja-*.data/scripts/ninja | head -1)")
    chmod +x "$bin/ninja" && export PATH=$bin:$PATH
  fi
  if command -v ninja >/dev/null && ninja --version >/dev/null; then
    echo "megablocks_install: ninja from $(basename "$whl")"
  else echo "megablocks_install: warning: no ninja, serial build" >&2
  fi
fi

export CXX=/usr/bin/g++ CC=/usr/bin/gcc
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export GROUPED_GEMM_CUTLASS=${GROUPED_GEMM_CUTLASS:-0}
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda
  else CUDA_HOME=$(dirname "$(dirname "$(command -v nvcc)")") || die "nvcc not found"; export CUDA_HOME
  fi
fi
# cublas_v2.h, cusparse.h, ... (included by ATen/cuda/CUDAContext.h) ship in the pip nvidia-*
# packages (nvidia/cu13/include), not in every toolkit; CPATH comes after the -I dirs, so the
# toolkit's own headers still win.
NV_INC=$("$PY" - <<'EOF'
import glob, os, site, sysconfig
roots = set()
try:
    import nvidia
    roots.update(nvidia.__path__)
except ImportError:
    pass
for sp in site.getsitepackages() + [sysconfig.get_paths()["purelib"]]:
    roots.add(os.path.join(sp, "nvidia"))
print(":".join(sorted({d for r in roots for d in glob.glob(os.path.join(r, "*", "include"))})))
EOF
)
export CPATH=${NV_INC}${CPATH:+:$CPATH} CPLUS_INCLUDE_PATH=${NV_INC}${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}

rm -rf "$MB_WORK" && mkdir -p "$MB_WORK"
MB_WORK=$(cd "$MB_WORK" && pwd)
for f in "${SDISTS[@]}"; do
  tar xzf "$MB_DIR/$f.tar.gz" -C "$MB_WORK"
done

# --- patches --------------------------------------------------------------------------------
# grouped_gemm forces -std=c++17 on nvcc; torch >= 2.10 headers require C++20 ("#error C++20 or
# later compatible compiler is required"): drop it, torch's BuildExtension adds its own -std.
sed -i '/"-std=c++17",/d' "$MB_WORK/grouped_gemm-0.3.0/setup.py"
! grep -q 'std=c++17' "$MB_WORK/grouped_gemm-0.3.0/setup.py" || die "grouped_gemm -std patch failed"
# CCCL 3 (CUDA 13) dropped cub::DeviceScan's trailing `debug_synchronous` argument (CUDA 12's
# CUB has the overload without it too).
sed -z -i 's/stream,\s*debug_synchronous))/stream))/g' "$MB_WORK/megablocks-0.10.0/csrc/cumsum.h"
! grep -q 'debug_synchronous))' "$MB_WORK/megablocks-0.10.0/csrc/cumsum.h" || die "megablocks cub patch failed"
# (megablocks' torch<2.7.1 pin and numpy<2.1 / packaging<24.2 bounds are metadata only: --no-deps.)

build_inplace() {  # without pip: build in the source tree, copy packages and extensions
  cd "$1" && "$PY" setup.py build_ext --inplace || return 1
  for d in stk grouped_gemm megablocks; do
    if [ -d "$d" ]; then rm -rf "${MB_SITE:?}/$d" && cp -r "$d" "$MB_SITE/" || return 1; fi
  done
  for so in *.so; do [ ! -e "$so" ] || cp "$so" "$MB_SITE/" || return 1; done
}
use_pip=1
if [ -n "${MB_NO_PIP:-}" ] || ! "$PY" -m pip --version >/dev/null 2>&1 || ! "$PY" -c "
import setuptools, importlib.util, sys
v = tuple(int(p) for p in setuptools.__version__.split('.')[:2])
sys.exit(0 if v >= (70, 1) or importlib.util.find_spec('wheel') else 1)"; then
  use_pip=  # no pip, or no bdist_wheel: build in place and copy
  echo "megablocks_install: building with setup.py build_ext --inplace (no usable pip)"
fi
for f in "${SDISTS[@]}"; do
  t0=$(date +%s)
  log="$MB_WORK/$f.log"
  if [ -n "$use_pip" ]; then
    "$PY" -m pip install -v --no-deps --no-build-isolation --no-index --upgrade \
      --disable-pip-version-check --target "$MB_SITE" "$MB_WORK/$f" > "$log" 2>&1 || rc=$?
  else
    (build_inplace "$MB_WORK/$f") > "$log" 2>&1 || rc=$?
  fi
  if [ "${rc:-0}" != 0 ]; then
    { grep -m 25 -E "error|FAILED" "$log"; echo ...; tail -15 "$log"; } >&2
    die "building $f failed (log: $log)"
  fi
  echo "megablocks_install: $f built+installed in $(( $(date +%s) - t0 )) s"
done
PYTHONPATH=$MB_SITE${PYTHONPATH:+:$PYTHONPATH} "$PY" -W ignore -c "$IMPORTS
print('megablocks_install: import ok ->', megablocks.layers.dmoe.__file__)" \
  || die "the built packages do not import"
echo "megablocks_install: done; use PYTHONPATH=$MB_SITE"
