"""The deployment package's module layout: old import paths keep working, with a deprecation warning."""
import pytest


@pytest.mark.parametrize('name, home', [('OnnxDetector', 'dcn_det.deploy.backends'),
                                        ('TorchDetector', 'dcn_det.deploy.backends'),
                                        ('ModelMismatchError', 'dcn_det.deploy.backends'),
                                        ('onnx_eval_model', 'dcn_det.deploy.backends'),
                                        ('load_detector', 'dcn_det.checkpoint')])
def test_runners_module_is_a_deprecated_alias(name, home):
    import importlib

    from dcn_det.deploy import runners

    with pytest.warns(DeprecationWarning, match=f'dcn_det.deploy.runners is deprecated: import {name} from {home}'):
        alias = getattr(runners, name)
    assert alias is getattr(importlib.import_module(home), name)
    with pytest.raises(AttributeError, match='has no attribute'):
        runners.no_such_name  # noqa: B018


def test_metadata_imports_neither_export_nor_backends():
    """Rule: export uses backends and metadata, backends uses metadata; nothing points back."""
    import ast
    import inspect

    from dcn_det.deploy import backends, metadata

    def imported(module):
        tree = ast.parse(inspect.getsource(module))
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}

    assert not imported(metadata) & {'export', 'backends', 'dcn_det.deploy.export', 'dcn_det.deploy.backends'}
    assert not imported(backends) & {'export', 'dcn_det.deploy.export'}
