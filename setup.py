"""Build dcn_det with its compiled CPU kernel, against the torch already installed.

    pip install --no-build-isolation .          # wheel or install with the kernel (detectron2's and mmcv's way)
    pip wheel --no-build-isolation --no-deps .  # a wheel that carries it
    DCN_DET_WITH_OPS=0 pip install .            # pure Python: the ops run their public-API path

The kernel (``dcn_det/ops/csrc/*.cpp``, PyTorch's public C++ API) becomes ``dcn_det._C``. torch is
not a build requirement: a build that cannot see torch (pip's default build isolation) or has no working
compiler still installs, without the kernel, and says how to get it. Everything else is in pyproject.toml.
"""
import os
import runpy
import sys

from setuptools import setup

NO_KERNEL = ('dcn_det: building without the compiled CPU kernel ({}); the deformable convs will run their '
             'slower public-API path. To build it: pip install --no-build-isolation .')


def _say(message: str) -> None:
    # pip runs this file for the metadata first (egg_info / dist_info): say it once, when building
    if not {'egg_info', 'dist_info'} & set(sys.argv):
        print(message, file=sys.stderr)


def kernel_build():
    """(ext_modules, cmdclass) for the compiled kernel, or ([], {}) when it cannot or should not be built."""
    if os.environ.get('DCN_DET_WITH_OPS', '1') == '0':
        _say(NO_KERNEL.format('DCN_DET_WITH_OPS=0'))
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        _say(NO_KERNEL.format('torch is not importable in the build environment'))
        return [], {}

    class BuildKernelOrSkip(BuildExtension):
        """A failed compile (no compiler, a toolchain torch rejects) leaves a pure-Python install."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # any compiler or toolchain failure
                last = str(e).strip().splitlines()[-1] if str(e).strip() else ''
                _say(NO_KERNEL.format(f'{type(e).__name__}: {last}'))

    # The loader states the sources and flags; it imports nothing but the standard library.
    spec = runpy.run_path(os.path.join('dcn_det', 'ops', '_ext.py'))
    sources = [os.path.relpath(path) for path in spec['SOURCES']]
    kernel = CppExtension(spec['MODULE'], sources, extra_compile_args=spec['CFLAGS'], extra_link_args=['-fopenmp'])
    return [kernel], {'build_ext': BuildKernelOrSkip}


ext_modules, cmdclass = kernel_build()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
