"""ops/cpu_matmul.py: oneDNN's products against float64, with a tolerance earned from MKL's (torch's
own float32 product's) error on the same inputs; what goes where; how the library is chosen."""
import pytest
import torch

from scoremerge.errors import MergeInputError
from scoremerge.ops import cpu_matmul

from conftest import rel_err

needs_onednn = pytest.mark.skipif(not cpu_matmul._onednn_works(),
                                  reason="this torch has no working oneDNN linear op")


@pytest.fixture
def library(monkeypatch):
    """Sets the process's choice (as SCOREMERGE_CPU_MATMUL would) and takes every float32
    product, however small, so that small shapes test the oneDNN path itself."""
    monkeypatch.setattr(cpu_matmul, "_MIN_WORK", 0)
    monkeypatch.setattr(cpu_matmul, "_MIN_ROWS", 0)

    def choose(name):
        monkeypatch.setattr(cpu_matmul, "_chosen", name)
    return choose


def operands(a_shape, b_shape, layout, g):
    """float64 operands, laid out as a caller might hand them: contiguous, as a contiguous
    matrix's transpose, or as a slice of a wider matrix (neither)."""
    def make(shape):
        if layout == "transposed":
            return torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g,
                               dtype=torch.float64).mT
        if layout == "sliced":
            return torch.randn(*shape[:-1], shape[-1] + 5, generator=g,
                               dtype=torch.float64)[..., 2:shape[-1] + 2]
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    return make(a_shape), make(b_shape)


@needs_onednn
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("a_shape,b_shape", [
    ((301, 97), (97, 263)),             # rows >= columns
    ((13, 389), (389, 611)),            # few rows: the product is taken transposed
    ((3, 157, 83), (83, 211)),          # one matrix b: a's batch folded into rows
    ((157, 83), (4, 83, 59)),           # one matrix a, a batch of b
    ((2, 1, 61, 129), (2, 3, 129, 37)),  # broadcast batch dims
    ((3, 29, 11), (3, 11, 7)),
])
def test_onednn_products_within_four_times_torchs_float32_error(a_shape, b_shape, layout,
                                                               library):
    library("onednn")
    g = torch.Generator().manual_seed(sum(a_shape) + 7 * sum(b_shape))
    a64, b64 = operands(a_shape, b_shape, layout, g)
    a, b = a64.float(), b64.float()
    exact = a.double() @ b.double()
    got = cpu_matmul.matmul(a, b)
    assert got.shape == exact.shape and got.dtype == torch.float32 and got.is_contiguous()
    # measured: oneDNN's error 1.5x-2.2x MKL's on these (it sums in another order)
    assert rel_err(got, exact) <= 4 * rel_err(a @ b, exact) + 1e-7


def test_only_large_float32_cpu_products_take_the_chosen_library(monkeypatch):
    taken = []
    monkeypatch.setattr(cpu_matmul, "_chosen", "onednn")
    monkeypatch.setattr(cpu_matmul, "_onednn", lambda a, b: taken.append(a.shape) or a @ b)
    big = torch.randn(300, 200), torch.randn(200, 300)
    cpu_matmul.matmul(*big)
    assert taken == [(300, 200)]
    cpu_matmul.matmul(big[0].double(), big[1].double())
    cpu_matmul.matmul(torch.randn(8, 8), torch.randn(8, 8))              # below _MIN_WORK
    cpu_matmul.matmul(torch.randn(100, 1000), torch.randn(1000, 100))    # below _MIN_ROWS
    cpu_matmul.matmul(big[0].requires_grad_(), big[1])                   # autograd: torch's
    assert taken == [(300, 200)]
    monkeypatch.setattr(cpu_matmul, "_chosen", "mkl")
    cpu_matmul.matmul(big[0].detach(), big[1])
    assert taken == [(300, 200)]


def choose_again(monkeypatch, setting):
    """Forgets this process's choice; SCOREMERGE_CPU_MATMUL set to `setting` (None: unset)."""
    if setting is None:
        monkeypatch.delenv(cpu_matmul.ENVIRONMENT, raising=False)
    else:
        monkeypatch.setenv(cpu_matmul.ENVIRONMENT, setting)
    monkeypatch.setattr(cpu_matmul, "_chosen", None)


@pytest.mark.parametrize("value", ["mkl", "onednn"])
def test_the_environment_fixes_the_library(value, monkeypatch):
    if value == "onednn" and not cpu_matmul._onednn_works():
        pytest.skip("this torch has no working oneDNN linear op")
    choose_again(monkeypatch, value)
    assert cpu_matmul.library() == value
    assert cpu_matmul.chosen_by() == f"{value} ({cpu_matmul.ENVIRONMENT}={value})"


def test_an_unknown_library_in_the_environment_is_named(monkeypatch):
    choose_again(monkeypatch, "openblas")
    with pytest.raises(MergeInputError, match="SCOREMERGE_CPU_MATMUL='openblas'.*mkl, onednn"):
        cpu_matmul.library()


def test_measured_choice_is_a_library_and_mkl_where_onednn_fails(monkeypatch):
    choose_again(monkeypatch, None)
    assert cpu_matmul.library() in cpu_matmul.LIBRARIES
    assert cpu_matmul.chosen_by().endswith("(measured)")

    def broken(x, w):
        raise RuntimeError("no oneDNN here")
    monkeypatch.setattr(cpu_matmul, "_linear", broken)
    choose_again(monkeypatch, None)
    assert cpu_matmul.library() == "mkl"
    choose_again(monkeypatch, "onednn")
    with pytest.raises(MergeInputError, match="no working oneDNN"):
        cpu_matmul.library()


def test_a_wrong_onednn_result_is_not_chosen(monkeypatch):
    real = cpu_matmul._linear
    monkeypatch.setattr(cpu_matmul, "_linear", lambda x, w: real(x, w) * 1.001)
    assert not cpu_matmul._onednn_works()


def test_using_sets_the_library_for_a_block_and_restores_the_choice(monkeypatch):
    monkeypatch.setattr(cpu_matmul, "_chosen", "onednn")
    with pytest.raises(KeyError):
        with cpu_matmul.using("mkl"):
            assert cpu_matmul.library() == "mkl"
            raise KeyError("inside")
    assert cpu_matmul.library() == "onednn"
    with pytest.raises(ValueError, match="'openblas'.*mkl, onednn"):
        with cpu_matmul.using("openblas"):
            pass
    assert cpu_matmul.library() == "onednn"
