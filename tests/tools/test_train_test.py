"""tools/train.py and tools/test.py end to end on tiny generated datasets, through the real CLIs."""
import datetime
import json
import os
import os.path as osp
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from dcn_det.data.synthetic import generate
from tests._helpers import REPO, write_tiny_shapes_config

CLASSES = ('ellipse', 'triangle', 'star')
OTHER_CLASSES = ('heart', 'crescent', 'arrow', 'chevron')


def tool(*args, check=True, **kwargs):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, check=check,
                          **kwargs)


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp('shapes')
    generate(root / 'data', seed=1, num_train=8, num_val=4, image_size=96, classes=CLASSES, min_size=12,
             max_size=40, objects_per_image=(1, 3))
    return root


def _state(path):
    return torch.load(path, map_location='cpu', weights_only=True)['state_dict']


@pytest.mark.slow  # trains, then evaluates
def test_train_then_test_writes_weights_only_checkpoints_and_coco_metrics(shapes, tmp_path):
    cfg = write_tiny_shapes_config(tmp_path / 'tiny.py', shapes / 'data', CLASSES, epochs=1)
    work = tmp_path / 'work'
    tool('tools/train.py', cfg, '--work-dir', str(work))
    ckpt = work / 'epoch_1.pth'
    checkpoint = torch.load(ckpt, map_location='cpu', weights_only=True)  # no pickled objects inside
    assert 'message_hub' in checkpoint and 'optimizer' in checkpoint
    assert not [p for p in os.listdir(work) if '.tmp' in p]
    out = tool('tools/test.py', cfg, str(ckpt), '--work-dir', str(work), '--out', str(tmp_path / 'preds.pkl'),
               '--show-dir', 'vis')
    metrics = json.load(open(work / 'test_metrics.json'))['metrics']
    assert 0 <= metrics['coco/bbox_mAP'] <= 1 and 'bbox_mAP_50' in out.stdout
    assert (tmp_path / 'preds.pkl').stat().st_size > 0
    shown = [f for _, _, files in os.walk(work) for f in files if f.endswith('.png')]
    assert len(shown) == 4  # one painted picture per val image


@pytest.mark.slow  # trains, is killed, resumes and trains again
def test_killed_run_resumes_to_the_same_weights(shapes, tmp_path):
    cfg = write_tiny_shapes_config(tmp_path / 'tiny.py', shapes / 'data', CLASSES, epochs=3)
    straight, killed = tmp_path / 'straight', tmp_path / 'killed'
    tool('tools/train.py', cfg, '--work-dir', str(straight))
    proc = subprocess.Popen([sys.executable, 'tools/train.py', cfg, '--work-dir', str(killed)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / 'epoch_1.pth').exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / 'epoch_3.pth').exists(), 'the run finished before it could be killed'
    refused = tool('tools/train.py', cfg, '--work-dir', str(killed), check=False)
    assert refused.returncode == 2 and 'pass --resume' in refused.stderr
    tool('tools/train.py', cfg, '--work-dir', str(killed), '--resume')
    a, b = _state(straight / 'epoch_3.pth'), _state(killed / 'epoch_3.pth')
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


@pytest.mark.slow  # trains until the loss falls
def test_short_run_learns(shapes, tmp_path):
    """Loss falls and mAP on the training images is above zero after a few epochs."""
    data = tmp_path / 'learn'
    generate(data, seed=2, num_train=24, num_val=2, image_size=96, classes=CLASSES, min_size=20, max_size=44,
             objects_per_image=(1, 2))
    cfg = write_tiny_shapes_config(tmp_path / 'tiny.py', data, CLASSES, epochs=8, val_split='train')
    work = tmp_path / 'work'
    tool('tools/train.py', cfg, '--work-dir', str(work))
    logs = [json.loads(line) for d, _, fs in os.walk(work) for f in fs if f.endswith('.json') and f[0].isdigit()
            for line in open(osp.join(d, f))]
    losses = [r['loss'] for r in logs if 'loss' in r]
    assert len(losses) >= 20 and sum(losses[-5:]) < 0.7 * sum(losses[:5])
    tool('tools/test.py', cfg, str(work / 'epoch_8.pth'), '--work-dir', str(work))
    assert json.load(open(work / 'test_metrics.json'))['metrics']['coco/bbox_mAP_50'] > 0


def test_other_dataset_changes_only_data_root_and_classes(tmp_path):
    generate(tmp_path / 'other', seed=3, num_train=4, num_val=2, image_size=96, classes=OTHER_CLASSES, min_size=12,
             max_size=40, objects_per_image=(1, 2))
    cfg = write_tiny_shapes_config(tmp_path / 'tiny.py', tmp_path / 'other', OTHER_CLASSES, epochs=1)
    work = tmp_path / 'work'
    tool('tools/train.py', cfg, '--work-dir', str(work))
    out = tool('tools/test.py', cfg, str(work / 'epoch_1.pth'), '--work-dir', str(work))
    assert 'bbox_mAP' in out.stdout
    meta = torch.load(work / 'epoch_1.pth', map_location='cpu', weights_only=True)['meta']
    assert tuple(meta['dataset_meta']['classes']) == OTHER_CLASSES
    assert _state(work / 'epoch_1.pth')['roi_head.bbox_head.fc_cls.weight'].shape[0] == len(OTHER_CLASSES) + 1


@pytest.mark.slow  # a tool process per bad input
def test_bad_input_is_one_clear_line(shapes, tmp_path):
    cfg = write_tiny_shapes_config(tmp_path / 'tiny.py', shapes / 'data', CLASSES, epochs=1)
    cases = [
        (['tools/train.py', 'configs/nope.py'], "config 'configs/nope.py' does not exist"),
        (['tools/train.py', 'README.md'], 'is not a .py config file'),
        (['tools/test.py', cfg, str(tmp_path / 'missing.pth')], 'does not exist'),
    ]
    other = tmp_path / 'other.pth'
    torch.save({'state_dict': {'backbone.conv1.weight': torch.zeros(1)}}, other)
    cases.append((['tools/test.py', cfg, str(other)], 'does not belong to this config'))
    pickled = tmp_path / 'pickled.pth'
    torch.save({'state_dict': {}, 'meta': {'when': datetime.date(2024, 1, 1)}}, pickled)
    cases.append((['tools/test.py', cfg, str(pickled)], '--trust-checkpoint'))
    existing = tmp_path / 'exists.pkl'
    existing.write_text('keep me')
    cases.append((['tools/test.py', cfg, str(other), '--out', str(existing)], 'exists'))
    for args, message in cases:
        result = tool(*args, check=False)
        assert result.returncode == 2, (args, result.stderr[-500:])
        assert message in result.stderr and result.stderr.count('\n') == 1, (args, result.stderr)
    assert existing.read_text() == 'keep me'


def test_missing_or_corrupt_data_is_one_line_before_the_model_is_built(shapes, tmp_path):
    """Rule: train.py and test.py name a missing annotation file / image folder or a corrupt annotation JSON
    in one line, before the runner (and so the model and the work dir) exists."""
    broken = tmp_path / 'broken'
    shutil.copytree(shapes / 'data', broken)
    shutil.rmtree(broken / 'train')
    val_json = broken / 'annotations' / 'instances_val.json'
    val_json.write_text(val_json.read_text()[:100])
    ckpt = tmp_path / 'any.pth'
    torch.save({'state_dict': {}}, ckpt)
    work = tmp_path / 'work'
    cases = [
        (['tools/train.py', write_tiny_shapes_config(tmp_path / 'nodata.py', tmp_path / 'nodata', CLASSES)],
         f"train_dataloader.dataset.ann_file: annotation file '{tmp_path}/nodata/annotations/instances_train.json' "
         'does not exist'),
        (['tools/train.py', write_tiny_shapes_config(tmp_path / 'broken.py', broken, CLASSES)],
         f"train_dataloader.dataset.data_prefix.img: folder '{broken}/train/' does not exist"),
        (['tools/test.py', str(tmp_path / 'broken.py'), str(ckpt)],
         f"test_dataloader.dataset.ann_file: annotation file '{val_json}' is not valid JSON"),
    ]
    for args, message in cases:
        result = tool(*args, '--work-dir', str(work), check=False)
        assert result.returncode == 2 and result.stderr.count('\n') == 1, (args, result.stderr[-2000:])
        assert message in result.stderr, (args, result.stderr)
        assert not work.exists()


@pytest.mark.parametrize('script', ['train', 'test'])
def test_amp_on_a_cpu_without_native_bf16_is_refused_in_one_line(shapes, tmp_path, monkeypatch, capsys, script):
    """Rule: --amp on a CPU without native bfloat16 (where bfloat16 is slower than float32) fails in one line
    naming the reason, before anything is built."""
    import mmengine.device

    from tools import test, train

    monkeypatch.setattr(mmengine.device, 'get_device', lambda: 'cpu')
    monkeypatch.setenv('DCN_DET_CPU_BF16', '0')
    cfg = write_tiny_shapes_config(tmp_path / 'tiny.py', shapes / 'data', CLASSES, epochs=1)
    args = [cfg, '--amp', '--work-dir', str(tmp_path / 'work')]
    with pytest.raises(SystemExit) as exit_info:
        train.main(args) if script == 'train' else test.main([cfg, str(tmp_path / 'none.pth'), *args[1:]])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count('\n') == 1
    assert err.startswith('error: --amp: this CPU has no native bfloat16') and 'run without --amp' in err
    assert not (tmp_path / 'work').exists()


@pytest.mark.slow  # trains, then evaluates
def test_amp_trains_and_tests_on_a_cpu(shapes, tmp_path):
    """--amp on a CPU (forced as on one with native bfloat16): bfloat16 autocast through the registered
    CPUAmpOptimWrapper, NMS and losses in float32; the run trains (finite losses) and tests."""
    cfg = write_tiny_shapes_config(tmp_path / 'tiny.py', shapes / 'data', CLASSES, epochs=1)
    work = tmp_path / 'work'
    env = dict(os.environ, DCN_DET_CPU_BF16='1')
    tool('tools/train.py', cfg, '--amp', '--work-dir', str(work), env=env)
    dumped = open(work / 'tiny.py').read()
    assert "type='CPUAmpOptimWrapper'" in dumped
    logs = [json.loads(line) for line in open(next(work.glob('*/vis_data/scalars.json')))]
    losses = [entry['loss'] for entry in logs if 'loss' in entry]
    assert losses and all(0 < loss < 100 for loss in losses)
    out = tool('tools/test.py', cfg, str(work / 'epoch_1.pth'), '--amp', '--work-dir', str(work), env=env)
    metrics = json.load(open(work / 'test_metrics.json'))['metrics']
    assert 0 <= metrics['coco/bbox_mAP'] <= 1 and 'bbox_mAP_50' in out.stdout


def test_two_cpu_processes_with_gloo(shapes, tmp_path):
    cfg = write_tiny_shapes_config(tmp_path / 'tiny.py', shapes / 'data', CLASSES, epochs=1)
    work = tmp_path / 'dist'
    with socket.socket() as probe:  # a free port: another suite on this machine may be rendezvousing too
        probe.bind(('127.0.0.1', 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, PORT=str(port), PYTHON=sys.executable)
    result = subprocess.run(['bash', 'tools/dist_train.sh', cfg, '2', '--work-dir', str(work)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    log = open(next(osp.join(d, f) for d, _, fs in os.walk(work) for f in fs if f.endswith('.log'))).read()
    assert 'Distributed training: True' in log and 'GPU number: 2' in log  # mmengine's name for the world size
    assert (work / 'epoch_1.pth').exists()
