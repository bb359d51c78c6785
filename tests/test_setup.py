"""The installed stack: pinned versions, mmcv's compiled ops, mmdet's own detector on CPU."""
import importlib
import json
import os
import os.path as osp
import re
import subprocess
import sys

import pytest
import torch

from tests._helpers import REPO


def _pins():
    """constraints.txt: what `make setup` and CI install exactly."""
    text = open(osp.join(REPO, 'constraints.txt')).read()
    return {k.lower(): v for k, v in re.findall(r'^([A-Za-z0-9_.-]+)==(\S+)', text, re.M)}


STACK = ('torch', 'torchvision', 'mmcv', 'mmengine', 'mmdet', 'pycocotools')


@pytest.mark.skipif(osp.realpath(sys.prefix) != osp.realpath(osp.join(REPO, '.venv')),
                    reason='the lock describes the checkout\'s .venv; this is another environment')
def test_installed_versions_are_the_lock():
    from importlib.metadata import version

    pins = _pins()
    assert {name: version(name).split('+')[0] for name in STACK} == {name: pins[name] for name in STACK}


def test_pyproject_states_ranges_that_hold_the_lock():
    """Rule: pyproject.toml says what dcn_det works with (ranges, no exact pins, no mmcv: pip cannot build it
    against a user's torch), and the locked versions CI tests lie inside those ranges."""
    from packaging.specifiers import SpecifierSet

    from dcn_det import env_check

    ranges = env_check.requirements()
    assert set(ranges) >= {'torch', 'torchvision', 'mmengine', 'mmdet'} and 'mmcv' not in ranges
    assert not [spec for spec in ranges.values() if '==' in spec]
    for name, spec in ranges.items():
        assert SpecifierSet(spec).contains(_pins()[name]), f'{name}=={_pins()[name]} is outside {name}{spec}'
    assert SpecifierSet(env_check.MMCV_ACCEPTED).contains(_pins()['mmcv'])


def test_dcn_det_mmdet_and_mmcv_ops_import():
    """dcn_det registers into mmdet's registry, and mmcv's compiled ops run: its modulated deformable conv with
    zero offsets and unit masks is the plain conv."""
    import mmcv.ops
    import mmdet.registry
    import torch.nn.functional as F

    import dcn_det

    assert hasattr(importlib.import_module('mmcv._ext'), 'modulated_deform_conv_forward')
    assert mmdet.registry.MODELS.get('DCNResNet') is dcn_det.DCNResNet
    x, weight = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    out = mmcv.ops.modulated_deform_conv2d(x, torch.zeros(1, 18, 5, 5), torch.ones(1, 9, 5, 5), weight, None,
                                           1, 1, 1, 1, 1)  # stride, padding, dilation, groups, deform_groups
    torch.testing.assert_close(out, F.conv2d(x, weight, padding=1))


def test_env_check_names_the_fix_for_mmcv_without_ops(monkeypatch):
    from dcn_det import env_check

    real = importlib.import_module

    def no_ext(name, *args, **kwargs):
        if name == 'mmcv._ext':
            raise ModuleNotFoundError("No module named 'mmcv._ext'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(env_check.importlib, 'import_module', no_ext)
    with pytest.raises(env_check.StackError, match=r'without its compiled ops.*make setup'):
        env_check.check_mmcv()


@pytest.mark.parametrize('version, accepted', [('2.0.0rc4', True), ('2.0.1', True), ('2.1.0', True),
                                               ('2.2.0', False), ('1.7.2', False)])
def test_env_check_accepts_every_mmcv_mmdet_accepts(monkeypatch, version, accepted):
    import mmcv

    from dcn_det import env_check

    monkeypatch.setattr(mmcv, '__version__', version)
    if accepted:
        env_check.check_mmcv()
    else:
        with pytest.raises(env_check.StackError,
                           match=rf'mmcv {re.escape(version)} is installed but mmdet 3.x accepts '
                                 rf'mmcv>=2\.0\.0rc4,<2\.2\.0: build mmcv'):
            env_check.check_mmcv()


def test_env_check_names_packages_outside_the_tested_ranges(monkeypatch):
    from dcn_det import env_check

    monkeypatch.setattr(env_check, 'requirements', lambda: {'mmdet': '>=3.2,<3.4', 'torch': '>=2.11,<2.15',
                                                             'not-a-real-package': '>=1'})
    real = env_check.importlib.metadata.version
    monkeypatch.setattr(env_check.importlib.metadata, 'version',
                        lambda name: '3.1.0' if name == 'mmdet' else real(name))
    found = env_check.untested()
    assert found[0] == 'mmdet 3.1.0 is installed; dcn_det is tested with mmdet>=3.2,<3.4'
    assert found[1].startswith('not-a-real-package is not installed') and len(found) == 2
    with pytest.warns(UserWarning, match='mmdet 3.1.0 is installed'):
        env_check.check_stack()
    real_installed = env_check._installed
    monkeypatch.setattr(env_check, '_installed', lambda name: name != 'pkg_resources' and real_installed(name))
    assert env_check.untested()[-1].startswith('pkg_resources is missing (setuptools >= 81 dropped it)')


def test_exact_versions_are_stated_once_in_the_lock():
    """Rule: the exact versions live in constraints.txt only; the set-up scripts, env_check and the README's
    Installation section read or point to it instead of repeating the numbers."""
    from dcn_det import env_check

    pins = _pins()
    assert {k: v for k, v in env_check.pins().items() if k in STACK} == {k: pins[k] for k in STACK}
    readme = open(osp.join(REPO, 'README.md')).read()
    # the compatibility table records the environments measured (the lock's among them), it does not pin them
    installation = readme[readme.index('## Installation'):readme.index('### Compatibility')]
    texts = [(path, open(osp.join(REPO, path)).read())
             for path in ('scripts/setup_env.sh', 'scripts/build_mmcv.sh', 'dcn_det/env_check.py', 'pyproject.toml')]
    for path, text in texts + [('README.md, Installation', installation)]:
        repeated = [f'{name} {pins[name]}' for name in STACK
                    if re.search(rf'(?<![\d.]){re.escape(pins[name])}(?![\d])', text)]
        assert not repeated, f'{path} repeats the exact versions {repeated}: read them from constraints.txt'


def test_env_check_reads_the_ranges_from_the_installed_metadata_without_a_source_tree(monkeypatch, tmp_path):
    from packaging.specifiers import SpecifierSet

    from dcn_det import env_check

    def ranges():
        return {name: SpecifierSet(spec) for name, spec in env_check.requirements().items()}

    in_tree = ranges()
    monkeypatch.setattr(env_check, '_PYPROJECT', str(tmp_path / 'pyproject.toml'))  # as in a non-editable install
    monkeypatch.setattr(env_check, '_CONSTRAINTS', str(tmp_path / 'constraints.txt'))
    assert ranges() == in_tree
    with pytest.raises(FileNotFoundError, match='source tree'):
        env_check.mmcv_sdist_sha256()
    with pytest.raises(FileNotFoundError, match='checkout'):
        env_check.pins()


def test_env_check_prints_a_pin_and_names_the_pins_it_has():
    def run(*args):
        return subprocess.run([sys.executable, 'dcn_det/env_check.py', *args], cwd=REPO, capture_output=True,
                              text=True)

    assert run('--pin', 'MMCV').stdout.strip() == _pins()['mmcv']
    assert re.fullmatch(r'[0-9a-f]{64}', run('--mmcv-sdist-sha256').stdout.strip())
    unknown = run('--pin', 'mmcv-full')
    assert unknown.returncode == 1 and "no exact version for 'mmcv-full'" in unknown.stderr
    assert 'mmdet' in unknown.stderr


def test_env_check_json_reports_the_stack_and_the_kernel(tmp_path):
    result = subprocess.run([sys.executable, '-m', 'dcn_det.env_check', '--json'], cwd=tmp_path,
                            capture_output=True, text=True)
    env = json.loads(result.stdout)
    import mmdet
    import torch

    assert result.returncode == 0 and env['problem'] is None
    assert (env['torch'], env['mmdet'], env['cuda']) == (torch.__version__, mmdet.__version__, False)
    assert env['mmcv_ops'] is True and env['cpu_kernel'] is True
    assert env['cpu_capability'] == torch.backends.cpu.get_cpu_capability()
    table = subprocess.run([sys.executable, '-m', 'dcn_det.env_check'], capture_output=True, text=True).stdout
    assert re.search(r'^cpu_kernel +True$', table, re.M) and re.search(r'^mmdet +\S+$', table, re.M)


def test_a_wrong_mmcv_stops_the_import_in_one_line_and_env_check_still_reports(tmp_path):
    """An mmcv that mmdet refuses: ``import dcn_det`` ends in one line naming both versions and the fix;
    ``python -m dcn_det.env_check`` still prints the report and exits 1."""
    fake = tmp_path / 'mmcv'
    fake.mkdir()
    (fake / '__init__.py').write_text("__version__ = '2.2.0'\n")
    env = dict(os.environ, PYTHONPATH=f'{tmp_path}{os.pathsep}{REPO}')
    imported = subprocess.run([sys.executable, '-c', 'import dcn_det'], cwd=tmp_path, env=env, capture_output=True,
                              text=True)
    last = imported.stderr.strip().splitlines()[-1]
    assert imported.returncode == 1
    assert last.startswith('dcn_det.env_check.StackError: mmcv 2.2.0 is installed but mmdet 3.x accepts '
                           'mmcv>=2.0.0rc4,<2.2.0'), last
    report = subprocess.run([sys.executable, '-m', 'dcn_det.env_check', '--json'], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert report.returncode == 1 and json.loads(report.stdout)['mmcv'] == '2.2.0'
    assert 'mmcv 2.2.0 is installed' in json.loads(report.stdout)['problem']


def test_mmcv_sdist_is_fetched_through_pip_which_enforces_the_checksum(tmp_path):
    """Rule: the sdist comes through pip (its configured index, here a local --find-links folder standing in for a
    mirror) in hash-checking mode: a file with another sha256 is refused and nothing is kept."""
    links, out = tmp_path / 'links', tmp_path / 'out'
    links.mkdir()
    (links / f"mmcv-{_pins()['mmcv']}.tar.gz").write_bytes(b'not the mmcv sdist')
    env = dict(os.environ, PIP_NO_INDEX='1', PIP_FIND_LINKS=str(links))
    result = subprocess.run(['bash', 'scripts/build_mmcv.sh', '--fetch-sdist', str(out)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert 'DO NOT MATCH THE HASHES' in result.stderr and str(links) in result.stderr
    assert f"pip could not fetch mmcv=={_pins()['mmcv']}" in result.stderr
    assert not (out.exists() and os.listdir(out))


def test_model_zoo_lists_locates_and_writes_out_the_shipped_configs(tmp_path):
    from mmengine.config import Config

    from dcn_det import model_zoo

    assert 'faster_rcnn_dcnv2' in model_zoo.list_configs() and '_base_' not in model_zoo.list_configs()
    assert model_zoo.get_config_file('faster_rcnn_dcnv2.py') == osp.join(REPO, 'dcn_det', 'configs',
                                                                         'faster_rcnn_dcnv2.py')
    with pytest.raises(FileNotFoundError, match="no config 'faster_rcnn_dcnv3'.*faster_rcnn_dcnv2"):
        model_zoo.get_config_file('faster_rcnn_dcnv3')
    out = tmp_path / 'mine' / 'flagship.py'
    assert model_zoo.main(['faster_rcnn_dcnv2', '--dump', str(out)]) == 0
    dumped, shipped = Config.fromfile(str(out)), model_zoo.get_config('faster_rcnn_dcnv2')
    assert dumped.model.to_dict() == shipped.model.to_dict() and dumped.model.backbone.type == 'DCNResNet'
    before = out.read_bytes()
    assert model_zoo.main(['faster_rcnn_dcnv2', '--dump', str(out)]) == 2 and out.read_bytes() == before


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
