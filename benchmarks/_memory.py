"""Peak CPU memory of a step, for the benchmarks that run each variant in a fresh process."""


def reset_peak_rss() -> float:
    """Current RSS in MiB, after resetting the peak (``VmHWM``) to it.

    Not ``ru_maxrss``: Linux carries the parent's peak RSS into a child across fork and exec, which
    hides any growth below it.
    """
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    return _status_mib('VmRSS')


def peak_rss() -> float:
    """Peak RSS in MiB since the last :func:`reset_peak_rss`."""
    return _status_mib('VmHWM')


def _status_mib(field: str) -> float:
    with open('/proc/self/status') as f:
        fields = dict(line.split(':', 1) for line in f)
    return int(fields[field].split()[0]) / 1024
