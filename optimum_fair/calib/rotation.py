"""Hadamard rotations in Kronecker form (QuaRot-style), also the starting point of learned transforms.

A d-dim input is rotated by A kron B with A (n1, n1), B (n2, n2), n1 * n2 = d (see `kron_factors`):
`nn.linear.kron_apply(x, A, B)` computes x @ (A kron B) in O(d (n1 + n2)) per token. An orthogonal
rotation spreads an outlier channel over all channels, which lowers the per-token peak-to-RMS ratio and so
the activation quantization error; in floating point y = (xR)(WR)ᵀ is unchanged.
"""

from __future__ import annotations

import torch

__all__ = ["hadamard", "is_power_of_two", "kron_factors", "random_hadamard_factors", "random_orthogonal"]


def is_power_of_two(n: int) -> bool:
    """True for 1, 2, 4, 8, ..."""
    return n >= 1 and n & (n - 1) == 0


def hadamard(
    n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix of order n (a power of two): entries ±1/√n, H Hᵀ = I.

    H_1 = [1], H_2n = [[H_n, H_n], [H_n, −H_n]], divided by √n at the end.
    """
    if not is_power_of_two(n):
        raise ValueError(f"n must be a power of two, got {n}")
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], dim=1), torch.cat([H, -H], dim=1)], dim=0)  # (2m, 2m)
    return (H / n**0.5).to(dtype=dtype, device=device)


def kron_factors(d: int) -> tuple[int, int]:
    """Split d = n1 * n2 with n2 a power of two (the largest one, if that is as balanced as possible).

    Among the factorisations d = n1 * n2 with n2 a power of two dividing d, pick the one that minimises
    |n1 − n2|, ties going to n1 <= n2. Examples: 4096 → (64, 64), 256 → (16, 16), 12288 → (96, 128),
    704 → (22, 32), 2048 → (32, 64), 11 → (11, 1). An odd d gives (d, 1): no Hadamard factor.
    """
    if d < 1:
        raise ValueError(f"d must be positive, got {d}")
    best = (d, 1)
    n2 = 2
    while d % n2 == 0:
        n1 = d // n2
        if (abs(n1 - n2), n1 > n2) < (abs(best[0] - best[1]), best[0] > best[1]):
            best = (n1, n2)
        n2 *= 2
    return best


def random_orthogonal(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A Haar-random orthogonal matrix (n, n): QR of a Gaussian matrix with the signs of diag(R) fixed."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    G = torch.randn(n, n, generator=generator, dtype=torch.float64)  # (n, n)
    Q, R = torch.linalg.qr(G)
    sign = torch.sign(torch.diagonal(R))
    sign[sign == 0] = 1.0
    return (Q * sign.unsqueeze(0)).float().contiguous()  # scale column k of Q by sign(R_kk)


def random_signs(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n independent ±1 values, float32."""
    return torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1


def random_hadamard_factors(
    d: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal (A, B), A (n1, n1), B (n2, n2) with (n1, n2) = kron_factors(d): a randomised Hadamard.

    B = diag(±1) · H_{n2} (random signs, Sylvester Hadamard). A = diag(±1) · H_{n1} when n1 is a power of
    two, else a Haar-random orthogonal matrix (there is no Sylvester Hadamard of that order; a random
    rotation still mixes the n1 blocks, where the identity would leave an outlier confined to its block).
    A kron B is orthogonal; its inverse is its transpose. float32, on `device`.
    """
    n1, n2 = kron_factors(d)
    B = random_signs(n2, generator).unsqueeze(1) * hadamard(n2)  # (n2, n2): row k times ±1
    if is_power_of_two(n1):
        A = random_signs(n1, generator).unsqueeze(1) * hadamard(n1)  # (n1, n1)
    else:
        A = random_orthogonal(n1, generator)  # (n1, n1)
    return A.to(device), B.to(device)
