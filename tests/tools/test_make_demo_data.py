"""tools/make_demo_data.py: the command line over dcn_det.data.synthetic (tested in tests/data)."""
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


def _cli():
    spec = importlib.util.spec_from_file_location('make_demo_data', REPO / 'tools' / 'make_demo_data.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_writes_the_dataset_and_prints_the_summary(tmp_path, capsys):
    out = tmp_path / 'shapes'
    summary = _cli().main(['--out', str(out), '--num-train', '2', '--num-val', '1', '--image-size', '128',
                           '--max-size', '64', '--classes', 'heart, ring', '--seed', '3'])
    assert summary['classes'] == ['heart', 'ring'] and summary['images'] == {'train': 2, 'val': 1}
    info = json.loads((out / 'annotations' / 'instances_val.json').read_text())['info']
    assert info['generator']['seed'] == 3
    printed = capsys.readouterr().out
    assert f'wrote {out}: 2 train / 1 val images' in printed and 'heart' in printed


@pytest.mark.parametrize('argv, message', [
    (['--classes', 'ellipse,blob'], "unknown class 'blob'"),
    (['--max-size', '200'], 'max_size=200 does not fit image_size=320'),
])
def test_cli_bad_input_is_one_error_line_and_writes_nothing(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        _cli().main(['--out', str(tmp_path / 'shapes'), *argv])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if 'error:' in line]
    assert len(errors) == 1 and message in errors[0]
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_to_overwrite(tmp_path, capsys):
    (tmp_path / 'shapes').mkdir()
    (tmp_path / 'shapes' / 'keep.txt').write_text('precious')
    with pytest.raises(SystemExit):
        _cli().main(['--out', str(tmp_path / 'shapes')])
    assert 'delete it or choose another' in capsys.readouterr().err
    assert _files(tmp_path / 'shapes') == {'keep.txt': b'precious'}
