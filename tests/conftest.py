"""Settings shared by every test under tests/ (tests/gpu/conftest.py adds the GPU fixtures)."""
import pytest
import torch


def pytest_configure(config):
    # Importing torch._inductor.compile_fx imports torch.utils.mkldnn, whose module-level
    # ScriptModule classes use the deprecated @torch.jit.script_method: torch's own
    # warning, once per import, that users never see (DeprecationWarnings are hidden outside
    # __main__), so the test summary should not show it either. Nothing in inductor_flex
    # uses TorchScript.
    config.addinivalue_line(
        "filterwarnings",
        "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning:torch.jit._script",
    )


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches emptied before and after the test, so compile counts and generated
    code are the test's own (files that compile use it for every test: ``pytestmark``)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
