"""Launch configurations: one fixed config under the interpreter, autotuned on the GPU.

Tuning runs the kernel on scratch tensors shaped like the bucket (never on the user's
tensors, so no update is ever applied twice) and keeps the fastest config per
(kernel, device, dtypes, flags, size class).

Where a config comes from, first hit wins:
  1. this process's memory (`_tuned`);
  2. the per-device cache file, read once per process:
     `<cache dir>/<device name>-triton<version>.json`, the cache dir being
     $ADAM_TRITON_CACHE_DIR, else $XDG_CACHE_HOME/adam-triton, else ~/.cache/adam-triton;
  3. tuning now (every CANDIDATES entry timed by the caller's bench callback), whose winner
     is kept in memory and written back to the file (`adam-triton tune` fills it ahead).
Set ADAM_TRITON_AUTOTUNE=0 to never tune: cached winners are still used, DEFAULT_CONFIG
otherwise. Cache keys drop the device index, so cuda:0 and cuda:1 of one model share entries.
"""

import contextlib
import datetime
import json
import math
import os
import re
import sys
import warnings
from pathlib import Path

import torch

# triton is imported only where needed, so `import adam_triton` leaves it unimported and a
# command can still switch the interpreter on (Triton reads TRITON_INTERPRET when it defines
# a jit function, its own standard library's included).

# BLOCK counts 4-byte elements; a bucket with a 2-byte stream runs twice as many per loop
# iteration (kernels/_common.py: block_for), so every thread moves 16 bytes per access.
# Under the interpreter every tl operation costs the same whatever its size, so the largest
# block makes the CPU tests fastest; warps mean nothing there.
INTERPRETER_CONFIG = {"CHUNK": 4096, "BLOCK": 1024, "num_warps": 1}
# Untuned GPU default, read from sm_90 SASS (tests/test_compile.py checks it): 4 fp32 elements
# per thread (one 128-bit access per stream, 48 registers for fp32 Adam, 1 memory round trip
# per iteration), and 32 iterations per program (16 for 16-bit buckets), so the 3 dependent
# loads before a program's first data load leave >= 36 KB of loads in flight per SM.
DEFAULT_CONFIG = {"CHUNK": 16384, "BLOCK": 512, "num_warps": 4}
# Candidates tried by the autotuner: chunk (work per program) x block (work per iteration) x warps.
CANDIDATES = [
    {"CHUNK": chunk, "BLOCK": block, "num_warps": warps}
    # below 4096, programs spend much of their time on the table lookups before the first load
    for chunk in (4096, 8192, 16384, 32768)
    # one 128-bit access per fp32 stream and thread at 2, 4 and 8 warps; and two (8 elements:
    # about twice the registers, half the blocks per SM) at 4 warps
    for block, warps in ((256, 2), (512, 4), (1024, 8), (1024, 4))
    if block <= chunk
]
# Scratch tensors for tuning hold at most this many elements per stream (128 MiB in fp32).
SCRATCH_LIMIT = 1 << 25
# Version of the cache file's layout; a file of another format is ignored (and rewritten).
# 2: BLOCK counts 4-byte elements (winners tuned for the kernels of format 1 are dropped).
CACHE_FORMAT = 2

_tuned = {}  # key -> config, this process
_files = {}  # cache file path -> {key string: entry}, each file read once
_device_names = {}  # torch.device -> name, so a cache lookup never asks the driver twice
_retune = None  # set by retune(): {"done": set of keys, "report": callable or None}
_DEVICE_RE = re.compile(r"^(cpu|cuda)(:\d+)?$")


def interpreter_on():
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    knobs = getattr(sys.modules.get("triton"), "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes", "y")


def _triton_version():
    import triton

    return triton.__version__


def autotune_enabled():
    """False when ADAM_TRITON_AUTOTUNE=0: never tune (cached winners are still used)."""
    return os.environ.get("ADAM_TRITON_AUTOTUNE", "1") != "0"


def size_class(numels):
    """Coarse workload class: (log2 of total elements, log2 of tensor count)."""
    total = max(1, sum(numels))
    return (int(math.log2(total)), int(math.log2(max(1, len(numels)))))


def config_for(key, bench):
    """The launch config for key. bench(config) -> milliseconds, on scratch tensors.

    Memory, then the cache file, then tuning (written back); see the module docstring.
    key is a tuple; its device element (a "cuda:N" string or torch.device) picks the file."""
    if interpreter_on():
        return INTERPRETER_CONFIG
    if _retune is not None and key not in _retune["done"]:
        return tune(key, bench)
    config = _tuned.get(key)
    if config is not None:
        return config
    path, name = _location(key)
    entry = _load(path, name).get(key_string(key))
    if entry is not None:
        config = dict(entry["config"])
        _tuned[key] = config
        return config
    if not autotune_enabled() or _capturing():
        return DEFAULT_CONFIG
    return tune(key, bench)


def tune(key, bench):
    """Time every candidate with bench(config) -> ms; keep the fastest for key in memory and
    in the cache file, and return it. A candidate whose bench raises is skipped (its error is
    passed to retune's report); if every one fails, the first error is raised."""
    results = []
    for config in CANDIDATES:
        try:
            results.append((config, float(bench(config)), None))
        except Exception as exc:  # e.g. a config out of the GPU's resources
            results.append((config, math.inf, exc))
    ok = [(ms, i) for i, (_, ms, _) in enumerate(results) if math.isfinite(ms)]
    if not ok:
        raise results[0][2]
    best_ms, best_i = min(ok)
    best = CANDIDATES[best_i]
    _tuned[key] = best
    path, name = _location(key)
    _store(path, name, key_string(key), {
        "config": dict(best),
        "ms": best_ms,
        "candidates": len(CANDIDATES),
        "tuned": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    if _retune is not None:
        _retune["done"].add(key)
        if _retune["report"] is not None:
            _retune["report"](key, results, best)
    return best


@contextlib.contextmanager
def retune(report=None):
    """Inside the block, config_for tunes every key it meets once afresh (ignoring memory and
    the cache file, and ADAM_TRITON_AUTOTUNE) and overwrites the cached winner.
    report(key, [(config, ms, error or None)], best) is called after each tuning."""
    global _retune
    previous, _retune = _retune, {"done": set(), "report": report}
    try:
        yield
    finally:
        _retune = previous


def clear_memory():
    """Forget this process's winners and loaded files: the next config_for reads the file again."""
    _tuned.clear()
    _files.clear()


def scratch_numels(numels):
    """Tensor sizes for tuning scratch: the bucket's own, cut off at SCRATCH_LIMIT in total."""
    out, total = [], 0
    for n in numels:
        if total + n > SCRATCH_LIMIT:
            out.append(max(1, SCRATCH_LIMIT - total))
            break
        out.append(n)
        total += n
    return [n for n in out if n > 0] or [1]


# -- the cache file ---------------------------------------------------------------------------
def cache_dir():
    """$ADAM_TRITON_CACHE_DIR, else $XDG_CACHE_HOME/adam-triton, else ~/.cache/adam-triton."""
    env = os.environ.get("ADAM_TRITON_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "adam-triton"


def device_name(device=None):
    """The name that identifies a device's cache file: the CUDA device name, else its type."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    name = _device_names.get(device)
    if name is None:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        _device_names[device] = name
    return name


def cache_path(device=None):
    """The cache file of device: <cache dir>/<sanitized device name>-triton<version>.json."""
    return _path_for(device_name(device))


def key_string(key):
    """The cache file's spelling of a key: device elements reduced to their type (cuda:1 ->
    cuda), dtypes as str, everything else as plain Python values; then repr."""
    def plain(x):
        if isinstance(x, (tuple, list)):
            return tuple(plain(v) for v in x)
        if isinstance(x, torch.device):
            return x.type
        if isinstance(x, str):
            return x.split(":")[0] if _DEVICE_RE.match(x) else x
        if isinstance(x, bool) or x is None:
            return x
        if isinstance(x, int):
            return int(x)
        if isinstance(x, float):
            return float(x)
        return str(x)

    return repr(plain(key))


def _path_for(name):
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "unknown"
    return cache_dir() / f"{safe}-triton{_triton_version()}.json"


def _key_device(key):
    for part in key:
        if isinstance(part, torch.device):
            return part
        if isinstance(part, str) and _DEVICE_RE.match(part):
            return torch.device(part)
    return None


def _location(key):
    name = device_name(_key_device(key))
    return _path_for(name), name


def _capturing():
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _valid_config(config):
    if not isinstance(config, dict) or set(config) != set(DEFAULT_CONFIG):
        return False
    if not all(type(v) is int and v > 0 and v & (v - 1) == 0 for v in config.values()):
        return False
    return config["BLOCK"] <= config["CHUNK"] and config["num_warps"] <= 32


def _read(path, name):
    """The valid entries of the file at path ({} when missing, unreadable or not ours)."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except (OSError, ValueError) as exc:
        warnings.warn(f"adam-triton: ignoring unreadable tuning cache {path}: {exc}", stacklevel=3)
        return {}
    if not (isinstance(data, dict) and data.get("format") == CACHE_FORMAT
            and data.get("device") == name and data.get("triton") == _triton_version()):
        return {}
    entries = data.get("entries")
    if not isinstance(entries, dict):
        return {}
    return {k: e for k, e in entries.items() if isinstance(e, dict) and _valid_config(e.get("config"))}


def _load(path, name):
    entries = _files.get(path)
    if entries is None:
        entries = _files[path] = _read(path, name)
    return entries


def _store(path, name, kstr, entry):
    """Add one entry: merged with what is on disk now (other processes may have written),
    written to a temporary file and renamed over the old one. A failed write only warns."""
    entries = _read(path, name)
    entries[kstr] = entry
    _files[path] = entries
    data = {
        "format": CACHE_FORMAT,
        "device": name,
        "triton": _triton_version(),
        "torch": torch.__version__,
        "entries": dict(sorted(entries.items())),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        warnings.warn(f"adam-triton: could not write the tuning cache {path}: {exc}", stacklevel=3)
