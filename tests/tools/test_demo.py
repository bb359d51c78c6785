"""tools/demo.py: the steps it runs, and bfloat16 mixed precision by default on CPUs with AMX-BF16."""
import pytest
import torch

import dcn_det.ops
from tools import demo


@pytest.mark.parametrize('flags,argv,amp', [
    ({'avx512f', 'amx_bf16', 'amx_tile'}, [], True),   # AMX: --amp by default
    ({'avx512f', 'avx512_bf16'}, [], False),            # bfloat16 without AMX: float32 by default
    ({'avx512f', 'amx_bf16'}, ['--no-amp'], False),
    ({'avx2'}, ['--amp'], True),                        # asked for: train.py then refuses it in one line
])
def test_demo_passes_amp_where_the_cpu_has_amx(tmp_path, monkeypatch, capsys, flags, argv, amp):
    monkeypatch.setattr(dcn_det.ops, 'cpu_flags', lambda: frozenset(flags))
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(demo, 'REPO', str(tmp_path))
    (tmp_path / 'data' / 'shapes').mkdir(parents=True)
    work = tmp_path / 'work_dirs' / 'shapes_r18_dcnv2'
    work.mkdir(parents=True)
    (work / 'offsets.png').touch()  # drawn already: not drawn again
    calls = []

    def run(*args):
        calls.append(args)
        if args[0] == 'tools/train.py':
            (work / 'last_checkpoint').write_text('ckpt.pth')

    monkeypatch.setattr(demo, 'run', run)
    demo.main(argv)
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith('demo: bfloat16 mixed precision (--amp)' if amp else 'demo: float32')
    assert len(calls) == 2
    train, test = calls
    assert train[0] == 'tools/train.py' and test[0] == 'tools/test.py'
    assert ('--amp' in train) == amp and ('--amp' in test) == amp
