"""``onnxq quantize --auto`` options, defined without importing the heavy AutoQuantize module (``--help``
stays light; ``onnxq.report.autoquant`` runs it)."""

from __future__ import annotations

from typing import Any

from onnxq.choices import DEFAULT_AUTO_FORMATS

DEFAULT_FORMATS = DEFAULT_AUTO_FORMATS


def add_cli_arguments(parser: Any) -> None:
    """``--auto EFFECTIVE_BITS`` and ``--auto-formats LIST`` for ``onnxq quantize``."""
    parser.add_argument(
        "--auto",
        type=float,
        metavar="BITS",
        help="AutoQuantize: per layer, the format with the least output error within this many weight bits "
        "per parameter on average (measured per layer and format, solved as a knapsack, verified on held-out data)",
    )
    parser.add_argument(
        "--auto-formats",
        default=",".join(DEFAULT_FORMATS),
        metavar="LIST",
        help=f"with --auto: the formats to choose from (modes, and fp16 for high precision; default {','.join(DEFAULT_FORMATS)})",
    )
