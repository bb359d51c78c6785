"""ChannelsLastDetDataPreprocessor: mmdet's batch, same values, channels-last memory."""
import torch
from mmdet.models.data_preprocessors import DetDataPreprocessor

from dcn_det.models import ChannelsLastDetDataPreprocessor

ARGS = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_size_divisor=32)


def test_same_batch_in_channels_last_memory(tiny_inputs):
    ours = ChannelsLastDetDataPreprocessor(**ARGS)(tiny_inputs, True)
    theirs = DetDataPreprocessor(**ARGS)(tiny_inputs, True)
    assert ours['inputs'].is_contiguous(memory_format=torch.channels_last)
    assert not theirs['inputs'].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(ours['inputs'], theirs['inputs'])
    assert [s.batch_input_shape for s in ours['data_samples']] == [s.batch_input_shape for s in theirs['data_samples']]
