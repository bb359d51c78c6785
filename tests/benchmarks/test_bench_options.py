"""Rule: every benchmark refuses an unknown choice in its argument parser (exit 2), listing the valid ones.

Before, ``bench_models.py --variants dcnv2`` ended in a raw KeyError after building models.
"""
import subprocess
import sys

import pytest

from benchmarks import bench_accuracy, bench_models, run_all
from tests._helpers import REPO


@pytest.mark.parametrize('main, argv, valid', [
    (bench_models.main, ['--variants', 'plain', 'dcnv2'], ["'mdconv'", "'mdconv+mdpool'"]),
    (bench_models.main, ['--device', 'gpu'], ["'cpu'", "'cuda'"]),
    (bench_models.main, ['--repeats', '0'], ['at least 1']),
    (run_all.main, ['--only', 'model'], ["'models'", "'accuracy'"]),
    (bench_accuracy.main, ['--variants', 'dcnv3'], ['plain', 'dcnv2']),
], ids=['models-variants', 'models-device', 'models-repeats', 'run_all-only', 'accuracy-variants'])
def test_unknown_choice_is_refused_by_the_parser_listing_the_valid_ones(main, argv, valid, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert all(name in err for name in valid), err


@pytest.mark.parametrize('argv, valid', [
    (['--variants', 'dcn'], "'regular', 'dcnv1', 'dcnv2', 'dilated'"),
    (['--deform-layers', '5'], '0, 1, 2, 3, 4'),
])
def test_bench_digits_refuses_unknown_choices(argv, valid):
    # a script run: bench_digits imports its sibling scaled_digits as a top-level module
    result = subprocess.run([sys.executable, '-m', 'benchmarks.bench_digits', *argv], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 2 and 'invalid choice' in result.stderr and valid in result.stderr, result.stderr
