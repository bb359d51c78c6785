"""What a benchmark figure was measured on: every benchmark's JSON records it and its table names it.

A ratio to a dense conv holds for one CPU: oneDNN's dense conv uses the widest vectors the CPU has
(AVX-512 against AVX2 changes its time a lot), so the model and ``torch.backends.cpu.get_cpu_capability()``
go with every figure.
"""
import datetime
import os
import platform

import torch


def cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or 'unknown CPU'


def load_average() -> list:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def machine(device: str = 'cpu') -> dict:
    """The JSON record: date, CPU model and capability, cores, threads, load, torch, GPU if any."""
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
                cpu=cpu_model(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
                cores=os.cpu_count(), threads=torch.get_num_threads(), load_average=load_average(),
                torch=torch.__version__)
    if device.startswith('cuda'):
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return info


def describe(info: dict) -> str:
    """One line for a table's caption, e.g. 'AMD EPYC (AVX512), 2 cores, 1 thread, torch 2.14.1, 2026-12-02'."""
    where = info.get('gpu') or f"{info['cpu']} ({info['cpu_capability']}), {info['cores']} cores"
    threads = '' if info.get('gpu') else f", {info['threads']} thread{'s' if info['threads'] > 1 else ''}"
    return f"{where}{threads}, torch {info['torch']}, {info['date'][:10]}"
