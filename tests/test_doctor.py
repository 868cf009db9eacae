"""`scoremerge doctor` on this machine: it runs, checks every backend that can run here (Triton
through the interpreter: conftest.py sets TRITON_INTERPRET=1 without a GPU) and exits 0; a
backend made wrong or made to raise in the test makes it exit 1 naming the op; each op's check
catches a wrong result; the reasons it gives are resolve's; --bench and --json work. Then auto's
protection (backend.run): a kernel that fails to compile or launch hands over to the next
backend with one warning, a named backend raises."""
import json
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

import scoremerge
from scoremerge import BackendUnavailableError, backend, cli, ops
from scoremerge.doctor import bench, checks, environment, report
from scoremerge.doctor.cases import CASES

from scoremerge.ops.linalg import batched as torch_linalg
from scoremerge.ops.linalg import cuda as cuda_linalg
from scoremerge.ops.mixing import batched as torch_mixing
from scoremerge.ops.mixing import cuda as cuda_mix
from scoremerge.ops.projection import batched as torch_projection

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def no_recorded_failures(monkeypatch):
    """Each test starts with no backend taken out of auto's choice, and leaves none."""
    monkeypatch.setattr(backend, "_FAILED", {})


def run_doctor(capsys, *args):
    status = cli.main(["doctor", *args])
    return status, capsys.readouterr().out


def test_doctor_runs_here_and_every_available_backend_agrees(capsys, tmp_path):
    status, out = run_doctor(capsys, "--json", str(tmp_path / "doctor.json"))
    assert status == 0, out
    assert "verdict: OK" in out and "FAIL" not in out
    data = json.loads((tmp_path / "doctor.json").read_text())
    assert data["verdict"] == "ok" and data["failures"] == []
    checked = {(c["op"], c["backend"], c["dtype"]) for c in data["checks"]}
    for op, case in CASES.items():
        for name in backend.IMPLEMENTED[op]:
            available = data["backends"][op][name]["available"]
            assert available == (backend.why_not(op, name, torch.device(data["device"])) is None)
            assert all(((op, name, checks._name(d)) in checked) == available for d in case.dtypes)
    assert {m["op"] for m in data["merges"]} == \
        {name for name, spec in scoremerge.methods().items() if not spec.on_models}
    assert all(c["ok"] and c["error"] <= c["bound"] for c in data["checks"] + data["merges"])
    assert data["environment"]["torch"] == torch.__version__
    if not torch.cuda.is_available():         # this CPU: Triton through the interpreter
        assert "CUDA kernels run on CUDA devices; got cpu" in out
        for op in ("project_and_mask", "reconstruct", "mix"):
            row = next(line for line in out.splitlines() if line.split()[:2] == [op, "triton"])
            assert row.count(" ok ") == len(CASES[op].dtypes), row


def test_a_wrong_backend_makes_doctor_exit_1_naming_the_op(capsys, monkeypatch, tmp_path):
    """The torch reconstruction off by one part in 10^4: far inside any eyeballed tolerance,
    far outside the earned one (the SCORE merge's bound is twice the float32 reference's error,
    6e-6 on an AVX-512 EPYC: 10^-5 hid under it)."""
    real = torch_projection.reconstruct
    monkeypatch.setattr(torch_projection, "reconstruct",
                        lambda *a: real(*a) * (1 + 1e-4))
    status, out = run_doctor(capsys, "--json", str(tmp_path / "d.json"))
    assert status == 1
    assert "verdict: FAIL" in out and "reconstruct on torch (float32)" in out
    data = json.loads((tmp_path / "d.json").read_text())
    assert {c["op"] for c in data["checks"] if not c["ok"]} == {"reconstruct"}
    # the SVD methods that reconstruct go through auto, here torch: their merges fail too (Iso-C
    # scales its polar factor and reconstructs nothing)
    assert {m["op"] for m in data["merges"] if not m["ok"]} == {"score", "tsv", "iso_cts"}


def test_a_backend_that_raises_makes_doctor_exit_1(capsys, monkeypatch):
    def broken(*args):
        raise RuntimeError("CUDA error: no kernel image is available for execution")
    monkeypatch.setattr(torch_mixing, "mix", broken)
    status, out = run_doctor(capsys)
    assert status == 1
    assert "mix on torch (float32) raised RuntimeError: CUDA error: no kernel image" in out


def _one_wrong_element(fn, which=0):
    """fn with the last element of its `which`-th output off by one: a tile edge written
    wrong (the data are of order one)."""
    def wrong(*args, **kwargs):
        out = fn(*args, **kwargs)
        outs = list(out) if isinstance(out, tuple) else [out]
        changed = outs[which].contiguous().clone()
        changed.view(-1)[-1] += 1
        if isinstance(out, tuple):
            outs[which] = changed
            return tuple(outs)
        return out.copy_(changed)          # in place: ops.mix returns the `out` it was given
    return wrong


@pytest.mark.parametrize("op, module, name, which", [
    ("truncated_svd", torch_linalg, "truncated_svd", 1),
    ("polar", torch_linalg, "polar", 0),
    ("project_and_mask", torch_projection, "project_and_mask", 0),
    ("reconstruct", torch_projection, "reconstruct", 0),
    ("mix", torch_mixing, "mix", 0)])
def test_every_check_catches_one_wrong_element(monkeypatch, op, module, name, which):
    monkeypatch.setattr(module, name, _one_wrong_element(getattr(module, name), which))
    for dtype in CASES[op].dtypes:
        result = checks.check(CASES[op], "torch", dtype, CPU)
        assert not result.ok and result.error > result.bound, (dtype, result)


def test_a_wrong_output_dtype_fails_the_check(monkeypatch):
    real = torch_projection.reconstruct
    monkeypatch.setattr(torch_projection, "reconstruct", lambda *a: real(*a).float())
    result = checks.check(CASES["reconstruct"], "torch", torch.bfloat16, CPU)
    assert not result.ok and "the reference's" in result.note and "bfloat16" in result.note


def test_the_entropy_check_catches_a_wrong_formula(monkeypatch):
    real = torch.log_softmax
    monkeypatch.setattr(torch, "log_softmax", lambda z, dim: real(z * (1 + 1e-6), dim=dim))
    result = checks.check(CASES["entropy_weights"], "torch", torch.float64, CPU)
    assert not result.ok, result


def test_a_wrong_merge_fails_its_end_to_end_check(monkeypatch):
    real = torch_projection.project_and_mask
    monkeypatch.setattr(torch_projection, "project_and_mask",
                        lambda tau, *a: real(tau, *a) * (1 + 1e-4))
    results = {r.op: r for r in checks.run_merge_checks(CPU)}
    assert not results["score"].ok
    assert all(r.ok for name, r in results.items() if name != "score")


def test_float64_bounds_include_the_answers_own_error():
    """Two independent float64 computations of one answer differ by about its error: the
    reference's own disagreement on the mirrored problem is part of the float64 bound."""
    case = CASES["polar"]
    x = case.make(case.shapes[0], torch.float64, torch.Generator().manual_seed(0))
    answer = case.reference(x)
    own = checks._float64_own_errors(case, case.shapes[0], 0, x, answer)
    mirrored, back = case.mirror(x)
    assert own[0] >= checks.rel_err(back(case.reference(mirrored))[0], answer[0]) > 0


def test_the_interpreters_downcast_truncates_and_the_bound_knows():
    x = torch.tensor([1 + 2**-8 + 2**-12, -(1 + 2**-8 + 2**-12)])
    toward_zero = torch.tensor([1 + 2**-8, -(1 + 2**-8)]).bfloat16()
    assert torch.equal(checks._truncated_bf16(x), toward_zero)
    assert not torch.equal(x.bfloat16(), toward_zero)          # rounding to nearest goes up here


def test_the_reasons_doctor_gives_are_resolves():
    table, auto = checks.availability(CPU)
    assert table["polar"]["triton"] == "scoremerge has no triton kernel for polar"
    assert auto["project_and_mask"] == "torch"
    why = table["mix"]["cuda"]
    with pytest.raises(BackendUnavailableError) as raised:
        ops.mix(torch.randn(2, 5), torch.ones(2), backend="cuda")
    assert why and why in str(raised.value)


def test_without_the_interpreter_triton_is_listed_with_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    table, _ = checks.availability(CPU)
    assert "TRITON_INTERPRET=1" in table["reconstruct"]["triton"]
    results = checks.run_checks(CPU)
    assert results and all(r.backend == "torch" and r.ok for r in results)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only machine")
def test_asking_for_a_gpu_on_a_cpu_machine_exits_2(capsys):
    assert cli.main(["doctor", "--device", "cuda"]) == 2
    assert "torch sees no CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("fields, generation", [
    ({"model name": "AMD EPYC", "cpu family": "25", "model": "1", "flags": "fpu avx avx2 fma"},
     "family 25 model 1, AVX2"),
    ({"model name": "AMD EPYC", "cpu family": "26", "model": "2", "flags": "avx2 avx512f"},
     "family 26 model 2, AVX-512"),
    ({"model name": "Neoverse", "flags": "fp asimd"}, ""),
])
def test_the_cpu_is_named_with_its_generation_and_vector_width(monkeypatch, fields, generation):
    """Two development machines were both "AMD EPYC", a generation apart; doctor's device line
    and the records tell them apart by family, model and vector width where cpuinfo gives them."""
    monkeypatch.setattr(environment, "_cpuinfo", lambda: fields)
    assert environment.cpu_generation() == generation
    name = fields["model name"]
    assert environment.cpu_description() == (f"{name} ({generation})" if generation else name)
    facts = environment.device_facts(CPU)
    line = report._device_text(facts)
    assert line.startswith(f"{name} CPU") and (generation in line) and line.endswith("threads")
    assert ("(" in line) == bool(generation)


def test_the_fatbin_reader_agrees_with_cuobjdump():
    """The architectures doctor reads from scoremerge._C without the toolkit are the ones the
    toolkit's cuobjdump lists (Triton ships one)."""
    ext = environment.extension_status(CPU)
    if not ext["built"]:
        pytest.skip("scoremerge._C not built")
    import triton
    tool = shutil.which("cuobjdump") or next(
        iter(Path(triton.__file__).parent.glob("backends/nvidia/bin/cuobjdump")), None)
    if tool is None:
        pytest.skip("no cuobjdump")
    listed = subprocess.run([str(tool), "--list-elf", "--list-ptx", ext["path"]],
                            capture_output=True, text=True, check=True).stdout
    sass = {line.rsplit(".", 2)[-2] for line in listed.splitlines() if line.startswith("ELF")}
    ptx = {line.rsplit(".", 2)[-2] for line in listed.splitlines() if line.startswith("PTX")}
    assert set(ext["sass"]) == sass and {p.replace("compute", "sm") for p in ext["ptx"]} == ptx
    assert ext["sass"]


def test_bench_times_every_headline_comparison(monkeypatch):
    """Shapes cut down (the real ones are for a person's minute); every row carries both
    times and the ceilings are measured."""
    for table, small in ((bench.PROJECTION, (2, 2, 24, 20)), (bench.LINALG, (2, 24, 20, 2)),
                         (bench.MIX, (3, 10_000)), (bench.MERGE, (16, 1, 2))):
        monkeypatch.setitem(table, "cpu", small)
    monkeypatch.setattr(bench, "ceilings", lambda device: {"copy_GBps": 1.0,
                                                          "matmul_float32_TFLOPs": 1.0})
    result = bench.run_bench(CPU)
    assert len(result["rows"]) == 6
    for row in result["rows"]:
        assert "error" not in row, row
        assert row["fast_s"] > 0 and row["ref_s"] > 0 and row["ratio"] > 0
        assert ("TFLOPs" in row) == ("of_matmul" in row) and ("GBps" in row) == ("of_copy" in row)
    assert sum("of_matmul" in row for row in result["rows"]) == 2
    assert sum("of_copy" in row for row in result["rows"]) == 1


def test_the_ceilings_are_measured():
    rates = bench.ceilings(CPU)
    assert rates["copy_GBps"] > 0 and rates["matmul_float32_TFLOPs"] > 0


# ---- auto's protection: backend.run --------------------------------------------------------

@pytest.fixture
def cuda_looks_available(monkeypatch):
    """auto on this CPU then picks the CUDA mix, whose launch the test makes fail."""
    monkeypatch.setattr(backend, "unavailable_reason", lambda name, device: None)
    calls = []

    def failing_mix(*args):
        calls.append(1)
        raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version")
    monkeypatch.setattr(cuda_mix, "mix", failing_mix)
    return calls


def test_auto_falls_back_with_one_warning_per_process(cuda_looks_available):
    experts, coeffs = torch.randn(3, 1001), torch.softmax(torch.randn(3), 0)
    want = ops.mix(experts, coeffs, backend="torch")
    with pytest.warns(backend.KernelFallbackWarning) as caught:
        got = ops.mix(experts, coeffs)
    assert torch.equal(got, want) and len(cuda_looks_available) == 1
    message = str(caught[0].message)
    assert "\n" not in message and "the cuda kernel for mix failed on cpu" in message
    assert "CUDA driver version is insufficient" in message and "torch backend" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # a second warning would raise here
        assert torch.equal(ops.mix(experts, coeffs), want)
    assert len(cuda_looks_available) == 1               # not retried
    assert "failed at run time" in backend.why_not("mix", "cuda", CPU)


def test_a_named_backend_still_raises(cuda_looks_available):
    with pytest.raises(RuntimeError, match="driver version is insufficient"):
        ops.mix(torch.randn(2, 9), torch.ones(2), backend="cuda")


def test_input_errors_are_not_kernel_failures(cuda_looks_available, monkeypatch):
    def rejecting(*args):
        raise ValueError("experts is not aligned to its element size")
    monkeypatch.setattr(cuda_mix, "mix", rejecting)
    with pytest.raises(ValueError, match="not aligned"):
        ops.mix(torch.randn(2, 9), torch.ones(2))
    assert backend._FAILED == {}


def test_the_linear_algebra_falls_back_too(monkeypatch):
    monkeypatch.setattr(backend, "unavailable_reason", lambda name, device: None)

    def missing_library(*args):
        raise OSError("libcusolver.so.12: cannot open shared object file")
    monkeypatch.setattr(cuda_linalg, "polar", missing_library)
    A = torch.randn(2, 9, 5, dtype=torch.float64)
    with pytest.warns(backend.KernelFallbackWarning, match="cuda kernel for polar"):
        got = ops.polar(A)
    assert torch.equal(got, ops.polar(A, backend="torch"))
