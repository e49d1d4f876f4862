"""Build of fastmlp's C++/CUDA extension (fastmlp._C).

Install after torch, without build isolation (an isolated build would download a second torch):

    pip install --no-build-isolation .        # or -e . for development

Switches (environment variables):
    FASTMLP_CUDA=auto|0|1   build the CUDA kernels: auto (default) when nvcc and a CUDA build of
                            torch are present (a visible GPU is not needed); 1 requires them.
    FASTMLP_NATIVE=1|0      compile the CPU kernels for this machine's CPU (-march=native, or
                            -mcpu=native where the compiler wants that; the default: the extension
                            is built where it runs); 0 for a portable build.
    FASTMLP_DEBUG=1         -O0 -g, for debugging the kernels.
    TORCH_CUDA_ARCH_LIST    GPU architectures (default "8.0;9.0" when no GPU is visible).
    MAX_JOBS                parallel compile jobs.
"""

import glob
import importlib.util
import os
import platform
import shutil
import sys

import setuptools

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def fail(msg):
    sys.stderr.write(f"\nfastmlp build error: {msg}\n\n")
    sys.exit(1)


def find_cuda_home():
    """The real CUDA toolkit folder: the nvcc first on PATH may be a wrapper script elsewhere."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "bin", "nvcc")) and os.path.isfile(
            os.path.join(c, "include", "cuda_runtime.h")
        ):
            return c
    return None


def _setuptools_can_build_wheels():
    """setuptools < 70.1 builds wheels only through the separate `wheel` package (pip then fails
    with the unhelpful "invalid command 'bdist_wheel'"; a fresh venv's bundled setuptools is older)."""
    try:
        major, minor = (int(p) for p in setuptools.__version__.split(".")[:2])
    except ValueError:
        return True
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


if {"bdist_wheel", "dist_info", "editable_wheel"} & set(sys.argv) and not _setuptools_can_build_wheels():
    fail(f"setuptools {setuptools.__version__} needs the 'wheel' package to build a wheel. Run\n"
         "    pip install 'setuptools>=64' wheel ninja\n"
         "then install again with --no-build-isolation.")

try:
    import torch
except ImportError:
    # torch is deliberately not a build requirement (pyproject.toml): an isolated build (pip's and
    # `python -m build`'s default) would download a second torch, gigabytes with CUDA, and compile
    # against it instead of the torch that will import the extension. So such a build stops here.
    fail(
        "torch is not importable by this build. fastmlp compiles against the torch you run, so install\n"
        "torch first and build without isolation (pip and `python -m build` isolate builds by default):\n"
        "    pip install 'torch>=2.11' 'setuptools>=64' wheel ninja\n"
        "    pip install --no-build-isolation .        (or: python -m build --no-isolation)"
    )

cuda_mode = os.environ.get("FASTMLP_CUDA", "auto").lower()
if cuda_mode not in ("auto", "0", "1"):
    fail(f"FASTMLP_CUDA must be auto, 0 or 1, got {cuda_mode!r}")
cuda_home = find_cuda_home()
if cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME when imported; give it the real toolkit.
    os.environ["CUDA_HOME"] = cuda_home
# csrc/cuda: kernels in .cu (nvcc, lean includes), host entries in .cpp (the host compiler:
# a .cpp that includes ATen compiles several times faster than the same code as a .cu).
cu_sources = sorted(glob.glob("csrc/cuda/*.cu", root_dir=ROOT))
cuda_host_sources = sorted(glob.glob("csrc/cuda/*.cpp", root_dir=ROOT))
with_cuda = cuda_mode != "0" and bool(cu_sources) and torch.version.cuda is not None and cuda_home is not None
if cuda_mode == "1" and not with_cuda:
    why = (
        "this torch is a CPU-only build (install a CUDA build of torch)" if torch.version.cuda is None
        else "nvcc was not found (install the CUDA toolkit or set CUDA_HOME to its folder)" if cuda_home is None
        else "there are no CUDA sources in csrc/cuda"
    )
    fail(f"FASTMLP_CUDA=1 but the CUDA kernels cannot be built: {why}.")
if with_cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
    # With no visible GPU torch's arch detection raises IndexError; default to A100 + H100.
    if not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

debug = os.environ.get("FASTMLP_DEBUG", "0") == "1"
native = os.environ.get("FASTMLP_NATIVE", "1") == "1"
cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
# No -ffast-math: NaN/Inf must propagate like native PyTorch. -fno-trapping-math only drops the
# promise to keep FP exception flags exact; without it gcc will not turn the NaN/overflow selects
# in csrc/activation.h into blends, and the GELU/SiLU epilogue loops stay scalar.
cxx_flags += ["-fno-math-errno", "-fno-trapping-math"]
# No a*b+c contracted into one FMA: gcc contracts where it vectorises, so the vector loop body and
# its scalar remainder would round differently, and which elements fall in which one depends on
# the thread split: results then changed with torch.get_num_threads() (1 ulp in the optimizers'
# updates and the gelu gradients). Without contraction every element gets the same arithmetic,
# whatever the thread count. Measured cost: within this VM's noise.
cxx_flags.append("-ffp-contract=off")


def compiler_takes(flag):
    """Whether the C++ compiler the build will use accepts `flag` (compiles an empty file with it):
    -march=native is refused by some compilers (older Apple clang on arm64, which wants -mcpu)."""
    import subprocess  # noqa: PLC0415
    import sysconfig  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    cxx = (os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++").split()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        try:
            r = subprocess.run([*cxx, flag, "-c", src, "-o", os.path.join(tmp, "probe.o")],
                               capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return False
        return r.returncode == 0


# For this machine's CPU: -march=native where the compiler takes it, else -mcpu=native (clang on
# arm64), else the portable build, said in the build's first line instead of failing the build.
native_flag = None
if native and not debug:
    native_flag = next((f for f in ("-march=native", "-mcpu=native") if compiler_takes(f)), None)
if native_flag is not None:
    cxx_flags.append(native_flag)
    if native_flag == "-march=native" and platform.machine() in ("x86_64", "AMD64"):
        # Where this CPU has AVX-512, use its 512-bit vectors in our loops (gcc's default for
        # skylake-avx512 and later stays at 256 bits): torch's own CPU kernels dispatch to AVX-512
        # there, and at 256 bits our GELU forward and backward math ran 1.4x slower than at 512 on
        # an AVX-512 Xeon (side by side, one core). Without AVX-512 the flag changes nothing.
        cxx_flags.append("-mprefer-vector-width=512")
if not debug:
    # Python's default CFLAGS carry -g: debug info was 20 of the extension's 22 MB.
    cxx_flags.append("-g0")
# The C++ standard torch itself was built with. torch 2.11's cpp_extension defaults to C++17 while
# its headers have C++20-only branches: on the H200 machine (torch 2.11, g++ 13) every
# TORCH_CHECK message that streamed an integer segfaulted in the C++17 build, a sign of inline
# functions compiled two ways (ODR). torch 2.14 already passes -std=c++20.
cxx_flags.append("-std=c++20")
# at::parallel_for's OpenMP backend is a header template, compiled into OUR objects: without
# -fopenmp its `#pragma omp parallel` is ignored and every parallel_for in csrc/cpu runs on one
# thread (measured: the optimizer step used 1.0 CPU-seconds per wall-second with 2 threads). Compile
# only, no -fopenmp at link time: the GOMP_* calls then bind to the OpenMP runtime torch already
# loaded (its bundled libgomp) instead of pulling in a second runtime with a second thread pool.
if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
    cxx_flags.append("-fopenmp")
sources = sorted(glob.glob("csrc/*.cpp", root_dir=ROOT)) + sorted(glob.glob("csrc/cpu/*.cpp", root_dir=ROOT))
include_dirs = [os.path.join(ROOT, "csrc")]
library_dirs, libraries, extra_link = [], [], []
define_macros = []

if with_cuda:
    define_macros.append(("FASTMLP_WITH_CUDA", "1"))
    nvcc_flags = ["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]
    nvcc_flags += ["--expt-relaxed-constexpr", "-std=c++17"]
    # cuBLASLt (ours) and the libraries torch's CUDA headers include (ATen/cuda/CUDAContextLight.h:
    # cublas_v2.h, cusparse.h, cusolverDn.h) may live only in the nvidia pip packages next to torch
    # (the toolkit then lacks them), possibly spread over several site-packages (a venv with
    # --system-site-packages sees both). Those folders also hold copies of the CUDA runtime
    # headers, so each goes in as a *system* include, searched after the toolkit's -I folder: the
    # toolkit's own headers win and only what it lacks comes from pip.
    missing = [h for h in ("cublasLt.h", "cublas_v2.h", "cusparse.h", "cusolverDn.h")
               if not os.path.isfile(os.path.join(cuda_home, "include", h))]
    try:
        import nvidia

        pip_dirs = [os.path.join(base, sub) for base in nvidia.__path__ if os.path.isdir(base)
                    for sub in sorted(os.listdir(base), key=lambda d: d != "cu13")]
    except ImportError:
        pip_dirs = []
    for d in pip_dirs:
        inc, lib = os.path.join(d, "include"), os.path.join(d, "lib")
        found = [h for h in missing if os.path.isfile(os.path.join(inc, h))]
        if found:
            missing = [h for h in missing if h not in found]
            cxx_flags += ["-isystem", inc]
            nvcc_flags += ["-isystem", inc]
            if os.path.isdir(lib):
                library_dirs.append(lib)
                extra_link.append(f"-Wl,-rpath,{lib}")
    if missing:
        fail(
            f"{', '.join(missing)} not found, neither in the CUDA toolkit ({cuda_home}) nor in a pip nvidia "
            "package. Install the toolkit's math libraries (e.g. apt install cuda-libraries-dev-13-0) or "
            "the pip packages torch depends on (nvidia-cublas, nvidia-cusparse, nvidia-cusolver), or build "
            "without CUDA: FASTMLP_CUDA=0."
        )
    lt_dirs = library_dirs + [os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib")]
    if any(os.path.exists(os.path.join(d, "libcublasLt.so")) for d in lt_dirs):
        libraries.append("cublasLt")
    else:
        versioned = [f for d in lt_dirs for f in glob.glob(os.path.join(d, "libcublasLt.so.*"))]
        if versioned:
            extra_link.append("-l:" + os.path.basename(sorted(versioned, key=len)[0]))
    ext = CUDAExtension(
        "fastmlp._C",
        sources=sources + cuda_host_sources + cu_sources,
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        libraries=libraries,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=extra_link,
    )
else:
    ext = CppExtension(
        "fastmlp._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
    )


class BuildExt(BuildExtension):
    """build_ext that records, next to the extension it builds, the torch it was built against, so
    that `import fastmlp` can say "rebuild" instead of failing on an undefined symbol. Written only
    here: other setup.py commands (sdist, egg_info, --version) leave a built tree's record alone."""

    def run(self):
        super().run()
        path = os.path.join(os.path.dirname(self.get_ext_fullpath("fastmlp._C")), "_build_info.py")
        with open(path, "w") as f:
            f.write("# Written by setup.py when it built the extension.\n")
            f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
            f.write(f"WITH_CUDA = {with_cuda!r}\n")
            f.write(f"CUDA_ARCH_LIST = {os.environ.get('TORCH_CUDA_ARCH_LIST', '') if with_cuda else ''!r}\n")


# The extension only loads under the torch release it was built against (the loader checks
# major.minor), so a built package requires that release, its pre-releases included (a nightly or
# source build such as 2.15.0a0+git... is below 2.15 for pip); an sdist accepts any torch it can
# build with (but `setup.py sdist bdist_wheel` in one run builds a wheel too).
major, minor = (int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
builds = {"build", "build_ext", "bdist", "bdist_wheel", "bdist_egg", "install", "develop", "editable_wheel",
          "dist_info"}
torch_requirement = ("torch>=2.11" if "sdist" in sys.argv and not builds & set(sys.argv)
                     else f"torch>={major}.{minor}.0.dev0,<{major}.{minor + 1}")

cpu_target = (f" for this CPU ({native_flag})" if native_flag else " (portable)" if not debug else " (debug)")
compiling = bool(builds & set(sys.argv))   # (not for an sdist or egg_info, which compile nothing)
if compiling:
    print(
        f"fastmlp: building the CPU kernels{cpu_target}{' and the CUDA kernels' if with_cuda else ''}"
        + ("" if with_cuda else
           f" only ({'FASTMLP_CUDA=0' if cuda_mode == '0' else 'CPU-only torch' if torch.version.cuda is None else 'no nvcc found' if cuda_home is None else 'no CUDA sources yet'})"),
        file=sys.stderr,
    )
if compiling and native and not debug and native_flag is None:
    print("fastmlp: the C++ compiler takes neither -march=native nor -mcpu=native: building the portable CPU "
          "kernels (as FASTMLP_NATIVE=0)", file=sys.stderr)

setup(
    # fastmlp.configs holds data only (the default recipe), no __init__.py: listed by name.
    packages=find_packages(include=["fastmlp", "fastmlp.*"]) + ["fastmlp.configs"],
    install_requires=[torch_requirement, "numpy", "tqdm", "matplotlib", "pyyaml"],
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=shutil.which("ninja") is not None)},
)
