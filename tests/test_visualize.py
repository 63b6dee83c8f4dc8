"""Pictures (inductor_flex/visualize.py): the arrays they are drawn from against brute-force
truths, the PNGs read back (size, colours at sampled blocks, content), the optional
matplotlib import and the errors for bad inputs."""
import ast
import importlib.util
import math
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

from inductor_flex import create_block_mask, create_mask, flex_attention, masks
from inductor_flex import visualize
from inductor_flex.visualize import EMPTY_BLOCK, FULL_BLOCK, PARTIAL_BLOCK

matplotlib = pytest.importorskip("matplotlib")
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.image import imread  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
CPU = "cpu"


def kinds_from_truth(dense, q_block, kv_block):
    """FULL / PARTIAL / EMPTY per block of a dense bool [Q, KV] mask; a ragged last block
    holds only existing positions."""
    Q, KV = dense.shape
    kinds = torch.empty(math.ceil(Q / q_block), math.ceil(KV / kv_block), dtype=torch.int8)
    for i in range(kinds.shape[0]):
        for j in range(kinds.shape[1]):
            tile = dense[i * q_block:(i + 1) * q_block, j * kv_block:(j + 1) * kv_block]
            kinds[i, j] = FULL_BLOCK if tile.all() else PARTIAL_BLOCK if tile.any() else EMPTY_BLOCK
    return kinds


@pytest.mark.parametrize("mask_mod, length, block", [
    (masks.generate_sliding_window_mask(100), 1000, 128),   # ragged last block
    (masks.generate_prefix_lm_mask(200), 512, (64, 128)),
    (masks.causal_mask, 256, 32),
])
def test_block_kinds_match_the_dense_mask(mask_mod, length, block):
    bm = create_block_mask(mask_mod, None, None, length, length, device=CPU, BLOCK_SIZE=block)
    q_block, kv_block = (block, block) if isinstance(block, int) else block
    truth = kinds_from_truth(create_mask(mask_mod, None, None, length, length, device=CPU)[0, 0],
                             q_block, kv_block)
    assert torch.equal(visualize.block_kinds(bm), truth)


def test_block_kinds_pick_the_batch_and_head():
    lengths = torch.tensor([[64, 192], [128, 128]])
    bm = masks.create_document_block_mask(lengths=lengths, BLOCK_SIZE=64, device=CPU)
    for batch in range(2):
        one = masks.create_document_block_mask(lengths=lengths[batch], BLOCK_SIZE=64, device=CPU)
        assert torch.equal(visualize.block_kinds(bm, batch=batch, head=0), visualize.block_kinds(one))
    # A broadcast head dim serves every head index.
    assert torch.equal(visualize.block_kinds(bm, 1, head=5), visualize.block_kinds(bm, 1, 0))


def pixel_rgb(image, figure, ax, x, y):
    """The RGB of the saved ``image`` at data point (x, y) of ``ax``."""
    px, py = ax.transData.transform((x, y))
    height = image.shape[0]
    assert figure.dpi * figure.get_size_inches()[1] == height
    return tuple(float(c) for c in image[int(height - py), int(px), :3])


def test_block_mask_png_colours_match_the_blocks(tmp_path):
    bm = create_block_mask(masks.generate_sliding_window_mask(300), None, None, 1024, 1024,
                           device=CPU, BLOCK_SIZE=128)
    kinds = visualize.block_kinds(bm)
    assert {EMPTY_BLOCK, PARTIAL_BLOCK, FULL_BLOCK} <= set(kinds.flatten().tolist())
    path = tmp_path / "blocks.png"
    figure = visualize.plot_block_mask(bm, path, figsize=(4, 3), dpi=80)
    image = imread(path)
    assert image.shape[:2] == (240, 320)
    ax = figure.axes[0]
    # Sample every block below the legend (upper right) at its centre, and a quarter in.
    for i in range(3, 8):
        for j in range(8):
            for fraction in (0.5, 0.25):
                got = pixel_rgb(image, figure, ax, (j + fraction) * 128, (i + fraction) * 128)
                want = to_rgb(visualize.BLOCK_COLOURS[int(kinds[i, j])])
                assert got == pytest.approx(want, abs=2 / 255), (i, j, fraction)
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels == [f"{label}: {int((kinds == kind).sum())}" for kind, label in
                      enumerate(["empty (skipped)", "partial (mask_mod applied)", "full (mask_mod skipped)"])]
    assert ax.get_xlabel() == "key token" and ax.get_ylabel() == "query token"
    assert ax.get_xlim() == (0, 1024) and ax.get_ylim() == (1024, 0)


def test_mask_mod_window_and_png(tmp_path):
    mod = masks.generate_chunked_causal_mask(64)
    kept = visualize.mask_mod_window(mod, (100, 300), (0, 256))
    truth = create_mask(mod, None, None, 300, 256, device=CPU)[0, 0, 100:300]
    assert torch.equal(kept, truth)
    path = tmp_path / "tokens.png"
    figure = visualize.plot_mask_mod(mod, path, q_window=(100, 300), kv_window=256, dpi=60)
    image = imread(path)
    assert image.shape[:2] == (300, 300)
    ax = figure.axes[0]
    assert ax.get_xlim() == (0, 256) and ax.get_ylim() == (300, 100)
    for q, kv in ((130, 129), (130, 131), (250, 200), (250, 191), (299, 255)):
        colour = visualize._KEPT_COLOURS[int(truth[q - 100, kv])]
        assert pixel_rgb(image, figure, ax, kv + 0.5, q + 0.5) == pytest.approx(to_rgb(colour), abs=2 / 255)


def test_attention_probabilities_reproduce_flex_attention(tmp_path):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 200, 16, generator=gen) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # grouped-query: 2 key heads for 4 query heads
    score_mod = masks.generate_alibi_bias(4)
    bm = create_block_mask(masks.generate_sliding_window_mask(50), None, None, 200, 200,
                           device=CPU, BLOCK_SIZE=64)
    out = flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=True)
    for batch, head in ((0, 0), (1, 3)):
        weights = visualize.attention_window(q, k, score_mod, bm, batch=batch, head=head,
                                             q_window=200)
        assert weights.shape == (200, 200)
        torch.testing.assert_close(weights @ v[batch, head // 2], out[batch, head], atol=1e-5, rtol=1e-5)
        window = (torch.arange(200)[:, None] - torch.arange(200)[None, :])
        assert bool((weights[(window < 0) | (window > 50)] == 0).all())
    scores = visualize.attention_window(q, k, score_mod, bm, probabilities=False,
                                        q_window=(10, 20), kv_window=(0, 30))
    assert scores.shape == (10, 30) and bool(torch.isneginf(scores[0, 11:]).all())
    path = tmp_path / "scores.png"
    visualize.plot_attention(q, k, path, score_mod=score_mod, block_mask=bm, probabilities=False,
                             q_window=120, dpi=50)
    image = imread(path)
    assert image.shape[:2] == (250, 280)
    # Non-trivial: a heat map has many colours, not a blank canvas.
    assert len(torch.unique(torch.from_numpy(image[..., :3].reshape(-1, 3).copy()), dim=0)) > 50


def test_bad_inputs():
    bm = create_block_mask(masks.causal_mask, 2, None, 128, 128, device=CPU, BLOCK_SIZE=64)
    q = torch.randn(1, 2, 128, 8)
    with pytest.raises(TypeError, match="BlockMask"):
        visualize.block_kinds(torch.ones(2, 2))
    with pytest.raises(ValueError, match="batch=2 is out of range"):
        visualize.plot_block_mask(bm, batch=2)
    with pytest.raises(TypeError, match="head must be an int"):
        visualize.block_kinds(bm, head=0.5)
    with pytest.raises(TypeError, match="mask_mod must be callable"):
        visualize.plot_mask_mod("causal")
    with pytest.raises(ValueError, match="at most 4096"):
        visualize.mask_mod_window(masks.causal_mask, 5000)
    with pytest.raises(ValueError, match="start < stop"):
        visualize.mask_mod_window(masks.causal_mask, (10, 10))
    with pytest.raises(ValueError, match="query must be a 4-d tensor"):
        visualize.attention_window(q[0], q)
    with pytest.raises(ValueError, match="do not fit"):
        visualize.attention_window(q, torch.randn(1, 2, 128, 4))
    with pytest.raises(ValueError, match="reaches past"):
        visualize.attention_window(q, q, q_window=200)
    with pytest.raises(ValueError, match="block_mask is for"):
        visualize.attention_window(q, q, block_mask=create_block_mask(
            masks.causal_mask, None, None, 64, 64, device=CPU))


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # None in sys.modules: ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"inductor_flex\[pictures\]"):
        visualize.plot_mask_mod(masks.causal_mask, q_window=8)


def test_matplotlib_and_torch_flex_attention_are_not_imported_at_module_level():
    # Importing the package (and these modules) must not pull matplotlib in.
    script = textwrap.dedent("""
        import sys
        import inductor_flex, inductor_flex.visualize, inductor_flex.bench
        print("matplotlib" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    # PyTorch's FlexAttention: never in visualize.py; in bench.py only inside functions
    # (the baseline it measures against).
    for name in ("visualize.py", "bench.py"):
        tree = ast.parse((REPO / "inductor_flex" / name).read_text())
        top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        everywhere = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
        for node, refused in [(node, "matplotlib") for node in top_level] + [
                (node, "flex_attention") for node in (everywhere if name == "visualize.py" else top_level)]:
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            names += [a.name for a in node.names]
            assert not any(refused in n for n in names), (name, names)


def test_docs_pictures_are_listed_and_small():
    # docs/masks.md's generated section is what docs/make_pictures.py writes now, and each
    # family's PNG is committed and small (the docs allow < 60 KB each, < 1 MB in all).
    spec = importlib.util.spec_from_file_location("make_pictures", REPO / "docs" / "make_pictures.py")
    make_pictures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_pictures)
    families = [*make_pictures.MASK_FAMILIES, *make_pictures.SCORE_FAMILIES]
    assert {make_pictures.family_name(m) for m in families} == {
        path.stem for path in (REPO / "inductor_flex" / "masks").glob("[!_]*.py")}
    page = (REPO / "docs" / "masks.md").read_text()
    assert make_pictures.markdown_section(families) in page
    sizes = [(REPO / "docs" / "pictures" / f"{make_pictures.family_name(m)}.png").stat().st_size
             for m in families]
    assert max(sizes) < 60_000 and sum(sizes) < 1_000_000
