"""Benchmark CLI: ``python -m bench <subcommand> [options]``.

Each subcommand is a function taking the remaining command-line arguments and returning
an exit status; add one by adding it to ``SUBCOMMANDS``.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


def _kernels(argv: Sequence[str]) -> int:
    from bench import kernels

    return kernels.main(argv)


def _speed(argv: Sequence[str]) -> int:
    from bench import speed

    return speed.main(argv)


def _real(argv: Sequence[str]) -> int:
    from bench import real

    return real.main(argv)


def _compat(argv: Sequence[str]) -> int:
    from bench import compat

    return compat.main(argv)


def _memory(argv: Sequence[str]) -> int:
    from bench import memory

    return memory.main(argv)


def _gpu(argv: Sequence[str]) -> int:
    from bench import gpu

    return gpu.main(argv)


def _apply_half(argv: Sequence[str]) -> int:
    from bench import apply_half

    return apply_half.main(argv)


def _dist(argv: Sequence[str]) -> int:
    from bench import dist

    return dist.main(argv)


#: name -> (one-line help, entry point taking the remaining argv)
SUBCOMMANDS: dict[str, tuple[str, Callable[[Sequence[str]], int]]] = {
    "kernels": ("fused ops: eager PyTorch vs the torch reference vs the native backend", _kernels),
    "speed": ("protection speed: the classic error-minimizing loop vs ours, same data and surrogate", _speed),
    "real": ("protection on real MedMNIST: every method vs a victim, clean reference included", _real),
    "compat": ("drop-in: the classic unlearnable-examples loop, plain PyTorch vs salm_fast.compat", _compat),
    "memory": ("peak memory of a protection vs the size of the data set (streamed data)", _memory),
    "gpu": ("CUDA: Triton vs eager vs copy bandwidth per op, end-to-end protection images/s", _gpu),
    "apply_half": ("PneumoniaMNIST: half protected, half by apply (saved protector), vs all protected", _apply_half),
    "dist": ("many processes: protect on 1 process vs N under torchrun, one thread each", _dist),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in SUBCOMMANDS:
        lines = ["usage: python -m bench <subcommand> [options]   (<subcommand> --help for its options)", ""]
        lines += [f"  {name:10s} {help_}" for name, (help_, _) in SUBCOMMANDS.items()]
        print("\n".join(lines))
        if args and args[0] not in ("-h", "--help"):
            print(f"\nunknown subcommand {args[0]!r}", file=sys.stderr)
            return 2
        return 0
    return SUBCOMMANDS[args[0]][1](args[1:])


if __name__ == "__main__":
    sys.exit(main())
