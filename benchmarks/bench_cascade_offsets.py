"""Cascade R-CNN with DCNv2: one RoI offset predictor per stage (the configs' default) vs one shared by the stages.

    .venv/bin/python -m benchmarks.bench_cascade_offsets [--config cascade_rcnn_dcnv2.py] [--size 512] [--repeats 3]

mmdet's ``CascadeRoIHead`` builds the box extractor once per stage, so each stage's ``DeformRoIExtractor`` has its
own offset predictor; "shared" ties stages 2 and 3 to stage 1's (the same module, as
``share_offset_predictor`` ties the FPN levels within a stage). Same random weights and inputs (2 images, 5 boxes
each) for both, variants interleaved in every repeat, medians; parameters counted once each (a shared one once).
Writes ``work_dirs/bench/cascade_offsets.json``.
"""
import argparse
import json
import os
import os.path as osp
import statistics

import torch

from benchmarks._machine import describe, machine
from benchmarks.bench_models import REPO, inputs, train_step


def build(config: str, shared: bool):
    import logging

    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.logging import MMLogger
    from mmengine.registry import init_default_scope

    import dcn_det  # noqa: F401

    cfg = Config.fromfile(osp.join(REPO, 'configs', config))
    cfg.model.backbone.init_cfg = None
    init_default_scope('mmdet')
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    MMLogger.get_current_instance().setLevel(logging.WARNING)  # init_weights logs every parameter
    model.init_weights()
    extractors = model.roi_head.bbox_roi_extractor
    if shared:
        for extractor in extractors[1:]:
            extractor.offset_predictor = extractors[0].offset_predictor
    return model


def predictor_params(model) -> int:
    seen = {id(p): p for e in model.roi_head.bbox_roi_extractor for p in e.offset_predictor.parameters()}
    return sum(p.numel() for p in seen.values())


def infer(model, data) -> float:
    import time

    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        model(**model.data_preprocessor(data, False), mode='predict')
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--config', default='cascade_rcnn_dcnv2.py')
    parser.add_argument('--size', type=int, default=512)
    parser.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args(argv)
    models = {'per stage': build(args.config, False), 'shared': build(args.config, True)}
    data = inputs(args.size, 'cpu')
    times = {name: {'train_s': [], 'infer_s': []} for name in models}
    for model in models.values():  # warm-up
        train_step(model, data, 'cpu')
        infer(model, data)
    for _ in range(args.repeats):
        for name, model in models.items():
            times[name]['train_s'].append(train_step(model, data, 'cpu'))
            times[name]['infer_s'].append(infer(model, data))
    result = dict(machine=machine(), config=args.config, size=args.size, repeats=args.repeats, variants={})
    for name, model in models.items():
        result['variants'][name] = dict(
            params_m=sum(p.numel() for p in model.parameters()) / 1e6,  # parameters() yields a shared one once
            offset_predictor_params_m=predictor_params(model) / 1e6,
            **{k: statistics.median(v) for k, v in times[name].items()})
    base = result['variants']['per stage']
    os.makedirs(osp.join(REPO, 'work_dirs', 'bench'), exist_ok=True)
    with open(osp.join(REPO, 'work_dirs', 'bench', 'cascade_offsets.json'), 'w') as f:
        json.dump(result, f, indent=2)
    print(f'{args.config}, 2 x {args.size}² images, median of {args.repeats}; {describe(result["machine"])}\n')
    print('| offset predictor | params (M) | of which offset predictors | train step s | × per stage '
          '| inference s | × per stage |')
    print('| --- | --- | --- | --- | --- | --- | --- |')
    for name, r in result['variants'].items():
        print(f"| {name} | {r['params_m']:.1f} | {r['offset_predictor_params_m']:.1f} | {r['train_s']:.2f} | "
              f"{r['train_s'] / base['train_s']:.2f} | {r['infer_s']:.2f} | {r['infer_s'] / base['infer_s']:.2f} |")
    return result


if __name__ == '__main__':
    main()
