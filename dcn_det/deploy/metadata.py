"""What an exported file holds besides its graph: its input/output contract and its metadata keys.

The contract below is the one statement of the graph's inputs and outputs:
:class:`~dcn_det.deploy.detector.DeployableDetector` computes it, :func:`~dcn_det.deploy.export_onnx`
writes it (the outputs' text into the file, :data:`OUTPUTS_DOC`), :func:`~dcn_det.deploy.make_batch`
feeds it and :class:`~dcn_det.deploy.OnnxDetector` reads it. Resizing and padding happen outside
the graph, normalisation (mean/std, BGR->RGB) inside it (see :mod:`dcn_det.deploy.preprocess`).
"""
import hashlib

# name -> what the tensor holds, in the graph's order
INPUTS = {
    'images': 'float32[N, 3, H, W]: pixels 0-255 in the channel order the config loads (BGR, as cv2 reads '
              "them), each image resized by the config's test pipeline and placed at the top left of the "
              "batch; H and W multiples of the config's pad_size_divisor; what lies outside an image is ignored",
    'img_shapes': 'float32[N, 2]: (h, w) of each resized image inside the batch',
    'scale_factors': "float64[N, 2]: (w_scale, h_scale) from the original image to the resized one (mmdet's "
                     'scale_factor), double as mmdet holds it, so that boxes are rescaled to the last bit as '
                     'mmdet rescales them',
}
# K = the config's test_cfg.rcnn.max_per_img
OUTPUTS = {
    'boxes': 'float32[N, K, 4] (x1, y1, x2, y2) in original-image pixels',
    'scores': 'float32[N, K]',
    'labels': 'int64[N, K] (index into dcn_det.classes)',
    'num_dets': 'int64[N]: the first num_dets[i] rows of image i are its detections by falling score, the rest '
                'is padding (boxes 0, scores 0, labels -1)',
}
# and after them, for a mask model (Mask R-CNN) only
MASK_OUTPUTS = {
    'masks': "float32[N, K, M, M]: each detection's RoI mask, the foreground probability of its class over its box "
             "(M = the mask head's output size, 28 in mmdet); dcn_det.deploy.paste_masks pastes it into the image "
             'as mmdet does, thresholded at the metadata dcn_det.mask_thr_binary',
}
INPUT_NAMES = tuple(INPUTS)
OUTPUT_NAMES = tuple(OUTPUTS)
OUTPUTS_DOC = '; '.join(f'{name} {what}' for name, what in OUTPUTS.items())


def output_names(with_mask: bool) -> tuple[str, ...]:
    return OUTPUT_NAMES + (tuple(MASK_OUTPUTS) if with_mask else ())


def outputs_doc(with_mask: bool) -> str:
    return OUTPUTS_DOC + ''.join(f'; {name} {what}' for name, what in MASK_OUTPUTS.items() if with_mask)


# metadata_props keys written into every exported file
META = dict(
    classes='dcn_det.classes',  # JSON list of class names, index = label
    input='dcn_det.input',  # InputSpec as JSON: resize, normalisation, padding
    input_shape='dcn_det.input_shape',  # JSON [N, 3, H, W], null for a dynamic dimension
    outputs='dcn_det.outputs',  # OUTPUTS_DOC
    config='dcn_det.config',  # the full config the model was built from (mmengine pretty text)
    config_path='dcn_det.config_path',
    model_sha256='dcn_det.model_sha256',  # model_sha256(cfg): the config's model section, which the graph bakes in
    checkpoint='dcn_det.checkpoint',
    checkpoint_sha256='dcn_det.checkpoint_sha256',
    versions='dcn_det.versions',  # JSON {package: version} of the exporting environment
    mask_thr_binary='dcn_det.mask_thr_binary',  # a mask model's test_cfg.rcnn.mask_thr_binary
)


def config_classes(cfg) -> tuple[str, ...]:
    """The class names a config's test set uses: its ``metainfo`` if set, else the dataset class's own."""
    from mmdet.registry import DATASETS

    from dcn_det.data.wrappers import outermost_with

    dataset = outermost_with(cfg.test_dataloader.dataset, 'metainfo')
    metainfo = dataset.get('metainfo') or {}
    if metainfo.get('classes'):
        return tuple(metainfo['classes'])
    return tuple(DATASETS.get(dataset.type).METAINFO['classes'])


def model_sha256(cfg) -> str:
    """SHA-256 of ``cfg.model`` (keys sorted): what an exported graph was built from, layers and test-time
    thresholds alike, so that a file exported from another version of the config is recognised as stale."""
    import json

    return hashlib.sha256(json.dumps(cfg.model.to_dict(), sort_keys=True, default=repr).encode()).hexdigest()


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 22), b''):
            digest.update(block)
    return digest.hexdigest()
