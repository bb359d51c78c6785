"""Checkpoints under torch >= 2.6 (weights_only=True by default): what mmengine writes, and what we write."""
import os
import pickle

import pytest
import torch
from mmengine.logging import HistoryBuffer
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch.utils.data import Dataset

from dcn_det.checkpoint import (
    CheckpointLoadError,
    atomic_save,
    from_weights_only,
    load_checkpoint_file,
    to_weights_only,
)
from dcn_det.engine import DCNRunner


class ToyModel(BaseModel):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, inputs, labels=None, mode='tensor'):
        out = self.linear(torch.stack(inputs))
        if mode == 'loss':
            return {'loss': ((out.squeeze(1) - torch.stack(labels)) ** 2).mean()}
        return out


class ToyData(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return dict(inputs=torch.tensor([float(i), 1.0]), labels=torch.tensor(float(i % 3)))


def _runner(cls, work_dir, epochs=2, **kwargs):
    return cls(model=ToyModel(), work_dir=str(work_dir), train_dataloader=dict(
        dataset=ToyData(), sampler=dict(type='DefaultSampler', shuffle=True), batch_size=4),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9)),
        train_cfg=dict(by_epoch=True, max_epochs=epochs), default_hooks=dict(checkpoint=dict(type='CheckpointHook',
                                                                                              interval=1)),
        randomness=dict(seed=0), **kwargs)


def test_plain_mmengine_checkpoints_need_unpickling(tmp_path):
    """The fact dcn_det works around: if this starts passing, mmengine fixed it upstream."""
    _runner(Runner, tmp_path / 'plain').train()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / 'plain' / 'epoch_2.pth', weights_only=True)
    with pytest.raises(CheckpointLoadError, match='--trust-checkpoint'):
        load_checkpoint_file(str(tmp_path / 'plain' / 'epoch_2.pth'))
    trusted = load_checkpoint_file(str(tmp_path / 'plain' / 'epoch_2.pth'), trust=True)
    assert isinstance(trusted['message_hub']['log_scalars']['train/loss'], HistoryBuffer)


def test_dcn_runner_checkpoints_load_weights_only_and_resume(tmp_path):
    _runner(DCNRunner, tmp_path / 'ours', epochs=1).train()
    ckpt = torch.load(tmp_path / 'ours' / 'epoch_1.pth', weights_only=True)
    first = ckpt['message_hub']['log_scalars']['train/loss']['log']
    assert ckpt['meta']['epoch'] == 1 and len(first) > 0
    resumed = _runner(DCNRunner, tmp_path / 'ours', epochs=2, resume=True)
    resumed.train()
    assert resumed.epoch == 2
    loss = resumed.message_hub.get_scalar('train/loss')  # the history before the resume is back
    assert isinstance(loss, HistoryBuffer) and len(loss.data[0]) > len(first)
    assert loss.data[0][:len(first)].tolist() == first.tolist()


def test_history_buffer_round_trip():
    buffer = HistoryBuffer([1.0, 2.5], [1, 2], max_length=10)
    state = to_weights_only({'hub': {'loss': buffer}, 'n': __import__('numpy').int64(3)})
    assert state['n'] == 3 and type(state['n']) is int
    back = from_weights_only(state)['hub']['loss']
    assert back.max_length == 10 and back.data[0].tolist() == [1.0, 2.5] and back.data[1].tolist() == [1, 2]


def test_atomic_save_leaves_the_old_file_when_saving_fails(tmp_path):
    path = str(tmp_path / 'ckpt.pth')
    atomic_save({'a': torch.ones(1)}, path)

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError('boom')

    with pytest.raises(RuntimeError, match='boom'):
        atomic_save({'a': Unsaveable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)['a'], torch.ones(1))
    assert os.listdir(tmp_path) == ['ckpt.pth']


@pytest.mark.parametrize('content', [b'print(1)\n', b'', b'\x89PNG\r\n\x1a\n' + bytes(100)])
def test_a_file_that_is_no_checkpoint_is_named_as_such(tmp_path, content):
    path = tmp_path / 'x.pth'
    path.write_bytes(content)
    for trust in (False, True):
        with pytest.raises(CheckpointLoadError, match='is not a PyTorch checkpoint'):
            load_checkpoint_file(str(path), trust=trust)


def test_a_truncated_checkpoint_is_named_as_such(tmp_path):
    path = tmp_path / 'x.pth'
    torch.save({'w': torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointLoadError, match='is not a PyTorch checkpoint'):
        load_checkpoint_file(str(path))


def test_load_detector_loads_strictly_and_takes_the_checkpoints_classes(tmp_path):
    import os.path as osp

    from mmengine.config import Config

    from dcn_det.checkpoint import load_detector
    from tests._helpers import CONFIG_DIR, shrink_detector

    def config(num_classes):
        return shrink_detector(Config.fromfile(osp.join(CONFIG_DIR, 'shapes_r18_dcnv2.py')), num_classes=num_classes)

    torch.manual_seed(0)
    trained = load_detector(config(3), None)
    path = str(tmp_path / 'trained.pth')
    torch.save({'meta': {'dataset_meta': {'classes': ('a', 'b', 'c')}}, 'state_dict': trained.state_dict()}, path)
    loaded = load_detector(config(3), path)
    assert not loaded.training and loaded.dataset_meta['classes'] == ('a', 'b', 'c')
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in trained.state_dict().items())
    with pytest.raises(CheckpointLoadError, match="does not belong to this config's model: 4 shape mismatches"):
        load_detector(config(4), path)
