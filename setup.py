"""Build of moe_parallel and its C++/CUDA extension moe_parallel._C.

    python setup.py build_ext --inplace      (or: pip install .)

Sources: csrc/*.cpp (op registry, shared checks, module stub) and csrc/cpu/*.cpp (every CPU
kernel) always; csrc/cuda/*.cu and csrc/cuda/*.cpp (every CUDA kernel) as well when torch is a
CUDA build and nvcc is found, compiled with MOE_PARALLEL_WITH_CUDA defined.
Environment:
    MOE_PARALLEL_NO_CUDA=1   CPU-only build even when CUDA is available.
    CUDA_HOME                CUDA toolkit (default: /usr/local/cuda, else nvcc on PATH).
    TORCH_CUDA_ARCH_LIST     GPU targets (default "8.0;9.0a"; the Hopper grouped GEMM kernels
                             need 9.0a, without it backend 'cutlass' runs its Sm80 kernels).
    MAX_JOBS                 parallel compile jobs (ninja).
    MOE_PARALLEL_CUTLASS_INCLUDE  CUTLASS include directory (default: from nvidia-cutlass).
The CUTLASS grouped GEMMs (csrc/cuda/grouped_gemm_cutlass.cu, grouped_gemm_sm90*.cu) are built
when the CUTLASS headers of the pip package nvidia-cutlass are found (MOE_PARALLEL_WITH_CUTLASS
defined); the cuBLAS grouped GEMM links the libcublas of the pip nvidia-* packages or of the
toolkit.
"""

import glob
import os
import shutil
import site
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _sources(*patterns):
    found = []
    for pattern in patterns:
        found += glob.glob(os.path.join(ROOT, pattern))
    return sorted(os.path.relpath(p, ROOT) for p in found)


def _cuda_home():
    """CUDA toolkit root holding bin/nvcc, or None. Sets CUDA_HOME for torch's helpers."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        # nvcc on PATH may be a wrapper script; the toolkit is where the real binary lives.
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = home
            return home
    return None


def _site_packages():
    return site.getsitepackages() + [site.getusersitepackages()]


def _nvidia_dirs(sub):
    """<root>/*/<sub> of the pip nvidia-* packages (cuBLAS, cuSPARSE, ... live there, not in
    every system toolkit), e.g. nvidia/cu13/include; roots: the ``nvidia`` namespace package and
    <site-packages>/nvidia."""
    roots = []
    try:
        import nvidia  # namespace package of the pip CUDA wheels

        roots += list(nvidia.__path__)
    except ImportError:
        pass
    roots += [os.path.join(sp, "nvidia") for sp in _site_packages()]
    dirs = []
    for root in roots:
        for d in sorted(glob.glob(os.path.join(root, "*", sub))):
            d = os.path.realpath(d)
            if d not in dirs:
                dirs.append(d)
    return dirs


def _cutlass_include_dir():
    """CUTLASS headers: $MOE_PARALLEL_CUTLASS_INCLUDE, else those shipped in the pip package
    nvidia-cutlass, else None."""
    given = os.environ.get("MOE_PARALLEL_CUTLASS_INCLUDE")
    if given:
        if not os.path.isfile(os.path.join(given, "cutlass", "cutlass.h")):
            raise RuntimeError(f"MOE_PARALLEL_CUTLASS_INCLUDE={given} has no cutlass/cutlass.h")
        return given
    for sp in _site_packages():
        inc = os.path.join(sp, "cutlass_library", "source", "include")
        if os.path.isfile(os.path.join(inc, "cutlass", "cutlass.h")):
            return inc
    return None


def _cublas_link_args(cuda_home):
    """Linker arguments for libcublas: the toolkit's, else the pip nvidia-* package's
    (versioned soname)."""
    dirs = [os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib")] + _nvidia_dirs("lib")
    for d in dirs:
        if os.path.isfile(os.path.join(d, "libcublas.so")):
            return [f"-L{d}", "-lcublas"]
        found = sorted(glob.glob(os.path.join(d, "libcublas.so.*")))
        if found:
            return [f"-L{d}", f"-l:{os.path.basename(found[0])}"]
    raise RuntimeError(
        "libcublas not found (looked in the CUDA toolkit and the pip nvidia-* packages); "
        "install nvidia-cublas or set MOE_PARALLEL_NO_CUDA=1"
    )


def _extension():
    import torch

    use_cuda = bool(torch.version.cuda) and not _truthy("MOE_PARALLEL_NO_CUDA")
    cuda_home = _cuda_home() if use_cuda else None
    use_cuda = cuda_home is not None

    # Imported after CUDA_HOME is settled: torch reads it when this module loads.
    from torch.utils import cpp_extension

    sources = _sources("csrc/*.cpp", "csrc/cpu/*.cpp")
    cxx_flags = ["-O3", "-fopenmp"]
    kwargs = dict(
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if not use_cuda:
        kwargs["extra_compile_args"] = {"cxx": cxx_flags}
        return cpp_extension.CppExtension("moe_parallel._C", sources, **kwargs)

    cpp_extension.CUDA_HOME = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    sources += _sources("csrc/cuda/*.cu", "csrc/cuda/*.cpp")
    kwargs["include_dirs"] += _nvidia_dirs("include")
    kwargs["define_macros"] = [("MOE_PARALLEL_WITH_CUDA", None)]
    kwargs["extra_link_args"] += _cublas_link_args(cuda_home)
    cutlass = _cutlass_include_dir()
    if cutlass is None:
        print("moe_parallel: CUTLASS headers not found (pip install --no-deps nvidia-cutlass); "
              "building without the 'cutlass' grouped GEMM backend")
        cutlass_sources = _sources("csrc/cuda/grouped_gemm_cutlass.cu",
                                   "csrc/cuda/grouped_gemm_sm90*.cu")
        sources = [s for s in sources if s not in cutlass_sources]
    else:
        kwargs["include_dirs"].append(cutlass)
        kwargs["define_macros"].append(("MOE_PARALLEL_WITH_CUTLASS", None))
    # No fast-math: the kernels promise float32/float64 accumulation results. NDEBUG: device
    # asserts in CUTLASS/CuTe headers are calls that serialize the Hopper wgmma pipeline.
    kwargs["extra_compile_args"] = {"cxx": cxx_flags, "nvcc": ["-O3", "-DNDEBUG"]}
    return cpp_extension.CUDAExtension("moe_parallel._C", sources, **kwargs)


def _ninja_available():
    """Whether ninja runs; puts the one of this Python's environment on PATH if needed."""
    if shutil.which("ninja"):
        return True
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja  # pip package

        dirs.append(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    for d in dirs:
        if os.path.isfile(os.path.join(d, "ninja")):
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
            return True
    return False


def _build_ext():
    import sysconfig

    from torch.utils.cpp_extension import BuildExtension

    base = BuildExtension.with_options(use_ninja=_ninja_available())
    # One object directory, build/temp.<platform>-<python>, for `setup.py build_ext --inplace`,
    # `pip install -e .` and `pip install .` alike (pip's editable build would otherwise compile
    # everything again in a fresh temporary directory): ninja recompiles only what changed.
    objects = os.path.join(
        ROOT, "build", f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}"
    )

    class BuildExt(base):
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = objects

    return BuildExt


# Package metadata lives in pyproject.toml; this file adds only the extension.
setup(
    packages=find_packages(include=["moe_parallel", "moe_parallel.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": _build_ext()},
    zip_safe=False,
)
