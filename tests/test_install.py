"""dcn_det installed as a user installs it: a wheel, into an environment that already holds the stack.

The wheel is built from this checkout (``pip wheel --no-build-isolation``, which compiles the CPU kernel
into it) and installed into a second, new environment that holds this machine's torch and mmcv with
mmdet and mmengine at other versions than constraints.txt. Everything then runs from a folder outside
the source tree, with nothing of the checkout on the path. The environment is cached (it is rebuilt when
its versions below change); the wheel is built and installed afresh every run.
"""
import glob
import hashlib
import json
import os
import os.path as osp
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests._helpers import REPO

pytestmark = pytest.mark.slow

# The second environment's stack: same torch and mmcv build as the checkout's, older mmdet and mmengine
# (and the setuptools they need: mmengine 0.10 imports pkg_resources to resolve `mmdet::` configs).
OTHER_STACK = ['mmdet==3.2.0', 'mmengine==0.10.5', 'setuptools<81']


def _run(args, env_extra=None, **kwargs):
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV')}
    result = subprocess.run(args, capture_output=True, text=True, env={**env, **(env_extra or {})}, **kwargs)
    assert result.returncode == 0, f'{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}'
    return result


def _mmcv_wheel() -> str:
    import mmcv
    import torch

    cache = os.environ.get('DCN_DET_CACHE') or osp.join(osp.expanduser('~'), '.cache', 'dcn_det')
    tag = f'cp{sys.version_info[0]}{sys.version_info[1]}'
    wheels = glob.glob(osp.join(cache, f'mmcv-{mmcv.__version__}-torch{torch.__version__.split("+")[0]}-{tag}-*',
                                'mmcv-*.whl'))
    assert wheels, f'no cached mmcv wheel under {cache}: run `make setup` (scripts/build_mmcv.sh)'
    return sorted(wheels)[0]


@pytest.fixture(scope='module')
def other_env():
    """A venv with this environment's torch, torchvision and mmcv build, and mmdet 3.2, mmengine 0.10.5."""
    import torch
    import torchvision

    this = [f'{m.__name__}=={m.__version__.split("+")[0]}' for m in (torch, torchvision)]
    stack = [*this, _mmcv_wheel(), *OTHER_STACK]
    key = hashlib.sha256(repr((sys.version, stack)).encode()).hexdigest()[:12]
    cache = os.environ.get('DCN_DET_CACHE') or osp.join(osp.expanduser('~'), '.cache', 'dcn_det')
    root = osp.join(cache, f'env-other-stack-{key}')
    python = osp.join(root, 'bin', 'python')
    if not osp.isfile(osp.join(root, '.complete')):
        shutil.rmtree(root, ignore_errors=True)
        _run([sys.executable, '-m', 'venv', root])
        _run([python, '-m', 'pip', 'install', '-q', *stack], timeout=1800)
        open(osp.join(root, '.complete'), 'w').close()
    _run([python, '-m', 'pip', 'uninstall', '-y', '-q', 'dcn_det'])  # a wheel left by an earlier run
    return python


def _source_copy(tmp_path) -> str:
    """The checkout's sources without build outputs (setuptools builds in-tree and would reuse them)."""
    src = str(tmp_path / 'src')
    outputs = shutil.ignore_patterns('*.egg-info', '*.so', '__pycache__', '.*_cache')

    def ignore(directory, names):
        top = {'.git', '.venv', 'work_dirs', 'data', 'build'} if osp.samefile(directory, REPO) else set()
        return top | outputs(directory, names)

    shutil.copytree(REPO, src, symlinks=True, ignore=ignore)
    return src


def _build_wheel(tmp_path, isolated: bool = False, **env) -> tuple[str, str]:
    """(the wheel's path, pip's output) of ``pip wheel --no-deps`` on the sources, without build isolation
    unless ``isolated`` (pip's default, which builds where torch cannot be imported)."""
    src, out = _source_copy(tmp_path), tmp_path / 'wheels'
    isolation = [] if isolated else ['--no-build-isolation']
    result = _run([sys.executable, '-m', 'pip', 'wheel', '-v', *isolation, '--no-deps', '-w', str(out), src],
                  timeout=900, env_extra=env)
    return glob.glob(str(out / 'dcn_det-*.whl'))[0], result.stdout + result.stderr


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
    return _build_wheel(tmp_path_factory.mktemp('wheel'))[0]


def test_the_wheel_carries_the_kernel_the_configs_and_no_tests(wheel):
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith('dcn_det/_C') and n.endswith('.so') for n in names), names
    shipped = glob.glob(osp.join(REPO, 'dcn_det', 'configs', '**', '*.py'), recursive=True)
    configs = {osp.relpath(p, REPO) for p in shipped}
    assert 'dcn_det/configs/_base_/shapes_r18_cpu.py' in configs and not configs - set(names), configs - set(names)
    assert not [n for n in names if n.startswith(('tests/', 'tools/', 'benchmarks/'))]


@pytest.mark.parametrize('case, isolated, env', [
    ('no compiler', False, dict(CC='false', CXX='false')),
    ("pip's build isolation: no torch", True, {}),
    ('DCN_DET_WITH_OPS=0', False, dict(DCN_DET_WITH_OPS='0'))])
def test_a_build_without_the_kernel_still_installs_and_says_how_to_get_it(tmp_path, case, isolated, env):
    wheel, output = _build_wheel(tmp_path, isolated, **env)
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert 'dcn_det/env_check.py' in names and not [n for n in names if n.endswith('.so')]
    assert output.count('dcn_det: building without the compiled CPU kernel') == 1, output[-3000:]
    assert 'To build it: pip install --no-build-isolation .' in output


def test_installing_into_an_existing_stack_changes_nothing_else(other_env, wheel, tmp_path):
    report = tmp_path / 'report.json'
    _run([other_env, '-m', 'pip', 'install', '-q', '--dry-run', '--report', str(report), wheel])
    planned = [item['metadata']['name'] for item in json.load(open(report))['install']]
    assert planned == ['dcn_det'], f'pip would also install or replace {planned}'


def test_installed_wheel_reports_its_kernel_and_builds_a_user_config(other_env, wheel, tmp_path):
    _run([other_env, '-m', 'pip', 'install', '-q', '--no-deps', wheel])
    env = json.loads(_run([other_env, '-m', 'dcn_det.env_check', '--json'], cwd=tmp_path).stdout)
    assert env['cpu_kernel'] is True and env['mmcv_ops'] is True and env['problem'] is None, env
    assert (env['mmdet'], env['mmengine']) == ('3.2.0', '0.10.5')

    # A user's configs, outside the checkout: one over mmdet's own base, one over a shipped config written out.
    (tmp_path / 'over_mmdet.py').write_text(textwrap.dedent("""
        _base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
        custom_imports = dict(imports=['dcn_det'], allow_failed_imports=False)
        model = dict(
            backbone=dict(type='DCNResNet', init_cfg=None, dcn=dict(type='MDConv', deform_groups=1),
                          stage_with_dcn=(False, True, True, True)),
            roi_head=dict(bbox_roi_extractor=dict(
                type='DeformRoIExtractor',
                roi_layer=dict(_delete_=True, type='ModulatedDeformRoIPool', output_size=7, sampling_ratio=0,
                               gamma=0.1, deform_fc_channels=64))))
        """))
    _run([other_env, '-m', 'dcn_det.model_zoo', 'faster_rcnn_dcnv2', '--dump', 'zoo/faster_rcnn_dcnv2.py'],
         cwd=tmp_path)
    (tmp_path / 'zoo' / 'mine.py').write_text(
        "_base_ = './faster_rcnn_dcnv2.py'\nmodel = dict(backbone=dict(init_cfg=None))\n")
    script = textwrap.dedent("""
        import sys
        import torch
        from mmengine.config import Config
        from mmengine.registry import init_default_scope
        from mmdet.registry import MODELS
        from mmdet.testing import demo_mm_inputs
        import dcn_det
        from dcn_det.ops import _ext
        from mmcv.ops import ModulatedDeformConv2d

        assert 'site-packages' in dcn_det.__file__, dcn_det.__file__
        init_default_scope('mmdet')
        for path in sys.argv[1:]:
            model = MODELS.build(Config.fromfile(path).model).eval()
            dcn = [m for m in model.modules() if isinstance(m, ModulatedDeformConv2d)]
            assert type(model.backbone).__name__ == 'DCNResNet' and len(dcn) == 13, (path, len(dcn))
            inputs = demo_mm_inputs(batch_size=1, image_shapes=[(3, 128, 160)], num_items=[2])
            with torch.no_grad():
                out = model.test_step(inputs)
            print(path, type(model.roi_head.bbox_roi_extractor).__name__, len(out[0].pred_instances))
        print('kernel', _ext.load() is not None)
        """)
    (tmp_path / 'predict.py').write_text(script)
    out = _run([other_env, 'predict.py', 'over_mmdet.py', 'zoo/mine.py'], cwd=tmp_path, timeout=600).stdout
    assert out.count('DeformRoIExtractor') == 2 and 'kernel True' in out, out
