"""Build the llama.cpp that `llama-cpp-python` vendors (its sdist from PyPI), for checking GGUF exports.

    python scripts/build_llama_cpp.py                    # into ~/.cache/optimum-fair/llama.cpp-<version>
    python scripts/build_llama_cpp.py --cache-dir DIR --jobs 2

Builds the shared libraries, `llama-diffusion-cli`, `llama-quantize` and `llama-imatrix` (CPU, native
flags) and keeps the sdist's Python bindings beside them. A finished build (the binaries present) is
reused. Prints the folder; in it `bin/` holds the libraries and the CLI, `python/` the `llama_cpp` package (point
LLAMA_CPP_LIB_PATH at `bin/`). Needs pip, cmake, ninja and a C++ compiler; it took 17 minutes from scratch
on the 2-core AMD EPYC (2026-12-07, beside other jobs: the cache's file times run from 07:00:48 to 07:17:35);
each step, and every tenth of the compile, is reported on stderr.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python; its vendored llama.cpp has the llada / dream models and examples/diffusion
TARGETS = ["llama", "llama-diffusion-cli", "llama-quantize", "llama-imatrix"]
TOOLS = TARGETS[1:]  # the executables in bin/


def default_cache() -> Path:
    default = Path.home() / ".cache" / "optimum-fair" / f"llama.cpp-{VERSION}"
    return Path(os.environ.get("OPTIMUM_FAIR_LLAMA_CPP", default))


def is_built(cache: Path) -> bool:
    return all((cache / "bin" / tool).is_file() for tool in (*TOOLS, "libllama.so")) \
        and (cache / "python" / "llama_cpp" / "__init__.py").is_file()


def build(cache: Path, jobs: int) -> Path:
    """Download, configure and build into `cache` (reused when already built)."""
    if is_built(cache):
        return cache
    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"building llama.cpp needs {tool} on PATH")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        _say(f"building llama.cpp {VERSION} into {cache} (about 17 minutes on 2 cores): downloading the sdist")
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={VERSION}", "--no-deps",
                        "--no-binary", ":all:", "-d", tmp, "-q"], check=True)
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        src = next(Path(tmp).glob("llama_cpp_python-*/"))
        build_dir = Path(tmp) / "build"
        _say("configuring (cmake)")
        subprocess.run(["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(build_dir), "-G", "Ninja",
                        "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_NATIVE=ON",
                        "-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON"],  # bin/ finds its libraries after the copy
                       check=True, stdout=subprocess.DEVNULL)
        _compile(["ninja", "-C", str(build_dir), f"-j{jobs}", *TARGETS])
        for name in ("bin", "python"):  # a half-finished earlier build
            old = cache / name
            if old.is_symlink() or old.is_file():
                old.unlink()
            elif old.is_dir():
                shutil.rmtree(old)
        shutil.copytree(build_dir / "bin", cache / "bin", symlinks=True)
        (cache / "python").mkdir()
        shutil.copytree(src / "llama_cpp", cache / "python" / "llama_cpp")
    return cache


def _say(text: str) -> None:
    print(f"build_llama_cpp: {text}", file=sys.stderr, flush=True)


def _compile(command: list[str]) -> None:
    """Run ninja, reporting every tenth of its steps ("[12/345] Building ...") instead of its ~300 lines."""
    _say(f"compiling {', '.join(TARGETS)}")
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        tail = progress_lines(proc.stdout, _say)
    if proc.returncode:
        sys.stderr.write("".join(tail))
        raise subprocess.CalledProcessError(proc.returncode, command)


def progress_lines(lines, say, every: float = 0.1) -> list[str]:
    """Call `say` each time ninja's "[done/total]" passes another `every` of the total; return the last 40
    lines (shown when the build fails)."""
    tail: list[str] = []
    shown = 0.0
    for line in lines:
        tail = (tail + [line])[-40:]
        step = re.match(r"\[(\d+)/(\d+)\]", line)
        if step:
            done, total = int(step.group(1)), int(step.group(2))
            if total and done / total >= shown + every - 1e-9:
                shown = done / total
                say(f"compiled {done}/{total} ({100 * done // total}%)")
    return tail


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=default_cache())
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    print(build(args.cache_dir, args.jobs))


if __name__ == "__main__":
    main()
