"""Builds the ONNX Runtime custom-op library (ort_ops/) together with the Python package.

pip's onnxruntime wheel ships the runtime but no C/C++ headers, so the headers come from
ORT_INCLUDE_DIR when set, else a system install, else Debian trixie's libonnxruntime-dev
(fetched by ort_ops/scripts/fetch_ort_headers.sh into build/). The library is a plain shared
object exporting only RegisterCustomOps; it does not link libonnxruntime.
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
SYSTEM_HEADER_DIRS = ["/usr/include/onnxruntime", "/usr/local/include/onnxruntime"]


def ort_include_dir() -> str:
    """Where onnxruntime_c_api.h lives: ORT_INCLUDE_DIR, a system install, or a fetched .deb."""
    env = os.environ.get("ORT_INCLUDE_DIR")
    if env:
        if not os.path.isfile(os.path.join(env, "onnxruntime_c_api.h")):
            sys.exit(f"ORT_INCLUDE_DIR={env} does not contain onnxruntime_c_api.h")
        return env
    for d in SYSTEM_HEADER_DIRS:
        if os.path.isfile(os.path.join(d, "onnxruntime_c_api.h")):
            return d
    script = os.path.join(HERE, "ort_ops", "scripts", "fetch_ort_headers.sh")
    dest = os.path.join(HERE, "build", "ort-headers")
    try:
        out = subprocess.run([script, dest], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as err:
        sys.exit("could not fetch the ONNX Runtime headers (set ORT_INCLUDE_DIR to a directory "
                 f"holding onnxruntime_c_api.h):\n{err.stderr}")
    return out.stdout.strip().splitlines()[-1]


class BuildOrtOps(build_ext):
    """Adds the ORT headers and names the library libmfconvert_ops.so (it is no Python module)."""

    def build_extensions(self):
        inc = ort_include_dir()
        for ext in self.extensions:
            ext.include_dirs.append(inc)
        super().build_extensions()

    def get_ext_filename(self, ext_name):
        parts = ext_name.split(".")
        return os.path.join(*parts[:-1], "libmfconvert_ops.so")

    def copy_file(self, infile, outfile, *args, **kwargs):
        """--inplace: the new library lands by rename, so processes that loaded the old one
        (it is mapped, not read) keep it intact instead of seeing it overwritten in place."""
        if not self.dry_run and os.path.isfile(infile) and not os.path.isdir(outfile):
            tmp = f"{outfile}.tmp{os.getpid()}"
            try:
                shutil.copyfile(infile, tmp)
                shutil.copymode(infile, tmp)
                os.replace(tmp, outfile)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return outfile, True
        return super().copy_file(infile, outfile, *args, **kwargs)


ops_library = Extension(
    "mfconvert.ort_ops.libmfconvert_ops",
    sources=sorted(glob.glob("ort_ops/src/*.cc")),
    include_dirs=["ort_ops/src"],
    language="c++",
    extra_compile_args=["-std=c++17", "-O3", "-fvisibility=hidden", "-fno-math-errno",
                        "-ffp-contract=off", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    extra_link_args=["-Wl,--version-script=ort_ops/src/exports.map", "-pthread"],
    depends=sorted(glob.glob("ort_ops/src/*.h")) + ["ort_ops/src/exports.map"],
)

# Guarded so that the Makefile's sanitizer build can import ort_include_dir (setuptools runs
# this file as __main__).
if __name__ == "__main__":
    setup(ext_modules=[ops_library], cmdclass={"build_ext": BuildOrtOps})
