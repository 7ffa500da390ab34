"""The sparse inference path: swapped linear layers compute what the dense masked model computes."""

from __future__ import annotations

import pytest
import torch

from vlkit.backbone import load_backbone
from vlkit.compress import apply_sparsity, make_permanent
from vlkit.compress.sparse_inference import SparseLinear, to_sparse_inference


@pytest.mark.parametrize("layout", ["csr", "bsr"])
def test_the_sparse_image_tower_equals_the_dense_masked_one(layout):
    torch.manual_seed(0)
    bb = load_backbone("vlkit-tiny-test").eval()
    apply_sparsity(bb.model, 0.8, scope="layer", towers=("image",))
    make_permanent(bb.model)
    images = torch.randn(3, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(1))
    tokens = bb.tokenize(["a red circle"])
    with torch.no_grad():
        dense_img, dense_txt = bb.encode_image(images), bb.encode_text(tokens)
        swapped = to_sparse_inference(bb.model, min_sparsity=0.79, layout=layout, blocksize=8, prefix="visual.")
        assert swapped and all(n.startswith("visual.") and not n.endswith("out_proj") for n in swapped)
        assert all(isinstance(bb.model.get_submodule(n), SparseLinear) for n in swapped)
        assert torch.allclose(bb.encode_image(images), dense_img, atol=1e-5)
        assert torch.equal(bb.encode_text(tokens), dense_txt)  # the dense text tower is untouched
    # nothing below the threshold is swapped
    fresh = load_backbone("vlkit-tiny-test")
    assert to_sparse_inference(fresh.model, min_sparsity=0.5) == []
