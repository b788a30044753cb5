"""kernels.lowrank against a dense ground truth."""
import torch

from kernels.lowrank import lowrank_svd, singular_values


def test_lowrank_svd_equals_dense_sum_with_mixed_ranks_and_negative_weights():
    generator = torch.Generator().manual_seed(0)
    Bs = [torch.randn(48, r, generator=generator) for r in (2, 5, 3)]
    As = [torch.randn(r, 40, generator=generator) for r in (2, 5, 3)]
    weights = [0.7, -1.3, 0.25]
    dense = sum(w * b @ a for w, b, a in zip(weights, Bs, As))

    U, S, Vh = lowrank_svd(Bs, As, weights)

    assert U.shape == (48, 10) and Vh.shape == (10, 40)
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, dense, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(S, torch.linalg.svdvals(dense)[:10], atol=1e-4, rtol=1e-4)


def test_singular_values_do_not_depend_on_the_factor_basis():
    generator = torch.Generator().manual_seed(1)
    B, A = torch.randn(32, 4, generator=generator), torch.randn(4, 24, generator=generator)
    R = torch.randn(4, 4, generator=generator) + 4 * torch.eye(4)
    torch.testing.assert_close(singular_values(B, A, 0.5), singular_values(B @ torch.linalg.inv(R), R @ A, 0.5),
                               atol=1e-4, rtol=1e-4)
