"""ONNX and OpenVINO export: agreement with PyTorch (mAP and per layer) and latency, onnxruntime and OpenVINO vs
PyTorch, CPU.

    .venv/bin/python -m benchmarks.bench_onnx agreement --checkpoint work_dirs/shapes_r18_dcnv2/epoch_12.pth
    .venv/bin/python -m benchmarks.bench_onnx latency [--checkpoint CKPT] [--threads 1 2] [--repeats 5]

``agreement`` (default config: the demo's ``configs/shapes_r18_dcnv2.py``, its val set) exports the
checkpoint with ``tools/export_onnx.py`` and evaluates it with ``tools/test.py`` (COCO bbox mAP):
PyTorch with its own kernels, PyTorch on the kernels the export uses (torchvision's), onnxruntime, and
the OpenVINO IR (``tools/export_openvino.py``, ``tools/test.py --openvino``) in f32 and bf16; then the
same with a fixed RoI sampling ratio (``--fixed-ratio``, 2) instead of the adaptive one the configs train
with, to show what fixing it would change. Every deformable layer (conv and RoI pooling)
is also exported alone and run in onnxruntime on what it received for one val image; its error is
``max |ort - torch| / max |torch|``. Writes ``work_dirs/bench/onnx_agreement.json``.

``latency``: per-image time of one forward (the resized image in, detections out; decoding and resizing
the image are the same for all and left out) in PyTorch (``model.test_step``, the config's normalisation
included), onnxruntime, and OpenVINO in f32 and bf16 (the IR of the same model; bf16 is left out, with
OpenVINO's reason, on a CPU that cannot run it), at 1 and 2 threads, medians of ``--repeats`` after one
warm-up, the runtimes interleaved. Models: the demo at 320x320 (the checkpoint's weights if given, else random), and
Faster R-CNN R50-FPN plain vs DCNv2 (the flagship) at 800x1333 in an 800x1344 input, **random weights**
(``init_cfg=None``, no pretrained file needed): the time does not depend on the weights, except that
random weights give few detections, so per-class NMS costs less than it would on a trained model.
Writes ``work_dirs/bench/onnx_latency.json``, with the CPU's OpenVINO capabilities.
"""
import argparse
import functools
import json
import os
import os.path as osp
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks._machine import describe, machine

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))

DEMO = 'configs/shapes_r18_dcnv2.py'
METRICS = ('bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75', 'bbox_mAP_s', 'bbox_mAP_m')
LATENCY_MODELS = {  # name: (config, resized image (h, w), fixed input (H, W))
    'demo (R18 DCNv2, 320²)': (DEMO, (320, 320), (320, 320)),
    'R50-FPN plain, 800x1333': ('configs/faster_rcnn_r50_fpn.py', (800, 1333), (800, 1344)),
    'R50-FPN DCNv2 (flagship), 800x1333': ('configs/faster_rcnn_dcnv2.py', (800, 1333), (800, 1344)),
}


def run_tool(*args: str) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    if run.returncode:
        sys.exit(f'{" ".join(args)} failed:\n{run.stderr[-3000:]}')
    return run


def evaluate(config: str, checkpoint: str, work: str, *extra: str) -> dict:
    run_tool('tools/test.py', config, checkpoint, '--work-dir', work, *extra)
    with open(osp.join(work, 'test_metrics.json')) as f:
        metrics = json.load(f)['metrics']
    return {k: round(100 * metrics[f'coco/{k}'], 2) for k in METRICS}


def roi_layer_key(cfg):
    """The cfg-options key of the deformable RoI layer (whose sampling ratio and backend the runs set), or
    None for a plain RoI head."""
    layer = cfg.model.roi_head.bbox_roi_extractor.roi_layer
    return 'model.roi_head.bbox_roi_extractor.roi_layer' if 'Deform' in str(layer.type) else None


def agreement(args) -> dict:
    from mmengine.config import Config

    import dcn_det  # noqa: F401
    from dcn_det.checkpoint import load_detector
    from dcn_det.deploy import TorchDetector, read_image
    from dcn_det.deploy.agreement import layer_agreement

    cfg = Config.fromfile(osp.join(REPO, args.config))
    layer_key = roi_layer_key(cfg)
    settings = [('adaptive', [])]  # (name, cfg-options of the run)
    if layer_key:
        settings.append((f'fixed {args.fixed_ratio}', [f'{layer_key}.sampling_ratio={args.fixed_ratio}']))
    tv_kernels = [f'{layer_key}.backend=torchvision'] if layer_key else []
    if cfg.model.backbone.get('dcn'):
        tv_kernels.append('model.backbone.dcn.backend=torchvision')
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, options in settings:
            cfg_options = ['--cfg-options', *options] if options else []
            onnx_path = osp.join(tmp, f'{len(rows)}.onnx')
            run_tool('tools/export_onnx.py', args.config, args.checkpoint, onnx_path, *cfg_options)
            work = osp.join(tmp, f'work{len(rows)}')
            pytorch = evaluate(args.config, args.checkpoint, work + 'pt', *cfg_options)
            torchvision = evaluate(args.config, args.checkpoint, work + 'tv', '--cfg-options', *options, *tv_kernels) \
                if tv_kernels else pytorch
            ort = evaluate(args.config, args.checkpoint, work + 'ort', '--onnx', onnx_path, *cfg_options)
            ir_path = osp.join(tmp, f'{len(rows)}.xml')
            run_tool('tools/export_openvino.py', args.config, args.checkpoint, ir_path, *cfg_options)
            openvino = {precision: evaluate(args.config, args.checkpoint, work + 'ov' + precision, '--openvino',
                                            ir_path, '--precision', precision, *cfg_options)
                        for precision in ('f32', 'bf16')}
            rows.append(dict(sampling=name, pytorch=pytorch, pytorch_torchvision_kernels=torchvision, onnxruntime=ort,
                             openvino_f32=openvino['f32'], openvino_bf16=openvino['bf16'],
                             delta_map=round(ort['bbox_mAP'] - pytorch['bbox_mAP'], 2),
                             delta_map_openvino_f32=round(openvino['f32']['bbox_mAP'] - pytorch['bbox_mAP'], 2)))
            print(f"{name}: PyTorch {pytorch['bbox_mAP']:.2f}, PyTorch on torchvision kernels "
                  f"{torchvision['bbox_mAP']:.2f}, onnxruntime {ort['bbox_mAP']:.2f}, OpenVINO f32 "
                  f"{openvino['f32']['bbox_mAP']:.2f}, bf16 {openvino['bf16']['bbox_mAP']:.2f} mAP", flush=True)
    model = load_detector(cfg, args.checkpoint)
    runner = TorchDetector(model, cfg)
    dataset = cfg.test_dataloader.dataset
    val_dir = osp.join(dataset.data_root, dataset.data_prefix.img)
    image = read_image(osp.join(val_dir, sorted(os.listdir(val_dir))[0]))
    layers = layer_agreement(model, lambda: runner([image]))
    result = dict(machine=machine(), config=args.config, checkpoint=args.checkpoint, mAP=rows, layers=layers,
                  max_layer_rel_err=max((r['rel_err'] for r in layers.values()), default=0.0))
    print(f'\nbbox mAP on {val_dir} ({describe(result["machine"])})\n')
    print('| RoI sampling | PyTorch | PyTorch, torchvision kernels | onnxruntime | OpenVINO f32 | OpenVINO bf16 '
          '| Δ (ORT - PyTorch) | Δ (OV f32 - PyTorch) | AP50 PT / ORT / OV f32 / OV bf16 |')
    print('| --- ' * 9 + '|')
    for r in rows:
        maps = [r[k] for k in ('pytorch', 'pytorch_torchvision_kernels', 'onnxruntime', 'openvino_f32',
                               'openvino_bf16')]
        print(f"| {r['sampling']} | " + ' | '.join(f"{m['bbox_mAP']:.2f}" for m in maps) +
              f" | {r['delta_map']:+.2f} | {r['delta_map_openvino_f32']:+.2f} | " +
              ' / '.join(f"{m['bbox_mAP_50']:.2f}" for m in maps[:1] + maps[2:]) + ' |')
    print('\n| layer | kind | output | max rel. error |\n| --- | --- | --- | --- |')
    for name, r in layers.items():
        print(f"| {name} | {r['kind']} | {'x'.join(map(str, r['shape']))} | {r['rel_err']:.1e} |")
    return result


def kernels(compiled) -> dict:
    """``{layer type: {kernel, ...}}`` for the compute-heavy layers of an OpenVINO compiled model: which
    instructions ran them (e.g. ``brgconv_avx512_bf16``: AVX512_BF16; ``..._amx_...``: AMX)."""
    found = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = info['layerType'].astype(str) if 'layerType' in info else ''
        if layer in ('Convolution', 'DeformableConvolution', 'ROIAlign', 'FullyConnected'):
            found.setdefault(layer, set()).add(info['primitiveType'].astype(str))
    return {layer: sorted(kinds) for layer, kinds in found.items()}


def latency(args) -> dict:
    import numpy as np
    import torch
    from mmengine.config import Config

    import dcn_det  # noqa: F401
    from dcn_det.checkpoint import load_detector
    from dcn_det.deploy import (
        InputSpec,
        OnnxDetector,
        OpenVinoDetector,
        TorchDetector,
        config_classes,
        export_onnx,
        export_openvino,
        make_batch,
        prepare,
    )

    runtimes = ('pytorch', 'onnxruntime', 'openvino_f32', 'openvino_bf16')
    results, refused = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            config, (h, w), shape = LATENCY_MODELS[name]
            cfg = Config.fromfile(osp.join(REPO, config))
            cfg.model.backbone.init_cfg = None
            checkpoint = args.checkpoint if config == DEMO else None
            model = load_detector(cfg, checkpoint)
            spec = InputSpec.from_config(cfg)
            path = osp.join(tmp, f'{len(results)}.onnx')
            export_onnx(model, spec, path, classes=config_classes(cfg), shape=shape, verify=False)
            ir_path = osp.join(tmp, f'{len(results)}.xml')
            export_openvino(model, spec, ir_path, classes=config_classes(cfg), shape=shape, verify=False)
            rng = np.random.default_rng(0)
            image = np.clip(rng.normal(110, 60, (h, w, 3)), 0, 255).astype(np.uint8)  # already at its resized size
            prepared = prepare(image, spec)
            feed = make_batch([prepared.image], [prepared.scale_factor], spec, shape)
            pipeline = TorchDetector(model, cfg).pipeline(dict(img=image, img_id=0))
            data = dict(inputs=[pipeline['inputs']], data_samples=[pipeline['data_samples']])
            row = dict(config=config, image=[h, w], input=list(shape), weights=checkpoint or 'random')
            for threads in args.threads:
                torch.set_num_threads(threads)
                runs = {'pytorch': functools.partial(model.test_step, data),
                        'onnxruntime': functools.partial(OnnxDetector(path, threads=threads).infer, feed)}
                for precision in ('f32', 'bf16'):
                    try:
                        ov = OpenVinoDetector(ir_path, threads=threads, precision=precision)
                    except ValueError as e:  # a CPU without bf16: say so, time the rest
                        refused[f'openvino_{precision}'] = str(e)
                        continue
                    runs[f'openvino_{precision}'] = functools.partial(ov.infer, feed)
                    row.setdefault('openvino_kernels', {})[precision] = kernels(ov.compiled)
                times = {runtime: [] for runtime in runs}
                for _ in range(args.repeats + 1):  # the first round warms up
                    for runtime, fn in runs.items():
                        start = time.perf_counter()
                        with torch.no_grad():
                            fn()
                        times[runtime].append(time.perf_counter() - start)
                medians = {runtime: statistics.median(t[1:]) for runtime, t in times.items()}
                cell = {f'{runtime}_s': round(t, 4) for runtime, t in medians.items()}
                cell.update({f'speedup_{runtime}': round(medians['pytorch'] / t, 2) for runtime, t in medians.items()
                             if runtime != 'pytorch'})
                cell['speedup'] = cell['speedup_onnxruntime']
                row[f'{threads}_threads'] = cell
                print(f'{name}, {threads} thread(s): ' + ', '.join(f'{k} {t:.3f} s' for k, t in medians.items()),
                      flush=True)
            results[name] = row
    import openvino

    core = openvino.Core()
    result = dict(machine=machine(), openvino=dict(version=openvino.__version__,
                                                   cpu=core.get_property('CPU', 'FULL_DEVICE_NAME'),
                                                   capabilities=list(core.get_property('CPU',
                                                                                       'OPTIMIZATION_CAPABILITIES')),
                                                   refused=refused),
                  repeats=args.repeats, models=results)
    print(f'\nper-image time, one forward ({describe(result["machine"])}), median of {args.repeats}; OpenVINO '
          f"{openvino.__version__}, CPU capabilities {', '.join(result['openvino']['capabilities'])}\n")
    names = {'pytorch': 'PyTorch', 'onnxruntime': 'ORT', 'openvino_f32': 'OV f32', 'openvino_bf16': 'OV bf16'}
    print('| model | threads | ' + ' | '.join(f'{names[r]} s' for r in runtimes) + ' |\n' + '| --- ' * 6 + '|')
    for name, row in results.items():
        for t in args.threads:
            cell = row[f'{t}_threads']
            print(f'| {name} | {t} | ' + ' | '.join(
                '—' if f'{r}_s' not in cell else f"{cell[f'{r}_s']:.3f}" +
                (f" (×{cell[f'speedup_{r}']:.2f})" if r != 'pytorch' else '') for r in runtimes) + ' |')
    for runtime, why in refused.items():
        print(f'{names[runtime]} not timed: {why}')
    for name, row in results.items():
        for precision, found in row.get('openvino_kernels', {}).items():
            print(f'OpenVINO {precision} kernels, {name}: ' + '; '.join(f'{k} {"/".join(v)}' for k, v in found.items()))
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='what', required=True)
    agree = sub.add_parser('agreement', help='mAP and per-layer agreement of the exported model')
    agree.add_argument('--config', default=DEMO)
    agree.add_argument('--checkpoint', required=True, help='the trained checkpoint of --config')
    agree.add_argument('--fixed-ratio', type=int, default=2, help='the fixed RoI sampling ratio to compare with')
    agree.add_argument('--out', default=osp.join(REPO, 'work_dirs', 'bench', 'onnx_agreement.json'))
    lat = sub.add_parser('latency', help='per-image time, onnxruntime and OpenVINO vs PyTorch')
    lat.add_argument('--checkpoint', help='weights for the demo model (default: random)')
    lat.add_argument('--models', nargs='+', choices=list(LATENCY_MODELS), default=list(LATENCY_MODELS),
                     metavar='MODEL', help='any of: ' + '; '.join(LATENCY_MODELS))
    lat.add_argument('--threads', nargs='+', type=int, default=[1, 2])
    lat.add_argument('--repeats', type=int, default=5)
    lat.add_argument('--out', default=osp.join(REPO, 'work_dirs', 'bench', 'onnx_latency.json'))
    args = parser.parse_args(argv)
    if getattr(args, 'checkpoint', None) and not osp.isfile(args.checkpoint):
        parser.error(f'--checkpoint {args.checkpoint!r} does not exist')
    if args.what == 'latency' and (args.repeats < 1 or min(args.threads) < 1):
        parser.error('--repeats and --threads must be at least 1')
    result = agreement(args) if args.what == 'agreement' else latency(args)
    os.makedirs(osp.dirname(args.out), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=2)
    print(f'\nwritten to {args.out}')
    return result


if __name__ == '__main__':
    main()
