"""Triton kernels for SCORE's projection with diagonal masking and the reconstruction, against the
plain-torch reference: float64 to rounding, and in float32 no worse than 2x the reference's own
float32 error (both measured against the float64 reference). On a CPU the kernels run through
Triton's interpreter (conftest.py sets TRITON_INTERPRET=1), so shapes stay small; with a GPU the
same tests run the compiled kernels."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import scoremerge
from scoremerge import BackendUnavailableError, ops, ref
from scoremerge.backend import resolve
from scoremerge.ops.checks import default_precision

from conftest import MIXED_SHAPES, rel_err, random_task_vectors

pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
VARIANTS = ("full", "diag", "offdiag", "untrimmed")
# (B, T, m, n, p): tall, wide, square with p = n, p = 1, and T = 1
SHAPES = [(2, 3, 37, 23, 21), (3, 2, 19, 45, 18), (1, 5, 26, 26, 25), (2, 2, 9, 6, 1),
          (2, 1, 17, 13, 13)]


def orthonormal(B, rows, cols, g):
    q, _ = torch.linalg.qr(torch.randn(B, max(rows, cols), min(rows, cols), generator=g,
                                       dtype=torch.float64))
    return q if rows >= cols else q.mT


def inputs(B, T, m, n, p, seed):
    g = torch.Generator().manual_seed(seed)
    tau = torch.randn(B, T, m, n, generator=g, dtype=torch.float64)
    return tau, orthonormal(B, m, p, g), orthonormal(B, p, n, g)


def reference_S(tau, U, V, **kw):
    return torch.stack([ref.projection.project_and_mask(tau[b], U[b], V[b], **kw)
                        for b in range(tau.shape[0])])


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN-filled tensors, so an output element a kernel forgets to write
    fails the comparison."""
    real = torch.empty

    def nan_empty(*args, **kwargs):
        out = real(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out
    monkeypatch.setattr(torch, "empty", nan_empty)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", VARIANTS)
def test_project_and_mask_matches_the_reference(shape, variant, poisoned_empty):
    tau, U, V = inputs(*shape, seed=sum(shape))
    for trim_per_task in (True, False):
        kw = dict(variant=variant, trim_multiplier=1.96, trim_per_task=trim_per_task)
        want = reference_S(tau, U, V, **kw)
        dev = [x.to(DEVICE) for x in (tau, U, V)]
        got64 = ops.project_and_mask(*dev, backend="triton", **kw)
        assert rel_err(got64.cpu(), want) < 1e-12
        got32 = ops.project_and_mask(*[x.float() for x in dev], backend="triton", **kw)
        ref32 = reference_S(tau.float(), U.float(), V.float(), **kw)
        assert rel_err(got32.cpu(), want) <= 2 * rel_err(ref32, want) + 1e-7, trim_per_task


def test_the_mask_drops_entries_and_matches_entry_by_entry():
    """The masking must bite: with c/T the threshold drops many off-diagonal entries, and the
    kept set must be the reference's (float64, away from ties)."""
    tau, U, V = inputs(2, 3, 30, 28, 27, seed=5)
    kept = reference_S(tau, U, V, variant="offdiag")
    untrimmed = reference_S(tau, U, V, variant="untrimmed")
    assert (kept == 0).float().mean() > 0.1 and not torch.allclose(kept, untrimmed)
    got = ops.project_and_mask(tau.to(DEVICE), U.to(DEVICE), V.to(DEVICE), variant="offdiag",
                               backend="triton").cpu()
    assert torch.equal(got == 0, kept == 0)


def test_project_and_mask_takes_strided_views():
    tau, U, V = inputs(2, 3, 21, 15, 14, seed=9)
    Ut = U.mT.contiguous().mT                   # same values, transposed strides
    tau_t = tau.mT.contiguous().mT
    got = ops.project_and_mask(tau_t.to(DEVICE), Ut.to(DEVICE), V.to(DEVICE), backend="triton")
    assert rel_err(got.cpu(), reference_S(tau, U, V)) < 1e-12


@pytest.mark.parametrize("B, m, p, q, n", [(2, 37, 11, 11, 23), (3, 13, 12, 9, 29),
                                           (1, 5, 1, 1, 7)])
def test_reconstruct_matches_the_reference(B, m, p, q, n, poisoned_empty):
    g = torch.Generator().manual_seed(m + n)
    U = torch.randn(B, m, p, generator=g, dtype=torch.float64)
    S = torch.randn(B, p, q, generator=g, dtype=torch.float64)
    V = torch.randn(B, q, n, generator=g, dtype=torch.float64)
    base = torch.randn(B, m, n, generator=g, dtype=torch.float64)
    for kw in ({}, {"base": base, "alpha": 0.37}, {"base": base.float(), "alpha": -1.5}):
        want = torch.stack([ref.projection.reconstruct(U[b], S[b], V[b], base=(
            kw["base"][b] if "base" in kw else None), alpha=kw.get("alpha", 1.0))
            for b in range(B)])
        dev = {k: (v.to(DEVICE) if torch.is_tensor(v) else v) for k, v in kw.items()}
        got = ops.reconstruct(U.to(DEVICE), S.to(DEVICE), V.to(DEVICE), backend="triton", **dev)
        assert got.dtype == torch.float64 and rel_err(got.cpu(), want) < 1e-12
        got32 = ops.reconstruct(U.float().to(DEVICE), S.float().to(DEVICE), V.float().to(DEVICE),
                                backend="triton", **dev)
        ref32 = torch.stack([ref.projection.reconstruct(U[b].float(), S[b].float(), V[b].float(),
                                                        base=(kw["base"][b] if "base" in kw
                                                              else None),
                                                        alpha=kw.get("alpha", 1.0))
                             for b in range(B)])
        assert got32.dtype == torch.float32
        assert rel_err(got32.cpu(), want) <= 2 * rel_err(ref32, want) + 1e-7


@pytest.mark.parametrize("B, m, p, n", [(2, 37, 11, 23), (1, 5, 1, 7)])
def test_reconstruct_with_a_diagonal_s_matches_the_reference(B, m, p, n):
    g = torch.Generator().manual_seed(m + p)
    U, s, V, base = (torch.randn(*shape, generator=g, dtype=torch.float64)
                     for shape in ((B, m, p), (B, p), (B, p, n), (B, m, n)))
    want = torch.stack([ref.projection.reconstruct(U[b], s[b], V[b], base=base[b], alpha=0.37)
                        for b in range(B)])
    got = ops.reconstruct(U.to(DEVICE), s.to(DEVICE), V.to(DEVICE), base=base.to(DEVICE),
                          alpha=0.37, backend="triton")
    assert rel_err(got.cpu(), want) < 1e-12


def test_reconstruct_casts_on_store():
    g = torch.Generator().manual_seed(1)
    U, S, V = (torch.randn(2, *s, generator=g) for s in ((9, 4), (4, 4), (4, 11)))
    out = ops.reconstruct(U.to(DEVICE), S.to(DEVICE), V.to(DEVICE), out_dtype=torch.float64,
                          backend="triton")
    assert out.dtype == torch.float64
    assert rel_err(out.cpu(), U.double() @ S.double() @ V.double()) < 1e-6


@pytest.mark.parametrize("method", ["score", "tsv", "iso_c", "iso_cts"])
def test_methods_through_triton_match_the_reference(method):
    tvs = random_task_vectors(MIXED_SHAPES, 3, seed=2)
    want = scoremerge.merge_task_vectors(tvs, method, backend="reference")
    got = scoremerge.merge_task_vectors(tvs, method, backend="triton", device=DEVICE)
    for key in want:
        assert rel_err(got[key], want[key]) < 1e-9, key


def test_backend_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve("project_and_mask", "auto", cpu, ("triton", "torch")) == "torch"
    assert resolve("project_and_mask", "triton", cpu, ("triton", "torch")) == "triton"
    assert resolve("polar", "triton", cpu, ("torch",)) == "torch"        # no Triton polar yet
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="backend 'triton' cannot run polar on cpu"):
        resolve("polar", "triton", cpu, ("torch",))
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        assert resolve("project_and_mask", "auto", gpu, ("triton", "torch")) == "triton"
        assert default_precision(None, torch.ones(1, device=gpu)) == "tf32x3"
    assert default_precision(None, torch.ones(1)) == "ieee"
    assert default_precision(None, torch.ones(1, dtype=torch.float64)) == "ieee"
    assert default_precision("tf32", torch.ones(1)) == "tf32"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", ["full", "untrimmed"])
def test_gpu_default_precision_stays_within_the_fp32_bound(variant):
    """The GPU default, 3xTF32, must be as accurate as the reference's own fp32 (2x bound), on
    sizes that use the autotuned 128-wide tiles and the statistics epilogue."""
    tau, U, V = inputs(4, 3, 300, 200, 198, seed=11)
    want = reference_S(tau, U, V, variant=variant)
    ref32 = reference_S(tau.float(), U.float(), V.float(), variant=variant)
    dev = [x.float().cuda() for x in (tau, U, V)]
    got = ops.project_and_mask(*dev, variant=variant, backend="triton")
    assert rel_err(got.cpu(), want) <= 2 * rel_err(ref32, want) + 1e-7
    g = torch.Generator().manual_seed(3)
    S, base = torch.randn(2, 150, 150, generator=g), torch.randn(2, 300, 200, generator=g)
    U2, V2 = U[:2, :, :150].float(), V[:2, :150].float()
    want = base.double() + 0.3 * (U2.double() @ S.double() @ V2.double())
    got = ops.reconstruct(U2.cuda(), S.cuda(), V2.cuda(), base=base.cuda(), alpha=0.3,
                          backend="triton")
    ref32 = torch.stack([ref.projection.reconstruct(U2[b], S[b], V2[b], base=base[b], alpha=0.3)
                         for b in range(2)])
    assert rel_err(got.cpu(), want) <= 2 * rel_err(ref32, want) + 1e-7


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels run for real")
def test_every_kernel_variant_compiles_for_hopper():
    """The interpreter does not compile; this does, for sm_90, with triton's own ptxas."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_sm90_compile.py"))],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(" ok ") == 18
