"""The `adam-triton` command: `check` (our optimizers against torch.optim and an fp64
reference; the 8-bit ones against the 8-bit reference), `demo` (a small model trained with
ours and with torch.optim.Adam side by side), and `bench` / `tune` where adam_triton.bench
provides them.

On a machine without CUDA, `check` and `demo` switch Triton's interpreter on
(TRITON_INTERPRET=1, unless the variable is already set) so the kernels themselves run on
CPU tensors; with TRITON_INTERPRET=0 they take the plain-PyTorch path instead. Both say
which path ran.
"""

import argparse
import os
import sys
import time

import torch  # does not import triton

from .check import INJECTED_ERROR  # (adam_triton.check imports torch only)

_PLAIN_PATH = (
    "plain-PyTorch path on CPU (set TRITON_INTERPRET=1 to run the Triton kernels through the interpreter)"
)


# -- which path runs ------------------------------------------------------------------------
def _enable_interpreter_without_cuda():
    """Set TRITON_INTERPRET=1 when no CUDA device is available and the user left it unset.

    Triton picks interpreter or compiler when a jit function is defined (its own, like
    tl.sum, included), so this has to run before triton is first imported; importing
    adam_triton does not import it."""
    if "TRITON_INTERPRET" in os.environ or torch.cuda.is_available():
        return
    if "triton" in sys.modules:
        print(
            "warning: triton was imported before TRITON_INTERPRET could be set; "
            "set TRITON_INTERPRET=1 yourself",
            file=sys.stderr,
        )
        return
    os.environ["TRITON_INTERPRET"] = "1"


def describe_path(device):
    """One line saying what executes an fp32 step on device: the CUDA kernels, the Triton
    interpreter, or the plain-PyTorch path."""
    from . import tuning

    device = torch.device(device)
    interpreted = tuning.interpreter_on()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return f"Triton interpreter on CUDA tensors of {name}" if interpreted else f"CUDA kernels on {name}"
    if device.type == "cpu" and interpreted:
        return "Triton interpreter on CPU"
    if device.type == "cpu":
        return _PLAIN_PATH
    return f"plain-PyTorch path on {device.type}"


def resolve_device(name):
    """torch.device for --device (default: cuda if available, else cpu); SystemExit with a
    message for a CUDA device this machine does not have."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"adam-triton: --device {name}: no CUDA device is available")
    return device


# -- check: adam_triton.check ------------------------------------------------------------
def cmd_check(args):
    """Print one row per (case, dtype) (adam_triton.check) and return 1 if any row fails."""
    from . import check

    device = resolve_device(args.device)
    print(f"path: {describe_path(device)}")
    start = time.perf_counter()
    failures = check.run(device, args.steps, args.inject_error)
    print()
    print(f"{'FAIL' if failures else 'PASS'}: {failures} failing case(s) "
          f"({time.perf_counter() - start:.1f} s)")
    return 1 if failures else 0



# -- demo -----------------------------------------------------------------------------------
def cmd_demo(args):
    """Train the demo model with both optimizers and print the two loss curves."""
    from .demo import train_pair

    device = resolve_device(args.device)
    print(f"path: {describe_path(device)}")
    result = train_pair(steps=args.steps, lr=args.lr, device=device)
    print(f"MLP {result['shape']} on a synthetic regression task, {args.steps} steps, lr={args.lr:g}, seed 0")
    print(f"{'step':>5} {'loss adam_triton.Adam':>22} {'loss torch.optim.Adam':>22} {'|difference|':>13}")
    for step, (a, b) in enumerate(zip(result["ours"], result["torch"]), start=1):
        if step == 1 or step % 5 == 0 or step == args.steps:
            print(f"{step:>5} {a:>22.6f} {b:>22.6f} {abs(a - b):>13.3e}")
    print(f"max |param difference| after {args.steps} steps: {result['max_param_diff']:.3e}")
    return 0


# -- parser ---------------------------------------------------------------------------------
def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def build_parser():
    """The argparse parser; bench/tune come from adam_triton.bench.register where present."""
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="adam-triton",
        description="Multi-tensor fused optimizer steps (Adam, AdamW, RMSprop) in Triton: correctness check, demo and benchmarks.",
    )
    parser.add_argument("--version", action="version", version=f"adam-triton {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    check = sub.add_parser(
        "check", help="compare our optimizers with torch.optim and an fp64 reference",
        description="Run every optimizer for a few steps on tensors of odd sizes, in fp32 and bf16, "
                    "against torch.optim (foreach=False) and adam_triton.reference in float64; the 8-bit "
                    "optimizers against adam_triton.reference's 8-bit step, code for code. "
                    "Exit status 1 if any case fails.",
    )
    check.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    check.add_argument("--steps", type=_positive_int, default=5, help="optimizer steps per case (default 5)")
    check.add_argument(
        "--inject-error", action="store_true",
        help=f"self-test of the checker: add {INJECTED_ERROR:g} to one element of the first case's "
             "result, which must then FAIL (exit status 1)",
    )
    check.set_defaults(func=cmd_check)

    demo = sub.add_parser(
        "demo", help="train a small MLP with adam_triton.Adam and torch.optim.Adam side by side",
        description="Train the same seeded MLP on the same synthetic data with adam_triton.Adam and "
                    "torch.optim.Adam; print both loss curves and the largest param difference.",
    )
    demo.add_argument("--steps", type=_positive_int, default=50, help="training steps (default 50)")
    demo.add_argument("--lr", type=float, default=1e-2, help="learning rate (default 1e-2)")
    demo.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    demo.set_defaults(func=cmd_demo)

    try:
        from . import bench
    except ImportError:
        bench = None
    if hasattr(bench, "register"):
        bench.register(sub)
    return parser


def _command(argv):
    """The subcommand named in argv (the first word not starting with '-'), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv=None):
    """Entry point of the `adam-triton` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if _command(argv) in ("check", "demo"):
        _enable_interpreter_without_cuda()
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    status = func(args)
    return 0 if status is None else int(status)


if __name__ == "__main__":
    sys.exit(main())
