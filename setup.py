"""Builds the C extension ``cvmfs_like._fusell`` (the mount's binding of libfuse 3's
low-level API, see cvmfs_like/fs.py); all other metadata is in pyproject.toml.

Needs a C compiler, pkg-config and libfuse3-dev (``make install`` installs them).
"""

import subprocess

from setuptools import Extension, setup


def _fuse3_include_dirs() -> list[str]:
    try:
        out = subprocess.run(
            ["pkg-config", "--cflags-only-I", "fuse3"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return ["/usr/include/fuse3"]
    return [flag[2:] for flag in out.split() if flag.startswith("-I")]


setup(
    ext_modules=[
        Extension(
            "cvmfs_like._fusell",
            ["cvmfs_like/_fusell.c"],
            include_dirs=_fuse3_include_dirs(),
            libraries=["fuse3", "pthread"],
            extra_compile_args=["-O2", "-Wall", "-Wextra"],
        )
    ]
)
