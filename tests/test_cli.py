"""The `adam-triton` command, run as a user would (python -m adam_triton.cli in a
subprocess), with assertions on the numbers it prints."""

import os
import re
import subprocess
import sys

import pytest
import torch

import adam_triton
from adam_triton import check, cli

ROW = re.compile(
    r"^(?P<case>\S.*?)\s+(?P<dtype>fp32|bf16)\s+(?P<ours_torch>\S+)\s+(?P<ours_ref>\S+)"
    r"\s+(?P<torch_ref>\S+)\s+(?P<bound>\S+)\s+(?P<result>PASS|FAIL.*)$"
)
# the 8-bit rows: case, dtype, max|ours-ref|, codes one apart / compared, further apart, absmax rel, bound
ROW8 = re.compile(
    r"^(?P<case>\S.*?8bit.*?)\s+(?P<dtype>fp32|bf16)\s+(?P<ours_ref>\S+)\s+(?P<one_apart>\d+)/(?P<codes>\d+)"
    r"\s+(?P<further>\d+)\s+(?P<absmax>\S+)\s+(?P<bound>\S+)\s+(?P<result>PASS|FAIL.*)$"
)
DEMO_ROW = re.compile(r"^\s*(?P<step>\d+)\s+(?P<ours>\d+\.\d+)\s+(?P<torch>\d+\.\d+)\s+(?P<diff>\S+)$")
FINAL = re.compile(r"^max \|param difference\| after (?P<steps>\d+) steps: (?P<diff>\S+)$", re.M)
PLAIN = "plain-PyTorch path on CPU (set TRITON_INTERPRET=1 to run the Triton kernels through the interpreter)"


def run_cli(*args, env=None):
    """Run `python -m adam_triton.cli args` and return (exit status, stdout)."""
    proc = subprocess.run(
        [sys.executable, "-m", "adam_triton.cli", *args], env=env, capture_output=True, text=True,
        timeout=600,
    )
    if proc.stderr:
        print(proc.stderr, file=sys.stderr)
    return proc.returncode, proc.stdout


def env_without_interpret_switch():
    """The environment with TRITON_INTERPRET removed on a machine without CUDA, so the
    CLI has to switch the interpreter on by itself."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.pop("TRITON_INTERPRET", None)
    return env


def expected_path(device):
    if device.type == "cuda":
        return "CUDA kernels on " + torch.cuda.get_device_name(device)
    return "Triton interpreter on CPU"


def check_rows(out):
    return [m.groupdict() for m in map(ROW.match, out.splitlines()) if m]


def expected_cases():
    names = {"Adam", "Adam wd=0.1 maximize", "AdamW wd=0.1", "Adam amsgrad"}
    if hasattr(adam_triton, "RMSprop"):
        names |= {"RMSprop", "RMSprop centered momentum wd"}
    return names


def test_check_passes_with_small_errors(device):
    rc, out = run_cli("check", "--device", str(device), env=env_without_interpret_switch())
    print(out)
    assert rc == 0
    assert f"path: {expected_path(device)}" in out.splitlines()
    rows = check_rows(out)
    assert {r["case"] for r in rows} == expected_cases()
    assert len(rows) == 2 * len(expected_cases())  # fp32 and bf16 each
    for r in rows:
        assert r["result"] == "PASS", r
        ours_torch, ours_ref, torch_ref, bound = (
            float(r[k]) for k in ("ours_torch", "ours_ref", "torch_ref", "bound")
        )
        if r["dtype"] == "fp32":
            # a few fp32 ulps of params ~ N(0, 1), independent of the CLI's own bound
            assert ours_torch < 1e-5 and ours_ref < 1e-5, r
        else:
            # no worse than twice torch's bf16 error (3 printed digits: allow their rounding)
            assert ours_ref <= 2 * torch_ref * 1.002 + 1e-5, r
            # and within 3 bf16 ulps (1/32 near |p| = 4) of the fp64 reference
            assert ours_ref < 0.1, r
        assert ours_ref <= bound * 1.002, r
    rows8 = [m.groupdict() for m in map(ROW8.match, out.splitlines()) if m]
    assert {r["case"] for r in rows8} == {name for name, _, _ in check.check_cases_8bit()}
    assert len(rows8) == 2 * len(check.check_cases_8bit())
    for r in rows8:
        assert r["result"] == "PASS", r
        assert int(r["further"]) == 0 and int(r["codes"]) > 10_000, r
        assert float(r["ours_ref"]) <= float(r["bound"]) * 1.002, r
        if device.type == "cpu":  # the interpreter computes the reference's fp32 values
            assert int(r["one_apart"]) == 0 and float(r["absmax"]) == 0.0, r
    assert re.search(r"^PASS: 0 failing case\(s\)", out, re.M)


def test_check_fails_on_injected_error(device):
    rc, out = run_cli("check", "--inject-error", "--steps", "2", "--device", str(device))
    print(out)
    assert rc == 1
    rows = check_rows(out)
    failed = [r for r in rows if r["result"] != "PASS"]
    assert len(rows) == 2 * len(expected_cases())
    assert [(r["case"], r["dtype"], r["result"]) for r in failed] == [("Adam", "fp32", "FAIL (param)")]
    assert 0.9e-3 < float(failed[0]["ours_torch"]) < 1.1e-3  # the injected 1e-3
    assert re.search(r"^FAIL: 1 failing case\(s\)", out, re.M)


def test_check_names_the_plain_pytorch_path():
    env = dict(os.environ, TRITON_INTERPRET="0")
    rc, out = run_cli("check", "--steps", "2", "--device", "cpu", env=env)
    print(out)
    assert rc == 0
    assert f"path: {PLAIN}" in out.splitlines()
    rows = check_rows(out)
    assert rows and all(r["result"] == "PASS" for r in rows)


def test_demo_tracks_torch(device):
    rc, out = run_cli("demo", "--steps", "50", "--device", str(device), env=env_without_interpret_switch())
    print(out)
    assert rc == 0
    assert f"path: {expected_path(device)}" in out.splitlines()
    rows = [m.groupdict() for m in map(DEMO_ROW.match, out.splitlines()) if m]
    assert [int(r["step"]) for r in rows] == [1] + list(range(5, 51, 5))
    ours = [float(r["ours"]) for r in rows]
    theirs = [float(r["torch"]) for r in rows]
    for a, b in zip(ours, theirs):
        assert abs(a - b) < 1e-5
    assert ours[-1] < 0.5 * ours[0]  # it did train
    final = FINAL.search(out)
    assert final and int(final["steps"]) == 50
    assert float(final["diff"]) < 1e-5


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"adam-triton {adam_triton.__version__}"


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    out = capsys.readouterr().out
    assert "check" in out and "demo" in out


def test_bench_commands_come_from_bench_module(monkeypatch, capsys):
    try:
        from adam_triton import bench
    except ImportError:
        bench = None
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    help_text = capsys.readouterr().out
    for name in ("bench", "tune"):
        assert (name in help_text.split()) == hasattr(bench, "register")
    # without adam_triton.bench the other commands still work
    monkeypatch.setitem(sys.modules, "adam_triton.bench", None)  # import raises ImportError
    monkeypatch.delattr(adam_triton, "bench", raising=False)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    help_text = capsys.readouterr().out
    assert "bench" not in help_text.split() and "check" in help_text.split()
