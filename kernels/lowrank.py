"""Exact SVD of a sum of low-rank products without forming the dense matrix.

Σ wᵢ·Bᵢ·Aᵢ (Bᵢ: out×rᵢ, Aᵢ: rᵢ×in) equals B·A with B = [w₁B₁ … wₙBₙ] and
A = [A₁; …; Aₙ] of rank R = Σrᵢ. With B = Q_b·R_b and Aᵀ = Q_a·R_a (thin QR),
B·A = Q_b·(R_b·R_aᵀ)·Q_aᵀ, so the SVD of the small R×R core gives the SVD of
the sum. Cost O((out+in)·R²), linear in the hidden size, never O(out·in·min).
"""
from __future__ import annotations

import torch


def lowrank_svd(
    Bs: list[torch.Tensor], As: list[torch.Tensor], weights: list[float] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U (out×R), S (R), Vh (R×in) with Σ wᵢ·Bᵢ·Aᵢ = U·diag(S)·Vh, computed in float32 or wider."""
    if weights is None:
        weights = [1.0] * len(Bs)
    dtype = torch.promote_types(torch.float32, Bs[0].dtype)
    B = torch.cat([w * b.to(dtype) for w, b in zip(weights, Bs)], dim=1)
    A = torch.cat([a.to(dtype) for a in As], dim=0)
    q_b, r_b = torch.linalg.qr(B)
    q_a, r_a = torch.linalg.qr(A.T)
    u_core, singular_values, vh_core = torch.linalg.svd(r_b @ r_a.T)
    return q_b @ u_core, singular_values, vh_core @ q_a.T


def singular_values(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Singular values of scale·B·A, descending (the basis-free fingerprint of one LoRA module)."""
    return lowrank_svd([B], [A], [scale])[1]
