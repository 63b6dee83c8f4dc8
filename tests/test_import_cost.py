"""Importing inductor_flex leaves Dynamo and Inductor unimported (they cost over a second);
its capture rule and lowerings still go in before anything is traced or lowered, whichever
of the two is imported first. Each case runs in a fresh interpreter."""
import subprocess
import sys
import textwrap

import pytest

COMPILE_AND_CHECK = """
q, k, v = (torch.randn(1, 2, 64, 16, requires_grad=True) for _ in range(3))
out = torch.compile(inductor_flex.flex_attention)(q, k, v)
out.sum().backward()
ref = torch.nn.functional.scaled_dot_product_attention(q.detach(), k.detach(), v.detach())
torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
from torch._inductor.lowering import lowerings
assert inductor_flex.inductor_flex_attention in lowerings
assert inductor_flex.inductor_flex_attention_backward in lowerings
print("ok")
"""


def _run(script: str, then: str = "") -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script) + then],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_import_leaves_dynamo_and_inductor_alone_and_compile_still_works():
    out = _run("""
        import sys
        import torch
        import inductor_flex
        assert "torch._dynamo" not in sys.modules, "inductor_flex imported Dynamo"
        assert "torch._inductor.lowering" not in sys.modules, "inductor_flex imported Inductor"
        bm = inductor_flex.create_block_mask(inductor_flex.masks.causal_mask, None, None, 64, 64,
                                             device="cpu", BLOCK_SIZE=16)
        q = torch.randn(1, 2, 64, 16)
        # Eager attention needs no Inductor (torch's own operator machinery loads Dynamo
        # on a first call, which the capture rule then follows at once).
        inductor_flex.flex_attention(q, q, q, block_mask=bm)
        assert "torch._inductor.lowering" not in sys.modules
    """, COMPILE_AND_CHECK)
    assert out.strip().endswith("ok")


@pytest.mark.parametrize("first", ["torch._dynamo", "torch._inductor.lowering"])
def test_registration_when_dynamo_or_inductor_came_first(first):
    out = _run(f"""
        import torch
        import {first}
        import inductor_flex
    """, COMPILE_AND_CHECK)
    assert out.strip().endswith("ok")


def test_the_inductor_flex_backend_after_a_bare_import():
    out = _run("""
        import torch
        import inductor_flex
        q, k, v = (torch.randn(1, 2, 64, 16) for _ in range(3))
        out = torch.compile(inductor_flex.flex_attention, backend="inductor_flex")(q, k, v)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        print("ok")
    """)
    assert out.strip().endswith("ok")


def test_a_hook_for_a_module_being_imported_runs_when_it_finishes(tmp_path, monkeypatch):
    # inductor_flex imported from inside torch._dynamo's own import: the hook must wait
    # for the module to finish, not be lost.
    from inductor_flex._post_import import when_imported

    (tmp_path / "half_imported.py").write_text(textwrap.dedent("""
        from inductor_flex._post_import import when_imported
        seen = []
        when_imported("half_imported", lambda module: seen.append(module.LATER))
        assert seen == []  # not finished yet
        LATER = "finished"
    """))
    (tmp_path / "imported_after.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    import half_imported

    import imported_after  # noqa: F401  (the first import after it finished)

    assert half_imported.seen == ["finished"]
    ran = []
    when_imported("half_imported", lambda module: ran.append(module.__name__))  # already imported
    assert ran == ["half_imported"]
    sys.modules.pop("half_imported", None)
    sys.modules.pop("imported_after", None)
