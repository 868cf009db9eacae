"""ops.mix against the reference on odd sizes, mixed dtypes, empty and uneven groups, for every
backend that runs here (Triton through the interpreter on a CPU; CUDA too on a GPU); bad input is
named."""
import pytest
import torch

from scoremerge import ops, ref

from conftest import rel_err

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = ["torch", "triton"] + (["cuda"] if DEVICE.type == "cuda" else [])


def exact(experts, coeffs, bounds):
    return ref.mixing.mix(experts.double(), coeffs.double(), bounds, out_dtype=torch.float64)


def case(K, N, G, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    experts = torch.randn(K, N, generator=g).to(dtype)
    coeffs = torch.softmax(torch.randn(G, K, generator=g), dim=1)
    cuts = sorted(torch.randint(0, N + 1, (G - 1,), generator=g).tolist())
    return experts, coeffs, [0, *cuts, N]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K, N, G", [(1, 1, 1), (2, 4097, 1), (3, 10007, 2), (5, 777, 4),
                                     (16, 5003, 3)])
@pytest.mark.parametrize("dtype, out_dtype", [(torch.float32, torch.float32),
                                              (torch.bfloat16, torch.bfloat16),
                                              (torch.float16, torch.float32),
                                              (torch.bfloat16, torch.float32),
                                              (torch.float64, torch.float64)])
def test_mix_matches_the_reference(backend, K, N, G, dtype, out_dtype):
    experts, coeffs, bounds = case(K, N, G, dtype, seed=K * N + G)
    answer = exact(experts, coeffs, bounds)
    reference = ref.mixing.mix(experts, coeffs, bounds, out_dtype=out_dtype)
    out = torch.full((N,), float("nan"), dtype=out_dtype, device=DEVICE)      # poisoned
    got = ops.mix(experts.to(DEVICE), coeffs.to(DEVICE), bounds, out=out, backend=backend)
    assert got is out and got.dtype == out_dtype
    # Triton's CPU interpreter casts fp32 to bf16 by truncation (its cast ignores the rounding
    # mode; a GPU rounds to nearest): a one-ulp error where rounding makes half an ulp.
    truncates = backend == "triton" and DEVICE.type == "cpu" and out_dtype == torch.bfloat16
    assert rel_err(got, answer) <= (4 if truncates else 2) * rel_err(reference, answer) + 1e-7


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_hot_coefficients_give_the_expert_exactly(backend):
    experts, _, _ = case(4, 3001, 1, torch.bfloat16, seed=3)
    coeffs = torch.tensor([[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    got = ops.mix(experts.to(DEVICE), coeffs.to(DEVICE), [0, 1000, 3001], backend=backend).cpu()
    assert got.dtype == torch.bfloat16
    assert torch.equal(got[:1000], experts[2, :1000]) and torch.equal(got[1000:], experts[0, 1000:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_groups_and_default_bounds(backend):
    experts, coeffs, _ = case(3, 50, 3, torch.float32, seed=4)
    bounds = [0, 0, 50, 50]
    got = ops.mix(experts.to(DEVICE), coeffs.to(DEVICE), bounds, backend=backend)
    assert rel_err(got, exact(experts, coeffs, bounds)) < 1e-6
    one = ops.mix(experts.to(DEVICE), coeffs[1].to(DEVICE), backend=backend)     # [K]: one group
    assert rel_err(one, exact(experts, coeffs[1:], [0, 50])) < 1e-6


def test_bad_input_is_named():
    x = torch.randn(3, 10)
    c = torch.full((1, 3), 1 / 3)
    with pytest.raises(ValueError, match="K = 0"):
        ops.mix(torch.randn(0, 10), torch.zeros(1, 0))
    with pytest.raises(ValueError, match=r"coeffs must be \[G, 3\]"):
        ops.mix(x, torch.ones(2, 4))
    with pytest.raises(ValueError, match="G \\+ 1 = 2 offsets"):
        ops.mix(x, c, [0, 5, 10])
    with pytest.raises(ValueError, match="rise from 0 to N = 10"):
        ops.mix(x, torch.ones(2, 3), [0, 7, 5])
    with pytest.raises(ValueError, match="contiguous"):
        ops.mix(torch.randn(10, 3).T, c)
    with pytest.raises(ValueError, match=r"out must be a contiguous \[10\]"):
        ops.mix(x, c, out=torch.empty(9))
    with pytest.raises(TypeError, match="float32, bfloat16"):
        ops.mix(x.long(), c)
