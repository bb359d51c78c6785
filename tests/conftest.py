import pytest
import torch


@pytest.fixture
def tiny_inputs():
    """Two 64x64 images, one with 3 boxes (and their masks) and one with none."""
    from mmdet.testing import demo_mm_inputs

    torch.manual_seed(0)
    return demo_mm_inputs(batch_size=2, image_shapes=[(3, 64, 64), (3, 64, 64)], num_items=[3, 0], num_classes=3,
                          with_mask=True)
