"""``python -m nora.bench {kernels,train} [options]`` (``--help`` after a subcommand for its options)."""

from __future__ import annotations

import importlib
import logging
import sys

from nora.logs import setup_logging

log = logging.getLogger(__name__)

SUBCOMMANDS = {
    "kernels": ("nora.bench.kernels", "rational kernels vs GELU/SiLU: time, saved bytes, bandwidth floor"),
    "train": ("nora.bench.train_step", "training-step time and peak memory per fine-tuning method"),
    "mlp": ("nora.bench.mlp_block", "SwiGLU MLP block step: SiLU vs NoRA vs LoRA vs NoRA++"),
}


def _usage() -> str:
    lines = ["usage: python -m nora.bench <subcommand> [options]", "", "subcommands:"]
    lines += [f"  {name:<8} {doc}" for name, (_, doc) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in SUBCOMMANDS:
        log.error(f"unknown subcommand {cmd!r}\n\n{_usage()}")
        return 2
    module_name = SUBCOMMANDS[cmd][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        log.error(
            f"nora.bench: the {cmd!r} benchmark is not available in this checkout ({module_name} does not exist yet)",
        )
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
