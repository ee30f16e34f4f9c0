"""`benchmarks/gpu_decode_kernel.py` builds and times every storage it offers (run here on the CPU,
the Triton provider under the interpreter, with a counting timer instead of CUDA events), so
the script is ready for the first CUDA machine: rows reach the CSV as each case finishes, a
failing provider or case becomes an error row, triton is dropped where it is missing, and the
CUDA-graph timing is refused off CUDA. Also: no test pins the CPU while asking for Triton (on a
CUDA machine Triton is compiled and refuses CPU tensors)."""

from __future__ import annotations

import ast
import csv
import logging
from pathlib import Path

import pytest
import torch

from tests.benchmark_scripts import load_benchmark
from tests.kernel_cases import DEVICE

pytest.importorskip("triton")


def _script():
    return load_benchmark("gpu_decode_kernel")


def _args(script, *extra: str):
    small = ["--kv-heads", "2", "--q-per-kv", "2", "--head-dim", "64", "--window", "8", "--dtype", "fp32"]
    return script.parse_args([*small, *extra])


@pytest.mark.parametrize("bits", [None, 8, 4, 2], ids=["plain", "int8", "int4", "int2"])
@pytest.mark.parametrize("keep", [8, 3])
@pytest.mark.parametrize("mass", [False, True], ids=["out", "with-mass"])
def test_every_case_runs_and_counts_what_it_stores(bits, keep, mass):
    script = _script()
    args = _args(script, "--providers", "sdpa", "torch", "triton", *(["--mass"] if mass else []))
    calls = []

    def timer(fn):
        calls.append(fn())
        return 2.0

    rows = script.run_case(args, 200, keep, bits, None, torch.device(DEVICE), timer=timer)
    assert [row["provider"] for row in rows] == ["sdpa", "torch", "triton"]
    assert [row["error"] for row in rows] == ["", "", ""]
    assert {row["timing"] for row in rows} == {"custom"} and rows[0]["sdpa_backend"] == "auto"
    if mass:  # packed providers return (out, mass), and both paths agree
        (torch_out, torch_mass), (triton_out, triton_mass) = calls[1], calls[2]
        torch.testing.assert_close(triton_mass, torch_mass, atol=1e-5, rtol=1e-4)
    else:
        torch_out, triton_out = calls[1], calls[2]
    torch.testing.assert_close(triton_out, torch_out, atol=1e-4, rtol=1e-4)

    _, _, _, kv = script.stored_case(args, 200, keep, bits, torch.device(DEVICE))
    held = kv["torch"]
    parts = [held.keys, held.values, held.group_idx, held.tail_keys, held.tail_values]
    want = sum(
        t.numel() * t.element_size()
        for x in parts
        for t in ([x] if isinstance(x, torch.Tensor) else x.tensors().values())
    )
    dense = rows[0]["bytes_read"]
    assert dense == 2 * 200 * 2 * 64 * 4
    expanded = held.keys.token_blocks().numel() * 2 if bits == 2 else 0  # [B, Hkv, Ts] int16 from the key runs
    assert rows[1]["bytes_read"] == rows[2]["bytes_read"] == want + expanded
    assert rows[1]["budget"] == round(want / dense, 4)
    assert rows[1]["budget"] <= (1.02 if bits is None and keep == 8 else 0.75)  # plain K = G: + 8 index bytes
    assert rows[1]["bits"] == ("none" if bits is None else bits) and rows[1]["mass"] == mass
    assert rows[1]["gbps"] == round((want + expanded) / 2e-3 / 1e9, 1)
    if bits is not None:  # keys and value groups in `bits` bits; keys per channel at 2 bits, as the cache
        assert held.keys.bits == held.values.bits == bits
        assert ("run_block" in held.keys.tensors()) == (bits == 2)


def test_no_cuda_exits_cleanly(monkeypatch):
    script = _script()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("sys.argv", ["gpu_decode_kernel.py"])
    assert script.main() == 0


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def test_rows_reach_the_csv_as_each_case_finishes_and_a_failing_provider_is_a_row(tmp_path, caplog):
    script = _script()
    out = tmp_path / "kernels.csv"
    args = _args(script, "--tokens", "120", "160", "--keep", "3", "--providers", "sdpa", "torch", "--out", str(out))
    seen = []  # data rows already in the file at each timed call

    def timer(fn):
        seen.append(len(_read_csv(out)[1]))
        if len(seen) == 2:  # the first case's torch provider
            raise RuntimeError("launch failed\non purpose")
        fn()
        return 2.0

    with caplog.at_level(logging.INFO, logger="kernels_bench"):
        assert script.run_all(args, None, torch.device(DEVICE), timer=timer) == (4, 1)
    assert seen == [0, 0, 2, 2], "the first case's rows must be in the file before the second is timed"
    fields, rows = _read_csv(out)
    assert fields == script.FIELDS
    assert [(row["tokens"], row["provider"]) for row in rows] == [
        ("120", "sdpa"), ("120", "torch"), ("160", "sdpa"), ("160", "torch"),
    ]  # fmt: skip
    failed = rows[1]
    assert failed["error"] == "RuntimeError: launch failed on purpose"
    assert failed["ms"] == failed["gbps"] == "" and failed["bytes_read"] != ""
    assert all(row["error"] == "" and float(row["ms"]) == 2.0 for i, row in enumerate(rows) if i != 1)
    assert rows[3]["speedup_vs_sdpa"] == "1.0"
    assert any("torch  failed" in r.message and r.levelno == logging.ERROR for r in caplog.records)


def test_a_case_that_cannot_be_built_gets_an_error_row_per_provider(tmp_path, monkeypatch):
    script = _script()
    out = tmp_path / "kernels.csv"
    args = _args(script, "--tokens", "120", "160", "--keep", "3", "--bits", "none", "4", "--providers", "sdpa", "torch",
                 "--out", str(out))  # fmt: skip
    build = script.stored_case

    def stored_case(args, tokens, keep, bits, device):
        if tokens == 160 and bits == 4:
            raise torch.cuda.OutOfMemoryError("out of memory")
        return build(args, tokens, keep, bits, device)

    monkeypatch.setattr(script, "stored_case", stored_case)
    assert script.run_all(args, None, torch.device(DEVICE), timer=lambda fn: 1.0) == (8, 2)
    _, rows = _read_csv(out)
    failed = [(row["tokens"], row["bits"], row["provider"]) for row in rows if row["error"]]
    assert failed == [("160", "4", "sdpa"), ("160", "4", "torch")]
    assert {row["error"] for row in rows if row["error"]} == {"OutOfMemoryError: out of memory"}
    assert all(row["ms"] == "" and row["keep"] == "3" for row in rows if row["error"])


def test_triton_is_dropped_with_a_warning_where_it_is_missing(monkeypatch, caplog):
    script = _script()
    assert script.available_providers(["sdpa", "triton"]) == ["sdpa", "triton"]
    monkeypatch.setattr(script, "triton_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="kernels_bench"):
        assert script.available_providers(["sdpa", "torch", "triton"]) == ["sdpa", "torch"]
    assert any("triton is not installed" in r.message and r.levelno == logging.WARNING for r in caplog.records)
    assert script.available_providers(["torch"]) == ["torch"]
    with pytest.raises(ValueError, match=r"providers=\['triton'\] leaves nothing to measure"):
        script.available_providers(["triton"])


def test_cuda_graph_timing_is_refused_off_cuda(tmp_path):
    script = _script()
    cpu = torch.device("cpu")
    assert script.timing_mode(_args(script), cpu) == "events"
    args = _args(script, "--cuda-graph", "--providers", "sdpa", "--out", str(tmp_path / "k.csv"))
    assert args.cuda_graph
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device, got device='cpu'"):
        script.run_case(args, 120, 3, None, None, cpu, timer=lambda fn: 1.0)
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA device"):
        script.run_all(args, None, cpu)
    assert not (tmp_path / "k.csv").exists()


def test_dense_sdpa_can_be_pinned_and_says_so():
    script = _script()
    args = _args(script, "--providers", "sdpa", "--sdpa-backend", "math")
    calls = []
    [row] = script.run_case(args, 120, 3, None, None, torch.device(DEVICE), timer=lambda fn: calls.append(fn()) or 1.0)
    assert row["error"] == "" and row["sdpa_backend"] == "math"
    assert row["sdpa_fused"] == ("" if DEVICE == "cpu" else "none")  # the math path pinned: nothing fused
    assert calls[0].shape == (1, 4, 1, 64)
    with pytest.raises(SystemExit):
        _args(script, "--sdpa-backend", "fastest")


# --- no test pins the CPU while asking for Triton ---

TESTS = Path(__file__).resolve().parent
_IMPORT_CHECKS = {"importorskip", "find_spec", "import_module"}  # "triton" there names the package


def _call_name(call: ast.Call) -> str:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _names_triton(function: ast.AST) -> bool:
    """The string "triton" appears in `function` other than as a package name being imported."""
    skipped = {
        id(arg)
        for node in ast.walk(function)
        if isinstance(node, ast.Call) and _call_name(node) in _IMPORT_CHECKS
        for arg in node.args
    }
    return any(isinstance(n, ast.Constant) and n.value == "triton" and id(n) not in skipped for n in ast.walk(function))


def _pins_cpu(function: ast.AST) -> bool:
    """`function` passes the string "cpu" to a call (`torch.device("cpu")`, `device="cpu"`,
    `.to("cpu")`) or calls `.cpu()`."""
    for node in ast.walk(function):
        if not isinstance(node, ast.Call):
            continue
        if _call_name(node) == "cpu":
            return True
        arguments = [*node.args, *(keyword.value for keyword in node.keywords)]
        if any(isinstance(arg, ast.Constant) and arg.value == "cpu" for arg in arguments):
            return True
    return False


def cpu_triton_functions(folder: Path = TESTS) -> list[str]:
    """`file::function` of every function in `folder`'s Python files that both names Triton and
    pins the CPU. Tensors left on the CPU by default (a builder or model never moved to
    `tests.kernel_cases.DEVICE`) cannot be seen this way."""
    found = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _names_triton(node) and _pins_cpu(node):
                found.append(f"{path.name}::{node.name}")
    return found


def test_the_scan_finds_a_test_that_pins_the_cpu_for_triton(tmp_path):
    (tmp_path / "test_bad.py").write_text(
        "import pytest, torch\n"
        "def test_device():\n    run(torch.device('cpu'), providers=['triton'])\n"
        "def test_keyword():\n    attend(make(device='cpu'), backend='triton')\n"
        "def test_moved():\n    attend(x.cpu(), backend='triton')\n"
        "def test_import_only():\n    pytest.importorskip('triton')\n    make(device='cpu')\n"
        "def test_device_default():\n    attend(make(device=DEVICE), backend='triton')\n"
    )
    assert cpu_triton_functions(tmp_path) == ["test_bad.py::test_device", "test_bad.py::test_keyword", "test_bad.py::test_moved"]


def test_no_test_pins_the_cpu_while_asking_for_triton():
    """On a CUDA machine Triton is compiled (no interpreter) and refuses CPU tensors: tests of
    the Triton path must build on `tests.kernel_cases.DEVICE`."""
    assert cpu_triton_functions() == [], "build these on tests.kernel_cases.DEVICE"
