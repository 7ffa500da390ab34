"""Sparse inference on CPU: linear layers whose weights are mostly zero run as sparse x dense products.

``to_sparse_inference(model, min_sparsity=0.8)`` swaps every ``nn.Linear`` whose weight has at least that
share of zeros for a ``SparseLinear`` holding the weight in a torch sparse layout (CSR by default, or BSR
blocks); the outputs equal the dense model's up to float summation order. Whether it is *faster* depends on
the layer's size, the batch and the CPU: ``benchmarks/sparse_inference.py`` measures every option side by
side, and README records when it pays and when it loses. Inference only (the weights are frozen).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["LAYOUTS", "SparseLinear", "to_sparse_inference", "weight_sparsity"]

LAYOUTS = ("csr", "bsr")


def weight_sparsity(weight: Tensor) -> float:
    return float((weight == 0).float().mean()) if weight.numel() else 0.0


class SparseLinear(nn.Module):
    """y = x W^T + b with W stored sparse (``layout`` csr, or bsr with square ``blocksize`` blocks)."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, layout: str = "csr", blocksize: int = 16) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
        w = weight.detach()
        self.out_features, self.in_features = w.shape
        self.layout = layout
        sparse = w.to_sparse_csr() if layout == "csr" else w.to_sparse_bsr((blocksize, blocksize))
        self.register_buffer("weight_sparse", sparse, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, layout: str = "csr", blocksize: int = 16) -> SparseLinear:
        return cls(linear.weight, linear.bias, layout, blocksize)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        # (W @ x^T)^T: torch's sparse kernels take the sparse operand on the left
        y = torch.sparse.mm(self.weight_sparse, flat.T).T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def dense_weight(self) -> Tensor:
        return self.weight_sparse.to_dense()

    def extra_repr(self) -> str:
        nnz = self.weight_sparse.values().numel()
        return f"{self.in_features}, {self.out_features}, layout={self.layout}, density={nnz / (self.in_features * self.out_features):.2f}"


@torch.no_grad()
def to_sparse_inference(model: nn.Module, min_sparsity: float = 0.8, layout: str = "csr", blocksize: int = 16,
                        prefix: str = "") -> list[str]:
    """Replace, in place, every ``nn.Linear`` under ``prefix`` whose weight is at least ``min_sparsity`` zeros
    (and, for bsr, whose sides are multiples of ``blocksize``) by a ``SparseLinear``. Returns their names."""
    swapped = []
    # nn.MultiheadAttention reads its out_proj's weight directly: those stay dense
    inside_mha = {f"{n}.out_proj" if n else "out_proj" for n, m in model.named_modules()
                  if isinstance(m, nn.MultiheadAttention)}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or not name.startswith(prefix) or name in inside_mha:
            continue
        if weight_sparsity(module.weight) < min_sparsity:
            continue
        if layout == "bsr" and (module.in_features % blocksize or module.out_features % blocksize):
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], SparseLinear.from_linear(module, layout, blocksize))
        swapped.append(name)
    return swapped
