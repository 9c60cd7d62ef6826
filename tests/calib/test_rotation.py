"""Hadamard matrices, Kronecker factor sizes and randomised Hadamard rotations."""

import pytest
import torch

from optimum_fair.calib import hadamard, kron_factors, random_hadamard_factors, random_orthogonal
from optimum_fair.nn.linear import kron_apply


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_hadamard_is_sylvester_and_orthonormal(n):
    H = hadamard(n, dtype=torch.float64)
    # Sylvester closed form: H_ij = (-1)^popcount(i & j) / sqrt(n)
    ref = torch.tensor([[(-1.0) ** bin(i & j).count("1") for j in range(n)] for i in range(n)]) / n**0.5
    assert torch.allclose(H, ref.double(), atol=1e-12)
    assert torch.allclose(H @ H.t(), torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_hadamard_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="n must be a power of two"):
        hadamard(12)


@pytest.mark.parametrize(
    "d, expected",
    [(4096, (64, 64)), (256, (16, 16)), (12288, (96, 128)), (704, (22, 32)), (2048, (32, 64)), (11, (11, 1))],
)
def test_kron_factors_examples(d, expected):
    assert kron_factors(d) == expected


def test_kron_factors_is_the_most_balanced_power_of_two_split():
    for d in range(1, 400):
        n1, n2 = kron_factors(d)
        assert n1 * n2 == d and n2 & (n2 - 1) == 0
        candidates = [(d // p, p) for p in (2**k for k in range(12)) if d % p == 0]
        assert abs(n1 - n2) == min(abs(a - b) for a, b in candidates)
    with pytest.raises(ValueError, match="d must be positive"):
        kron_factors(0)


@pytest.mark.parametrize("d", [64, 96, 704, 12, 7])
def test_random_hadamard_factors_are_orthogonal(d):
    A, B = random_hadamard_factors(d, torch.Generator().manual_seed(0))
    R = torch.kron(A, B).double()  # (d, d)
    assert R.shape == (d, d)
    assert torch.allclose(R @ R.t(), torch.eye(d, dtype=torch.float64), atol=1e-5)


def test_random_hadamard_factors_are_seeded():
    A1, B1 = random_hadamard_factors(64, torch.Generator().manual_seed(1))
    A2, B2 = random_hadamard_factors(64, torch.Generator().manual_seed(1))
    A3, B3 = random_hadamard_factors(64, torch.Generator().manual_seed(2))
    assert torch.equal(A1, A2) and torch.equal(B1, B2)
    assert not (torch.equal(A1, A3) and torch.equal(B1, B3))
    assert torch.allclose(B1.abs(), torch.full((8, 8), 8**-0.5))  # a signed Hadamard


def test_random_orthogonal():
    Q = random_orthogonal(11, torch.Generator().manual_seed(3)).double()
    assert torch.allclose(Q @ Q.t(), torch.eye(11, dtype=torch.float64), atol=1e-6)


@pytest.mark.parametrize("d", [256, 704])
def test_rotation_lowers_peak_to_rms_of_an_outlier_channel(d):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, d, generator=g)
    x[:, 5] *= 50.0  # one outlier channel

    def peak_to_rms(t):
        return (t.abs().amax(-1) / t.pow(2).mean(-1).sqrt()).mean()

    A, B = random_hadamard_factors(d, g)
    xr = kron_apply(x, A, B)  # (64, d)
    assert torch.allclose(xr, x @ torch.kron(A, B), atol=1e-4)
    assert peak_to_rms(xr) < peak_to_rms(x) / 3
