"""benchmarks/bench_accuracy.py: the statistics the README quotes, run order, reuse of finished runs, bad input."""
import json
import math
import os.path as osp
import random
import re

import pytest

from benchmarks import bench_accuracy as bench


def _run(variant: str, seed: int, mAP: float, minutes=10.0) -> dict:
    return dict(variant=variant, seed=seed, minutes=minutes, mAP=mAP, mAP50=2 * mAP, mAP75=mAP / 2,
                mAP_s=mAP, mAP_m=mAP)


def test_summary_is_mean_and_sample_std_and_pairs_with_plain_by_seed():
    runs = [_run('plain', 0, 0.10), _run('plain', 1, 0.20), _run('plain', 2, 0.30),
            _run('dcnv2', 2, 0.33), _run('dcnv2', 0, 0.09)]  # dcnv2 lacks seed 1, listed out of order
    random.Random(0).shuffle(runs)
    summary = bench.summarize(runs)
    plain, dcn = summary['plain'], summary['dcnv2']
    assert plain['mAP']['mean'] == pytest.approx(0.20)
    assert plain['mAP']['std'] == pytest.approx(0.10)  # sample std (n - 1), not population
    assert plain['mAP50']['mean'] == pytest.approx(0.40)
    assert [r['seed'] for r in dcn['runs']] == [0, 2]
    assert 'vs_plain' not in plain
    vs = dcn['vs_plain']
    assert vs['seeds'] == [0, 2]  # paired by seed: 0.09 - 0.10 and 0.33 - 0.30, not by list position
    assert vs['mean'] == pytest.approx(0.01)
    assert vs['std'] == pytest.approx(math.sqrt(2) * 0.02)
    assert vs['wins'] == 1


def test_summary_without_plain_has_no_difference_and_one_seed_has_zero_std():
    summary = bench.summarize([_run('mdconv', 3, 0.25)])
    assert summary['mdconv']['mAP'] == dict(mean=0.25, std=0.0)
    assert 'vs_plain' not in summary['mdconv']


def test_resumed_runs_are_left_out_of_the_time_but_not_the_accuracy():
    summary = bench.summarize([_run('plain', 0, 0.1, minutes=8.0), _run('plain', 1, 0.3, minutes=None)])
    assert summary['plain']['minutes'] == dict(mean=8.0, std=0.0)
    assert summary['plain']['mAP']['mean'] == pytest.approx(0.2)
    assert bench.summarize([_run('plain', 0, 0.1, minutes=None)])['plain']['minutes'] is None


def test_two_runs_of_one_variant_and_seed_are_refused():
    with pytest.raises(ValueError, match='two runs of plain with seed 0'):
        bench.summarize([_run('plain', 0, 0.1), _run('plain', 0, 0.2)])


def test_table_shows_percentages_and_the_paired_difference():
    text = bench.table(bench.summarize([_run('plain', 0, 0.10), _run('plain', 1, 0.20),
                                        _run('dcnv2', 0, 0.15), _run('dcnv2', 1, 0.18)]))
    plain_row, dcn_row = text.splitlines()[2:]
    assert plain_row.startswith('| plain | 2 | **15.0 ± 7.1** | – |')
    assert dcn_row.startswith('| dcnv2 | 2 | **16.5 ± 2.1** | +1.5 ± 4.9 (1/2 wins) |')


def test_runs_go_seed_by_seed_with_variants_interleaved():
    assert bench.plan(['plain', 'dcnv2'], [0, 1]) == [('plain', 0), ('dcnv2', 0), ('plain', 1), ('dcnv2', 1)]


def test_a_finished_run_is_reused_not_retrained(tmp_path, monkeypatch):
    record = _run('plain', 0, 0.2) | dict(epochs=6, threads=1)
    work = tmp_path / 'plain_s0_e6'
    work.mkdir()
    (work / 'result.json').write_text(json.dumps(record))

    def no_subprocess(*args, **kwargs):
        raise AssertionError('a finished run was trained or tested again')

    monkeypatch.setattr(bench.subprocess, 'run', no_subprocess)
    assert bench.run_one('plain', 0, 6, 'data/shapes', 1, str(tmp_path)) == record


def test_the_shipped_variants_are_found():
    assert {'plain', 'mdconv', 'mdpool', 'dcnv2'} <= set(bench.available_variants())


@pytest.mark.parametrize('argv, message', [
    (['--variants', 'plain', 'dcnv3'], r'no config for variant\(s\) dcnv3: choose from .*dcnv2'),
    (['--seeds', '0', '0'], '--seeds names a value twice'),
    (['--jobs', '0'], '--jobs and --epochs must be at least 1'),
    (['--test-data', 'data/nowhere'], r'has no annotations/instances_val.json: make one with tools/make_demo_data'),
])
def test_bad_arguments_are_refused_before_any_run(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, 'run_one', lambda *a: pytest.fail('ran despite bad arguments'))
    with pytest.raises(SystemExit):
        bench.main([*argv, '--out', str(tmp_path / 'a.json'), '--work-root', str(tmp_path)])
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / 'a.json').exists()


def test_a_run_trains_on_the_stretched_schedule_and_tests_on_the_test_data(tmp_path, monkeypatch):
    """The options reach the real config through the tools' own parsers: the lr drop follows --epochs
    (a bare max_epochs would leave it at 5)."""
    from dcn_det.cli import load_config
    from tools import test as test_tool
    from tools import train as train_tool

    calls = []

    def fake_tool(log, tool, config, *args, threads):
        calls.append((tool, config, args))
        if tool == 'tools/test.py':
            work = args[args.index('--work-dir') + 1]
            metrics = {v: 0.5 for v in bench.METRICS.values()}
            (tmp_path / work / 'test_metrics.json').write_text(json.dumps(dict(metrics=metrics)))

    monkeypatch.setattr(bench, '_run_tool', fake_tool)
    record = bench.run_one('dcnv2', 3, 12, 'data/shapes', 1, str(tmp_path), test_data='data/big_val')
    (train, config, train_args), (test, _, test_args) = calls
    assert (train, test) == ('tools/train.py', 'tools/test.py')
    assert config == 'configs/shapes_r18_dcnv2.py'

    def merged(tool, args):
        parsed = tool.parse_args([osp.join(bench.REPO, config), *args])
        return parsed, load_config(parsed.config, parsed.cfg_options)

    parsed, cfg = merged(train_tool, train_args)
    assert parsed.resume == 'auto'
    assert cfg.randomness.seed == 3 and cfg.train_cfg.max_epochs == 12
    assert cfg.param_scheduler[1].milestones == [11] and cfg.param_scheduler[1].end == 12
    assert merged(test_tool, test_args)[1].test_evaluator.ann_file == 'data/big_val/annotations/instances_val.json'
    assert record['mAP'] == 0.5 and record['test_data'] == 'data/big_val'
    assert json.loads((tmp_path / 'dcnv2_s3_e12' / 'result_big_val.json').read_text()) == record
