"""The installed stack: pinned versions, mmcv's compiled ops, mmdet's own detector on CPU."""
import importlib
import os
import os.path as osp
import re
import subprocess
import sys

import pytest
import torch

from tests._helpers import REPO


def _pins():
    text = open(osp.join(REPO, 'pyproject.toml')).read()
    return dict(re.findall(r'"([a-z0-9_-]+)==([0-9.]+)"', text))


def test_installed_versions_are_the_pins():
    import mmcv
    import mmdet
    import mmengine
    import torchvision

    pins = _pins()
    assert torch.__version__.split('+')[0] == pins['torch']
    assert torchvision.__version__.split('+')[0] == pins['torchvision']
    assert (mmcv.__version__, mmengine.__version__, mmdet.__version__) == (pins['mmcv'], pins['mmengine'],
                                                                         pins['mmdet'])


def test_dcn_det_mmdet_and_mmcv_ops_import():
    import mmcv.ops

    import dcn_det

    assert importlib.import_module('mmcv._ext') is not None
    assert hasattr(mmcv.ops, 'modulated_deform_conv2d') and dcn_det.DCNResNet is not None


def test_env_check_names_the_fix_for_mmcv_without_ops(monkeypatch):
    from dcn_det import env_check

    real = importlib.import_module

    def no_ext(name, *args, **kwargs):
        if name == 'mmcv._ext':
            raise ModuleNotFoundError("No module named 'mmcv._ext'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(env_check.importlib, 'import_module', no_ext)
    with pytest.raises(env_check.MMCVInstallError, match=r'without its compiled ops.*make setup'):
        env_check.check_mmcv()


def test_env_check_names_the_fix_for_the_wrong_mmcv(monkeypatch):
    import mmcv

    from dcn_det import env_check

    monkeypatch.setattr(mmcv, '__version__', '2.2.0')
    wanted = re.escape(_pins()['mmcv'])
    with pytest.raises(env_check.MMCVInstallError,
                       match=rf'mmcv 2\.2\.0 is installed but dcn_det needs mmcv=={wanted}'):
        env_check.check_mmcv()


STACK = ('torch', 'torchvision', 'mmcv', 'mmengine', 'mmdet', 'pycocotools')


def test_pins_are_stated_once_in_pyproject():
    """Rule: the versions live in pyproject.toml only; the set-up script, env_check and the README's
    Installation section read or point to them instead of repeating the numbers."""
    from dcn_det import env_check

    pins = _pins()
    assert {k: v for k, v in env_check.pins().items() if k in STACK} == {k: pins[k] for k in STACK}
    readme = open(osp.join(REPO, 'README.md')).read()
    installation = readme[readme.index('## Installation'):readme.index('## Usage')]
    for path, text in [('scripts/setup_env.sh', open(osp.join(REPO, 'scripts', 'setup_env.sh')).read()),
                       ('dcn_det/env_check.py', open(osp.join(REPO, 'dcn_det', 'env_check.py')).read()),
                       ('README.md, Installation', installation)]:
        repeated = [f'{name} {pins[name]}' for name in STACK if re.search(rf'(?<![\d.]){re.escape(pins[name])}(?![\d])',
                                                                        text)]
        assert not repeated, f'{path} repeats the pins {repeated}: read them from pyproject.toml'


def test_env_check_reads_the_installed_metadata_without_a_source_tree(monkeypatch, tmp_path):
    from dcn_det import env_check

    monkeypatch.setattr(env_check, '_PYPROJECT', str(tmp_path / 'pyproject.toml'))  # as in a non-editable install
    assert {k: env_check.pins()[k] for k in STACK} == {k: _pins()[k] for k in STACK}
    with pytest.raises(FileNotFoundError, match='source tree'):
        env_check.mmcv_sdist_sha256()


def test_env_check_prints_a_pin_and_names_the_pins_it_has():
    def run(*args):
        return subprocess.run([sys.executable, 'dcn_det/env_check.py', *args], cwd=REPO, capture_output=True,
                              text=True)

    assert run('--pin', 'MMCV').stdout.strip() == _pins()['mmcv']
    assert re.fullmatch(r'[0-9a-f]{64}', run('--mmcv-sdist-sha256').stdout.strip())
    unknown = run('--pin', 'mmcv-full')
    assert unknown.returncode == 1 and "no exact pin for 'mmcv-full'" in unknown.stderr and 'mmdet' in unknown.stderr


def test_mmcv_sdist_is_fetched_through_pip_which_enforces_the_checksum(tmp_path):
    """Rule: the sdist comes through pip (its configured index, here a local --find-links folder standing in for a
    mirror) in hash-checking mode: a file with another sha256 is refused and nothing is kept."""
    links, out = tmp_path / 'links', tmp_path / 'out'
    links.mkdir()
    (links / f"mmcv-{_pins()['mmcv']}.tar.gz").write_bytes(b'not the mmcv sdist')
    env = dict(os.environ, PIP_NO_INDEX='1', PIP_FIND_LINKS=str(links))
    result = subprocess.run(['bash', 'scripts/setup_env.sh', '--fetch-mmcv-sdist', str(out)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert 'DO NOT MATCH THE HASHES' in result.stderr and str(links) in result.stderr
    assert f"pip could not fetch mmcv=={_pins()['mmcv']}" in result.stderr
    assert not (out.exists() and os.listdir(out))


def test_mmdets_own_faster_rcnn_runs_a_loss_step_on_cpu(tiny_inputs):
    from mmdet.registry import MODELS
    from mmengine.hub import get_config
    from mmengine.registry import init_default_scope

    cfg = get_config('mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py')
    cfg.model.backbone.init_cfg = None  # torchvision://resnet50 would download
    cfg.model.roi_head.bbox_head.num_classes = 3
    init_default_scope('mmdet')
    model = MODELS.build(cfg.model)
    model.init_weights()
    losses = model(**model.data_preprocessor(tiny_inputs, True), mode='loss')
    total, _ = model.parse_losses(losses)
    total.backward()
    assert torch.isfinite(total) and model.backbone.layer4[0].bn3.weight.grad.abs().sum() > 0
