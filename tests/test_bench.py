"""The benchmark and tuning tools, as far as a CPU runs them: workload shape lists, bytes
formulas, the tuning cache file (write, reload in a new process, no re-tuning), the no-GPU
exits of `bench` and `tune`, and the interpreter demo's JSON. GPU timings are not tested here."""

import argparse
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from adam_triton import bench, tuning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, env_update=None, drop=(), timeout=300, hide_gpu=True):
    """Run python with args in a new process (by default with no GPU visible)."""
    env = dict(os.environ, **(env_update or {}))
    if hide_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    for k in drop:
        env.pop(k, None)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


# -- workloads ----------------------------------------------------------------------------------
def test_gpt2_small_shapes():
    shapes = bench.gpt2_small_shapes()
    assert len(shapes) == 148
    assert sum(math.prod(s) for _, s in shapes) == 124_439_808
    named = dict(shapes)
    assert named["wte.weight"] == (50257, 768) and named["wpe.weight"] == (1024, 768)
    assert named["h.0.attn.c_attn.weight"] == (768, 2304) and named["h.11.mlp.c_proj.weight"] == (3072, 768)
    assert named["ln_f.bias"] == (768,)
    assert len(named) == 148  # no name twice


def test_llama_1b_shapes():
    shapes = bench.llama_1b_shapes()
    d, layers, kv, ffn, vocab = 2048, 16, 512, 8192, 128256
    per_layer = 2 * d + 2 * d * d + 2 * kv * d + 3 * ffn * d
    assert len(shapes) == 1 + 9 * layers + 1 == 146
    assert sum(math.prod(s) for _, s in shapes) == vocab * d + layers * per_layer + d == 1_235_814_400
    assert dict(shapes)["layers.15.self_attn.k_proj.weight"] == (512, 2048)


def test_other_workloads_and_scale():
    assert bench.workload_shapes("large") == [(1 << 28,)]
    many = bench.workload_shapes("many-small")
    assert len(many) == 2000 and set(many) == {(4096,)}
    assert bench.expand_workloads(["all"]) == ["large", "gpt2", "llama-1b", "many-small"]
    assert bench.expand_workloads(["gpt2", "sweep", "gpt2"]) == ["gpt2"] + bench.SWEEP
    assert bench.workload_shapes("tensor-2^20") == [(1 << 20,)]
    # --scale shrinks the first dimension of every tensor, keeping the tensor count
    small = bench.workload_shapes("gpt2", 0.01)
    assert len(small) == 148
    assert abs(sum(math.prod(s) for s in small) / 124_439_808 - 0.01) < 0.002
    assert bench.workload_shapes("large", 1 / 1024) == [(1 << 18,)]
    assert bench.scale_shape((3, 5), 0.01) == (1, 5)


# -- bytes formulas -----------------------------------------------------------------------------
def test_bytes_formulas():
    assert bench.adam_bytes_per_elem(4, 4, 4) == 28  # read p, g, m, v; write p, m, v
    assert bench.adam_bytes_per_elem(2, 2, 2) == 14
    assert bench.adam_bytes_per_elem(4, 4, 4, amsgrad=True) == 36
    assert bench.adam_bytes_per_elem(4, 4, 4, clip=True) == 32
    assert bench.adam_bytes_per_elem(2, 2, 4) == 22  # bf16 params and grads, fp32 states
    assert bench.adam_bytes_per_elem(2, 2, 4, master=True) == 28  # + fp32 master weights
    fp32_states, master = bench.VARIANTS["adam-fp32-states"], bench.VARIANTS["adam-master"]
    assert fp32_states.bytes_per_elem(torch.bfloat16) == 22
    assert master.bytes_per_elem(torch.bfloat16) == 28
    assert master.bytes_per_elem(torch.bfloat16, impl="torch-fused") == 14  # torch keeps bf16 states
    assert bench.impls_for(master) == ("adam-triton", "torch-fused")
    assert bench.rmsprop_bytes_per_elem(4, 4, 4) == 20
    assert bench.rmsprop_bytes_per_elem(4, 4, 4, momentum=True) == 28
    assert bench.rmsprop_bytes_per_elem(4, 4, 4, momentum=True, centered=True) == 36
    assert bench.copy_bytes(1000) == 2000
    expected = {"adam": (28, 14), "adamw": (28, 14), "amsgrad": (36, 18), "rmsprop": (20, 10), "clip": (32, 16)}
    for name, (fp32, bf16) in expected.items():
        variant = bench.VARIANTS[name]
        assert (variant.bytes_per_elem(torch.float32), variant.bytes_per_elem(torch.bfloat16)) == (fp32, bf16)
    assert bench.VARIANTS["clip"].bytes_per_elem(torch.float32, clip=False) == 28
    # 8-bit states: fp32 params 16 B/element + the absmax (2 states x 4 B read and written per block)
    assert bench.adam8bit_bytes_per_elem(4, 4) == 16 + 16 / 256
    assert bench.adam8bit_bytes_per_elem(2, 2, block_size=64) == 10 + 16 / 64
    assert bench.adam8bit_bytes_per_elem(4, 4, amsgrad=True) == 18 + 24 / 256
    eight = bench.VARIANTS["adamw-8bit"]
    assert eight.bytes_per_elem(torch.float32) == 16.0625 and eight.bytes_per_elem(torch.bfloat16) == 10.0625
    assert eight.bytes_per_elem(torch.float32, impl="torch-fused") == 28  # torch's AdamW, fp32 states
    assert bench.impls_for(eight) == ("adam-triton", "torch-fused")


# -- the tuning cache -----------------------------------------------------------------------------
KEY = ("adam", "cpu", (torch.float32, torch.float32, torch.float32, False), (False, False, 0), (20, 3))
WINNER = {"CHUNK": 8192, "BLOCK": 1024, "num_warps": 8}


def fake_ms(config):
    """Milliseconds of a pretend kernel whose fastest config is WINNER."""
    return (1.0 + abs(config["CHUNK"] - 8192) / 1e4 + abs(config["BLOCK"] - 1024) / 1e4
            + (config["num_warps"] != 8) * 0.01)


class Bench:
    """A bench callback that counts its calls."""

    def __init__(self, fn=fake_ms):
        self.fn, self.calls = fn, []

    def __call__(self, config):
        self.calls.append(dict(config))
        return self.fn(config)


def never(config):
    raise AssertionError("the bench callback must not be called")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache dir, empty in-memory state, and config_for acting as on a GPU."""
    monkeypatch.setenv("ADAM_TRITON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("ADAM_TRITON_AUTOTUNE", raising=False)
    monkeypatch.setattr(tuning, "_tuned", {})
    monkeypatch.setattr(tuning, "_files", {})
    monkeypatch.setattr(tuning, "interpreter_on", lambda: False)
    return tmp_path / "cache"


def read_cache():
    return json.loads(tuning.cache_path("cpu").read_text())


def test_cache_path_names_device_and_triton(cache):
    import triton

    path = tuning.cache_path("cpu")
    assert path == cache / f"cpu-triton{triton.__version__}.json"
    assert tuning._path_for("NVIDIA H100 80GB HBM3").name == f"NVIDIA-H100-80GB-HBM3-triton{triton.__version__}.json"


def test_tune_writes_winner_then_memory_then_file(cache):
    b = Bench()
    assert tuning.config_for(KEY, b) == WINNER
    assert len(b.calls) == len(tuning.CANDIDATES)
    data = read_cache()
    assert data["format"] == tuning.CACHE_FORMAT and data["device"] == "cpu"
    entry = data["entries"][tuning.key_string(KEY)]
    assert entry["config"] == WINNER and entry["ms"] == pytest.approx(fake_ms(WINNER))
    # again in this process: from memory
    assert tuning.config_for(KEY, never) == WINNER
    # in-memory state cleared (as in a new process): from the file, without tuning
    tuning.clear_memory()
    assert tuning.config_for(KEY, never) == WINNER
    # a different key is tuned and added next to the first
    other = KEY[:4] + ((10, 0),)
    assert tuning.config_for(other, Bench(lambda c: 1.0 + (c != tuning.DEFAULT_CONFIG))) == tuning.DEFAULT_CONFIG
    assert set(read_cache()["entries"]) == {tuning.key_string(KEY), tuning.key_string(other)}


def test_new_process_reuses_cache_without_tuning(cache):
    assert tuning.config_for(KEY, Bench()) == WINNER
    code = (
        "import json, sys, torch\n"
        "from adam_triton import tuning\n"
        "tuning.interpreter_on = lambda: False\n"
        "def bench(config):\n"
        "    print('BENCH CALLED'); sys.exit(3)\n"
        f"key = ('adam', 'cpu', (torch.float32, torch.float32, torch.float32, False), (False, False, 0), (20, 3))\n"
        "print(json.dumps(tuning.config_for(key, bench)))\n"
    )
    out = _run(["-c", code], {"ADAM_TRITON_CACHE_DIR": str(cache)})
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == WINNER


def test_key_string_drops_device_index():
    a = tuning.key_string(("adam", "cuda:0", (torch.bfloat16,), (True, 2), (27, 7)))
    b = tuning.key_string(("adam", "cuda:1", (torch.bfloat16,), (True, 2), (27, 7)))
    c = tuning.key_string(("adam", torch.device("cuda", 3), (torch.bfloat16,), (True, 2), (27, 7)))
    assert a == b == c == "('adam', 'cuda', ('torch.bfloat16',), (True, 2), (27, 7))"
    assert tuning.key_string(("adam", "cuda:0", (torch.float32,), (True, 2), (27, 7))) != a


def test_bad_files_and_entries_are_ignored(cache):
    path = tuning.cache_path("cpu")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable tuning cache"):
        assert tuning.config_for(KEY, Bench()) == WINNER  # tuned, and the file rewritten
    assert read_cache()["entries"][tuning.key_string(KEY)]["config"] == WINNER
    # an entry with an impossible config, and a file of another Triton version: ignored
    for change in ({"entries": {tuning.key_string(KEY): {"config": {"CHUNK": 512, "BLOCK": 1024, "num_warps": 4}}}},
                   {"triton": "0.0.0"}):
        data = read_cache()
        data.update(change)
        path.write_text(json.dumps(data))
        tuning.clear_memory()
        b = Bench()
        assert tuning.config_for(KEY, b) == WINNER
        assert len(b.calls) == len(tuning.CANDIDATES)


def test_autotune_off_uses_cache_else_default(cache, monkeypatch):
    monkeypatch.setenv("ADAM_TRITON_AUTOTUNE", "0")
    assert tuning.config_for(KEY, never) == tuning.DEFAULT_CONFIG
    assert not tuning.cache_path("cpu").exists()
    monkeypatch.delenv("ADAM_TRITON_AUTOTUNE")
    tuning.config_for(KEY, Bench())
    tuning.clear_memory()
    monkeypatch.setenv("ADAM_TRITON_AUTOTUNE", "0")
    assert tuning.config_for(KEY, never) == WINNER


def test_retune_tunes_each_key_once_afresh_and_reports(cache):
    tuning.config_for(KEY, Bench(lambda c: 1.0 + (c != tuning.DEFAULT_CONFIG)))
    assert read_cache()["entries"][tuning.key_string(KEY)]["config"] == tuning.DEFAULT_CONFIG
    reports = []
    b = Bench()
    with tuning.retune(report=lambda key, tried, best: reports.append((key, tried, best))):
        assert tuning.config_for(KEY, b) == WINNER
        assert tuning.config_for(KEY, never) == WINNER  # once per block
    assert len(b.calls) == len(tuning.CANDIDATES)
    (key, tried, best), = reports
    assert key == KEY and best == WINNER and len(tried) == len(tuning.CANDIDATES)
    assert all(err is None for _, _, err in tried)
    assert read_cache()["entries"][tuning.key_string(KEY)]["config"] == WINNER
    assert tuning.config_for(KEY, never) == WINNER  # outside the block: memory again


def test_failing_candidates_are_skipped(cache):
    def bench_fn(config):
        if config["num_warps"] == 8:
            raise RuntimeError("out of resources")
        return fake_ms(config)

    best = tuning.config_for(KEY, Bench(bench_fn))
    assert best == {"CHUNK": 8192, "BLOCK": 1024, "num_warps": 4}
    tuning.clear_memory()
    assert tuning.config_for(KEY, never) == best
    with pytest.raises(RuntimeError, match="every|out of resources"):
        tuning.config_for(KEY[:4] + ((1, 1),), Bench(lambda c: bench_fn({**c, "num_warps": 8})))


def test_merges_with_entries_other_processes_wrote(cache):
    tuning.config_for(KEY, Bench())
    data = read_cache()
    data["entries"]["('other', 'cpu')"] = {"config": dict(tuning.DEFAULT_CONFIG), "ms": 1.0}
    tuning.cache_path("cpu").write_text(json.dumps(data))
    tuning.config_for(KEY[:4] + ((5, 5),), Bench())
    assert len(read_cache()["entries"]) == 3


def test_unwritable_cache_only_warns(tmp_path, cache, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("ADAM_TRITON_CACHE_DIR", str(blocker / "sub"))
    with pytest.warns(UserWarning, match="could not write"):
        assert tuning.config_for(KEY, Bench()) == WINNER
    assert tuning.config_for(KEY, never) == WINNER


def test_interpreter_uses_its_fixed_config(monkeypatch):
    monkeypatch.setattr(tuning, "interpreter_on", lambda: True)
    assert tuning.config_for(KEY, never) == tuning.INTERPRETER_CONFIG


def test_format_tuning_marks_winner_with_gbps():
    tried = [({"CHUNK": 4096, "BLOCK": 1024, "num_warps": 4}, 0.01, None),
             ({"CHUNK": 8192, "BLOCK": 1024, "num_warps": 8}, 0.02, None),
             ({"CHUNK": 2048, "BLOCK": 512, "num_warps": 4}, math.inf, RuntimeError("boom"))]
    text = bench.format_tuning("gpt2 fp32 adam", KEY, tried, tried[0][0], nbytes=28_000_000)
    lines = text.splitlines()
    assert lines[2].startswith("  *") and "2800.0" in lines[2]  # 28 MB in 0.01 ms
    assert "1400.0" in lines[3] and not lines[3].startswith("  *")
    assert "failed: boom" in lines[4]
    assert "n/a" in bench.format_tuning("x", KEY, tried[:1], tried[0][0], nbytes=None)


# -- the command line ---------------------------------------------------------------------------
def test_register_adds_bench_and_tune():
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--workload", "gpt2", "many-small", "--dtype", "bf16", "--json", "x.json"])
    assert args.func is bench.run_bench and args.workload == ["gpt2", "many-small"] and args.dtype == ["bf16"]
    args = parser.parse_args(["tune", "--workload", "llama-1b", "--scale", "0.5"])
    assert args.func is bench.run_tune and args.scale == 0.5 and args.variant == ["all"]


@pytest.mark.parametrize("command, words", [("bench", "nothing to measure"), ("tune", "nothing to tune")])
def test_no_gpu_exits_zero_with_message(command, words):
    out = _run(["-m", "adam_triton.bench", command])
    assert out.returncode == 0, out.stderr
    assert "no CUDA GPU" in out.stdout and words in out.stdout


def test_no_gpu_in_process(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["bench", "--workload", "gpt2"]) == 0
    assert bench.main(["tune"]) == 0
    out = capsys.readouterr().out
    assert out.count("no CUDA GPU") == 2


def test_interpreter_demo_json(tmp_path, capsys):
    if not tuning.interpreter_on():
        pytest.skip("the in-process demo needs the interpreter on from the start (CPU test run)")
    path = tmp_path / "demo.json"
    assert bench.main(["bench", "--interpreter-demo", "--variant", "adam", "--dtype", "fp32",
                       "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "interpreter timings are not performance" in printed.lower()
    report = json.loads(path.read_text())
    meta = report["meta"]
    assert meta["interpreter_demo"] is True and meta["note"] == "interpreter timings are not performance"
    for field in ("device", "torch", "triton", "date", "command", "copy", "bytes_formulas", "timing"):
        assert meta[field], field
    assert meta["torch"] == torch.__version__ and "--interpreter-demo" in meta["command"]
    assert meta["copy"]["gbps"] > 0 and meta["copy"]["bytes_moved"] == 2 * (16 << 20)
    rows = {r["impl"]: r for r in report["results"]}
    assert set(rows) == set(bench.impls_for(bench.VARIANTS["adam"]))
    ours = rows["adam-triton"]
    assert ours["status"] == "ok", ours.get("note")
    assert ours["n_tensors"] == len(bench.DEMO_SHAPES) and ours["numel"] == 33 * 17 + 1000 + 4096 + 5
    assert ours["bytes_per_elem"] == 28 and ours["bytes"] == 28 * ours["numel"]
    assert ours["p20_ms"] <= ours["median_ms"] <= ours["p80_ms"]
    assert ours["gbps"] == pytest.approx(ours["bytes"] / (ours["median_ms"] * 1e-3) / 1e9)
    assert 1 <= ours["launches"] <= 2 and ours["launches_by"] == "Triton interpreter launches"
    assert ours["host_ms"] > 0
    assert ours["configs"] and ours["configs"][0]["config"] == tuning.INTERPRETER_CONFIG
    # two steps from identical tensors: adam-triton and torch.optim agree to fp32 rounding
    assert ours["check_max_abs_diff"] < 1e-6 < ours["check_max_update"]
    for impl in ("torch-for-loop", "torch-foreach", "torch-fused"):
        assert rows[impl]["status"] == "ok", rows[impl].get("note")
        assert rows[impl]["adam_triton_speedup"] == pytest.approx(rows[impl]["median_ms"] / ours["median_ms"])
        assert ours["speedup_vs"][impl] == pytest.approx(rows[impl]["adam_triton_speedup"])
    assert rows["torch-compile"]["status"] == "skipped"


def test_interpreter_demo_switches_interpreter_on_in_new_process(tmp_path):
    """Without TRITON_INTERPRET in the environment the demo turns it on itself, before triton
    is imported (clipping's norm uses tl.sum from Triton's own jit library)."""
    path = tmp_path / "demo.json"
    out = _run(["-m", "adam_triton.bench", "bench", "--interpreter-demo", "--variant", "clip", "--dtype", "bf16",
                "--impl", "adam-triton", "--demo-reps", "1", "--host-reps", "1", "--json", str(path)],
               drop=("TRITON_INTERPRET",))
    assert out.returncode == 0, out.stdout + out.stderr
    (row,) = json.loads(path.read_text())["results"]
    if row["status"] == "skipped":
        pytest.skip(row["note"])  # adam_triton without max_grad_norm
    assert row["status"] == "ok", row.get("note")
    assert row["bytes_per_elem"] == 16


def test_plot_without_matplotlib_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    message = bench.plot({"meta": {}, "results": []}, str(tmp_path / "x.png"))
    assert "matplotlib is not installed" in message and not (tmp_path / "x.png").exists()


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [dict(workload=w, dtype="fp32", variant="adam", impl=i, numel=n, status="ok", gbps=g)
            for w, n in (("a", 10), ("b", 1000)) for i, g in (("adam-triton", 2.0), ("torch-fused", 1.0))]
    report = {"meta": {"device": {"name": "test"}, "torch": "t", "triton": "t", "copy": {"gbps": 3.0}},
              "results": rows}
    assert bench.plot(report, str(tmp_path / "x.png")).startswith("wrote")
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"


def test_speedups_and_table():
    base = dict(workload="gpt2", dtype="fp32", variant="adam", status="ok", p20_ms=1, p80_ms=1, gbps=1.0)
    rows = [dict(base, impl="adam-triton", median_ms=2.0), dict(base, impl="torch-fused", median_ms=3.0),
            dict(base, impl="torch-foreach", median_ms=8.0),
            dict(workload="gpt2", dtype="fp32", variant="adam", impl="torch-compile", status="error",
                 note="RuntimeError: x")]
    bench.add_speedups(rows)
    assert rows[1]["adam_triton_speedup"] == 1.5 and rows[2]["adam_triton_speedup"] == 4.0
    assert rows[0]["speedup_vs"] == {"torch-fused": 1.5, "torch-foreach": 4.0}
    report = {"meta": {"device": {"name": "dev"}, "torch": "t", "triton": "t", "bytes_formulas": {"adam": "f"}},
              "results": rows}
    table = bench.format_table(report)
    assert "error: RuntimeError: x" in table and "4.00" in table and "1.50" in table


def test_measure_reports_errors_instead_of_raising(monkeypatch):
    def broken_step():
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(bench, "build", lambda *a, **k: (broken_step, None))
    opts = argparse.Namespace(demo_reps=1, host_reps=1)
    params = bench.make_params([(4,)], torch.float32, torch.device("cpu"))
    row = bench.measure("torch-fused", bench.VARIANTS["adam"], params, torch.device("cpu"), opts, 1.0, 4)
    assert row["status"] == "error" and "kernel exploded" in row["note"]


def test_params_and_grads_are_random():
    params = bench.make_params([(64, 3), (5,)], torch.bfloat16, torch.device("cpu"))
    for p in params:
        assert p.dtype == torch.bfloat16 and p.grad.dtype == torch.bfloat16
        assert (p != 0).float().mean() > 0.9 and (p.grad != 0).float().mean() > 0.9
        assert not torch.equal(p, p.grad)


def test_count_interpreter_launches_restores_run():
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run
    with bench.count_interpreter_launches() as counter:
        assert InterpretedFunction.run is not original
    assert InterpretedFunction.run is original and counter == [0]


def test_gpu_activity_classification():
    from types import SimpleNamespace as E

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    assert bench._gpu_activity(E(device_type=cuda, name="_adam_kernel", activity_type="kernel")) == "kernel"
    assert bench._gpu_activity(E(device_type=cuda, name="Memset (Device)", activity_type="gpu_memset")) == "copy"
    assert bench._gpu_activity(E(device_type=cuda, name="Optimizer.step#Adam.step",
                                 activity_type="gpu_user_annotation", is_user_annotation=True)) is None
    assert bench._gpu_activity(E(device_type=cpu, name="cudaLaunchKernel", activity_type="cuda_runtime")) is None
    # older torch without activity_type: by name
    assert bench._gpu_activity(E(device_type=cuda, name="Memcpy DtoD (Device -> Device)")) == "copy"
    assert bench._gpu_activity(E(device_type=cuda, name="void at::native::vectorized_elementwise_kernel")) == "kernel"


# -- on a GPU (ADAM_TRITON_TEST_DEVICE=cuda pytest tests/test_bench.py) ---------------------------
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or tuning.interpreter_on(),
    reason="needs a CUDA GPU with the interpreter off (ADAM_TRITON_TEST_DEVICE=cuda)",
)


@needs_gpu
def test_gpu_bench_small_run(tmp_path, monkeypatch):
    """The whole bench pipeline on small workloads: every measured field present and sane."""
    monkeypatch.setenv("ADAM_TRITON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ADAM_TRITON_AUTOTUNE", "0")  # default config: no tuning time here
    path = tmp_path / "bench.json"
    assert bench.main([
        "bench", "--workload", "gpt2", "many-small", "--scale", "0.05", "--dtype", "fp32", "bf16",
        "--variant", "adam", "clip", "--impl", "adam-triton", "torch-for-loop", "torch-fused", "torch-clip+fused",
        "--warmup-ms", "5", "--rep-ms", "20", "--copy-mib", "256", "--json", str(path),
    ]) == 0
    report = json.loads(path.read_text())
    meta = report["meta"]
    assert meta["interpreter_demo"] is False and meta["device"]["name"] == torch.cuda.get_device_name()
    assert meta["copy"]["gbps"] > 100 and meta["copy"]["bytes_moved"] == 2 * (256 << 20)
    ok = [r for r in report["results"] if r["status"] == "ok"]
    assert all(r["status"] in ("ok", "skipped") for r in report["results"]), report["results"]
    assert {r["impl"] for r in ok} >= {"adam-triton", "torch-for-loop", "torch-fused"}
    for r in ok:
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["reps"] >= 10
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["median_ms"] * 1e-3) / 1e9)
        assert 0 < r["pct_copy"] < 200
        assert r["launches"] >= 1 and r["host_ms"] > 0 and r["peak_extra_mb"] >= 0
    for r in ok:
        if r["impl"] == "adam-triton":
            assert r["launches"] <= 6, r["kernels_by_name"]  # a few launches per bucket, not per tensor
            assert r["speedup_vs"] and r["configs"]
            if r["dtype"] == "fp32":
                assert r["check_max_abs_diff"] < 1e-5 < r["check_max_update"]
        if r["impl"] == "torch-for-loop" and r["workload"] == "many-small":
            assert r["launches"] >= 2000  # at least one kernel per tensor


@needs_gpu
def test_gpu_tune_then_new_process_reuses_without_tuning(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("ADAM_TRITON_CACHE_DIR", str(cache))
    monkeypatch.setattr(tuning, "_tuned", {})
    monkeypatch.setattr(tuning, "_files", {})
    out = tmp_path / "tune.json"
    assert bench.main(["tune", "--workload", "gpt2", "--scale", "0.05", "--dtype", "fp32", "--variant", "adam",
                       "--json", str(out)]) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert len(result["tried"]) == len(tuning.CANDIDATES)
    assert all(t["ms"] > 0 and t["gbps"] > 0 for t in result["tried"] if t["error"] is None)
    entries = json.loads(tuning.cache_path().read_text())["entries"]
    assert entries[result["key"]]["config"] == result["best"]
    code = (
        "import json, torch, adam_triton\n"
        "from adam_triton import bench, tuning\n"
        "calls = []\n"
        "original = tuning.tune\n"
        "tuning.tune = lambda key, b: calls.append(key) or original(key, b)\n"
        "params = bench.make_params(bench.workload_shapes('gpt2', 0.05), torch.float32, torch.device('cuda'))\n"
        "opt = adam_triton.Adam(params, lr=1e-3)\n"
        "opt.step(); torch.cuda.synchronize()\n"
        "print(json.dumps([len(calls), dict(tuning._tuned.popitem()[1])]))\n"
    )
    proc = _run(["-c", code], {"ADAM_TRITON_CACHE_DIR": str(cache)}, drop=("TRITON_INTERPRET",), hide_gpu=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    n_tuned, config = json.loads(proc.stdout.strip().splitlines()[-1])
    assert n_tuned == 0 and config == result["best"]
