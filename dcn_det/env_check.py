"""Check the mmcv install before anything imports ``mmcv.ops``.

Without this, an mmcv built without its compiled ops (``mmcv-lite``, or a wheel built with
``MMCV_WITH_OPS=0``) surfaces as a deep ``ModuleNotFoundError: mmcv._ext`` traceback from inside
mmdet. ``python -m dcn_det.env_check`` prints what is installed.
"""
import importlib
import importlib.util
import sys

MMCV_VERSION = '2.1.0'
_FIX = 'run `make setup` (scripts/setup_env.sh), which builds mmcv 2.1.0 with ops against this torch'


class MMCVInstallError(ImportError):
    """mmcv is missing, the wrong version, or lacks its compiled ops."""


def check_mmcv() -> None:
    """Raise :class:`MMCVInstallError` naming the fix unless mmcv 2.1.0 with compiled ops is importable."""
    if importlib.util.find_spec('mmcv') is None:
        raise MMCVInstallError(f'mmcv is not installed: {_FIX}.')
    import mmcv

    if mmcv.__version__ != MMCV_VERSION:
        raise MMCVInstallError(
            f'mmcv {mmcv.__version__} is installed but dcn_det needs mmcv=={MMCV_VERSION} '
            f'(mmdet 3.3.0 refuses mmcv >= 2.2): {_FIX}.')
    try:
        importlib.import_module('mmcv._ext')
    except ImportError as e:
        raise MMCVInstallError(
            f'mmcv {mmcv.__version__} is installed without its compiled ops (mmcv._ext: {e}). '
            f'It was built with MMCV_WITH_OPS=0 or is mmcv-lite, or was built against another torch: '
            f'{_FIX}.') from None


def main() -> int:
    quiet = '--quiet' in sys.argv
    try:
        check_mmcv()
    except MMCVInstallError as e:
        print(f'dcn_det: {e}', file=sys.stderr)
        return 1
    if not quiet:
        import mmcv
        import mmdet
        import mmengine
        import torch
        import torchvision
        from mmcv.ops import get_compiling_cuda_version
        print(f'torch {torch.__version__} (cuda available: {torch.cuda.is_available()}), '
              f'torchvision {torchvision.__version__}, mmengine {mmengine.__version__}, '
              f'mmcv {mmcv.__version__} with ops (compiled cuda: {get_compiling_cuda_version()}), '
              f'mmdet {mmdet.__version__}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
