"""The build and loader: readable errors instead of undefined symbols."""

import re
import types
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

import fastmlp
from fastmlp import _loader


def test_build_info_records_the_torch_it_was_built_against():
    assert fastmlp._build_info.TORCH_VERSION.split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(fastmlp.WITH_CUDA, bool)


def test_torch_version_mismatch_says_rebuild(monkeypatch):
    fake = types.ModuleType("fastmlp._build_info")
    fake.TORCH_VERSION, fake.WITH_CUDA, fake.CUDA_ARCH_LIST = "1.13.0", False, ""
    monkeypatch.setitem(__import__("sys").modules, "fastmlp._build_info", fake)
    monkeypatch.setattr(fastmlp, "_build_info", fake, raising=False)
    with pytest.raises(ImportError, match=r"built against torch 1\.13\.0, but torch .* is running.*pip install --no-build-isolation"):
        _loader.load_extension()


def test_ops_are_registered_for_cpu_autograd_and_autocast():
    for name in ("linear_act_forward", "linear_act_backward"):
        op = getattr(torch.ops.fastmlp, name).default
        for key in ("CPU", "Autograd"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), key), (name, key)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastmlp::linear_act_forward", "AutocastCPU")


# ---- error messages are built without iostreams (csrc/checks.h, msg) ------------------------------
CSRC = Path(__file__).resolve().parent.parent / "csrc"
_CHECK = re.compile(r"\b(TORCH_CHECK(?:_VALUE|_TYPE)?|TORCH_WARN(?:_ONCE)?)\s*\(")


def _top_level_args(src, open_paren):
    """The top-level comma-separated arguments of the call whose '(' is at open_paren."""
    depth, i, start, args, quote = 0, open_paren, open_paren + 1, [], None
    while True:
        c = src[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return args + [src[start:i].strip()]
        elif c == "," and depth == 1:
            args.append(src[start:i].strip())
            start = i + 1
        i += 1


def message_parts_of_checks(src):
    """[(line, macro, message parts)] for every TORCH_CHECK* / TORCH_WARN* call in src."""
    out = []
    for m in _CHECK.finditer(src):
        if src[max(0, m.start() - 8):m.start()] == "#define ":
            continue
        args = _top_level_args(src, m.end() - 1)
        parts = args if m.group(1).startswith("TORCH_WARN") else args[1:]
        out.append((src.count("\n", 0, m.start()) + 1, m.group(1), parts))
    return out


def test_message_parser_sees_streamed_parts():
    src = 'TORCH_CHECK(a(b, c) == 1, op, ": got ", n);\nTORCH_CHECK_VALUE(x, fastmlp::msg(op, ", ", n));\n'
    assert message_parts_of_checks(src) == [(1, "TORCH_CHECK", ["op", '": got "', "n"]),
                                            (2, "TORCH_CHECK_VALUE", ['fastmlp::msg(op, ", ", n)'])]


def test_every_check_passes_one_finished_message():
    """Each TORCH_CHECK / TORCH_WARN in csrc gets at most one message argument (a literal or
    fastmlp::msg(...), which the FASTMLP_CHECK* macros pass), so c10::str never streams a number
    inside the extension: on the H200 machine that crashed the process instead of raising (see msg
    in csrc/checks.h)."""
    bad = []
    for path in sorted(CSRC.rglob("*")):
        if path.suffix not in (".h", ".cpp", ".cu", ".cuh"):
            continue
        for line, macro, parts in message_parts_of_checks(path.read_text()):
            if len(parts) > 1:
                bad.append(f"{path.relative_to(CSRC)}:{line}: {macro} with {len(parts)} message parts")
    assert not bad, "use FASTMLP_CHECK* (or wrap the message in fastmlp::msg(...)):\n" + "\n".join(bad)


@pytest.mark.parametrize("built_info", [False, True], ids=["never_built", "built_elsewhere"])
def test_source_tree_shadowing_an_install_says_so(tmp_path, built_info):
    # After `pip install .` the extension lives in site-packages; run from the checkout, Python
    # imports the checkout instead, which has no _C: the error must say that, not "rebuild".
    import shutil
    import subprocess
    import sys

    pkg = Path(fastmlp.__file__).resolve().parent
    src = tmp_path / "checkout"
    ignore = ["_C*.so", "__pycache__"] + ([] if built_info else ["_build_info.py"])
    shutil.copytree(pkg, src / "fastmlp", ignore=shutil.ignore_patterns(*ignore))
    (src / "setup.py").write_text("# a source checkout\n")
    site = tmp_path / "site"
    (site / "fastmlp").mkdir(parents=True)
    (site / "fastmlp" / "__init__.py").write_text("")
    r = subprocess.run([sys.executable, "-c", "import fastmlp"], cwd=src, capture_output=True, text=True,
                       env={**__import__("os").environ, "PYTHONPATH": str(site)}, timeout=120)
    assert r.returncode != 0
    assert f"importing the source tree {src}" in r.stderr and f"shadows the fastmlp installed in {site}" in r.stderr
    assert "run from another directory" in r.stderr


def test_sdist_ships_every_source_and_header(tmp_path):
    """`python setup.py sdist` (and `python -m build`, which builds the wheel from the sdist) must
    ship every file the build compiles or includes: without MANIFEST.in the headers were left out,
    so installing from an sdist failed to compile. The tree's build record is neither shipped nor
    rewritten (only building the extension writes it), and the sdist accepts any torch it can build
    with while a built package requires the torch release it was built against."""
    import shutil
    import subprocess
    import sys
    import tarfile

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    junk = shutil.ignore_patterns("__pycache__", "*.so", "_build_info.py", "out")
    for d in ("csrc", "fastmlp", "tests", "bench", "examples", "scripts", ".ci"):
        shutil.copytree(root / d, src / d, ignore=junk)
    for f in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy(root / f, src / f)
    wanted = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file()}
    record = src / "fastmlp" / "_build_info.py"
    record.write_text("# a built tree's record\n")
    env = {**__import__("os").environ, "FASTMLP_CUDA": "0"}

    def setup_py(*args):
        r = subprocess.run([sys.executable, "setup.py", "-q", *args], cwd=src, capture_output=True, text=True,
                           timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-3000:]

    setup_py("sdist", "-d", str(tmp_path / "dist"))
    (tarball,) = (tmp_path / "dist").glob("fastmlp-*.tar.gz")
    with tarfile.open(tarball) as tar:
        shipped = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()}
        sdist_requires = tar.extractfile(next(m for m in tar.getmembers()
                                              if m.name.endswith(".egg-info/requires.txt"))).read().decode().split()
    assert any(w.endswith(".cuh") for w in wanted) and any(w.endswith(".h") for w in wanted)
    missing = sorted(wanted - shipped)
    assert not missing, f"the sdist lacks {missing}"
    assert "fastmlp/_build_info.py" not in shipped, "the sdist ships this machine's build record"
    assert record.read_text() == "# a built tree's record\n", "setup.py sdist rewrote the tree's build record"
    assert "torch>=2.11" in sdist_requires, sdist_requires
    setup_py("egg_info", "--egg-base", str(tmp_path))  # a built package's metadata
    requires = (tmp_path / "fastmlp.egg-info" / "requires.txt").read_text().split()
    (pin,) = [req for req in map(Requirement, (r for r in requires if not r.startswith("["))) if req.name == "torch"]
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    # This release, its pre-releases (nightly and source builds) too, and nothing else.
    for version, ok in [(torch.__version__, True), (f"{major}.{minor}.0a0+git1234", True),
                        (f"{major}.{minor}.0.dev20261130", True), (f"{major}.{minor}.9", True),
                        (f"{major}.{minor - 1}.9", False), (f"{major}.{minor + 1}.0", False),
                        (f"{major}.{minor + 1}.0a0", False)]:
        assert pin.specifier.contains(version, prereleases=True) == ok, (str(pin), version)
    assert record.read_text() == "# a built tree's record\n"


INSTALL_STUB = r"""#!/usr/bin/env bash
# Stands in for python3 in scripts/install.sh: the torch probe (a script on stdin) runs in the real
# Python with a fake torch module first on its path (or none: FAKE_TORCH unset); pip, the build
# and the import check are only logged.
echo "$*" >> "$STUB_LOG"
case "$1" in
    -) if [ -n "${FAKE_TORCH:-}" ]; then PYTHONPATH="$FAKE_TORCH" exec "$REAL_PYTHON" -; fi
       cat > /dev/null; exit 1 ;;
    -c) echo "fastmlp stub ready" ;;
esac
exit 0
"""


@pytest.mark.parametrize("installed,kept", [("2.12.0+cu130", "2.12.0"), ("2.13.0a0+git1234", "2.13.0a0"),
                                            ("2.10.0+cpu", None), (None, None)])
def test_install_script_keeps_a_recent_torch(tmp_path, installed, kept):
    """scripts/install.sh leaves an installed torch >= 2.11 in place: pip gets it as a constraint
    (its public version: pip finds no candidate for a local label like +cu130), so torchvision is
    picked to match it instead of pulling in its own newest torch. An older torch, or none, gets
    no constraint: then pip installs a recent one."""
    import os
    import shutil
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(root / "scripts" / "install.sh", repo / "scripts")
    stub = tmp_path / "python3"
    stub.write_text(INSTALL_STUB)
    stub.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {**os.environ, "PYTHON": str(stub), "STUB_LOG": str(log), "REAL_PYTHON": sys.executable}
    env.pop("FAKE_TORCH", None)
    if installed is not None:
        (tmp_path / "fake" / "torch").mkdir(parents=True)
        (tmp_path / "fake" / "torch" / "__init__.py").write_text(f"__version__ = {installed!r}\n")
        env["FAKE_TORCH"] = str(tmp_path / "fake")
    r = subprocess.run(["bash", str(repo / "scripts" / "install.sh")], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    (pip,) = [c for c in log.read_text().splitlines() if c.startswith("-m pip install")]
    assert "torch>=2.11 torchvision>=0.26" in pip
    constraint = repo / "build" / "torch-constraint.txt"
    if kept is None:
        assert " -c " not in pip
    else:
        assert " -c build/torch-constraint.txt " in pip
        assert constraint.read_text().strip() == f"torch=={kept}"
        Requirement(constraint.read_text().strip())  # a valid requirement line


@pytest.mark.parametrize("refused,want", [((), "for this CPU (-march=native)"),
                                          (("-march=native",), "for this CPU (-mcpu=native)"),
                                          (("-march=native", "-mcpu=native"), "(portable)")])
def test_native_flag_is_one_the_compiler_takes(tmp_path, refused, want):
    """setup.py asks the compiler before passing -march=native (older Apple clang on arm64 refuses
    it and wants -mcpu=native): a compiler that takes neither gets the portable build, said so,
    instead of a failed build. A stand-in compiler refuses the flags named, else runs g++."""
    import os
    import shutil
    import subprocess
    import sys

    if shutil.which("g++") is None:
        pytest.skip("needs g++ for the stand-in compiler")
    cxx = tmp_path / "c++"
    cases = "|".join(refused) or "--never--"
    cxx.write_text(f'#!/bin/sh\nfor a in "$@"; do case "$a" in {cases}) exit 1;; esac; done\nexec g++ "$@"\n')
    cxx.chmod(0o755)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CXX": str(cxx), "FASTMLP_CUDA": "0"}
    env.pop("FASTMLP_NATIVE", None)
    env.pop("FASTMLP_DEBUG", None)
    # A build command's help: setup.py probes the compiler and says what it would build, building nothing.
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--help"], cwd=root, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    line = next(l for l in r.stderr.splitlines() if l.startswith("fastmlp: building"))
    assert want in line, line
    assert ("takes neither -march=native nor -mcpu=native" in r.stderr) == (len(refused) == 2)
