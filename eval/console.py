"""What the suite's commands print: the suite's own output, not library chatter."""

from __future__ import annotations

import logging
import os

NOISY_LIBRARIES = ("transformers", "bitsandbytes", "accelerate", "datasets", "lm_eval", "peft")


def quiet_library_logs() -> None:
    """Show only errors from the libraries the suite builds on, unless SLIMTUNE_VERBOSE=1.

    Hub warnings and bitsandbytes' kernel probes (e.g. "Failed to load CPU gemm_4bit_forward
    from kernels-community", harmless offline) would otherwise bury the suite's output. Called
    by the `slimtune` command and by the fresh processes it measures in.
    """
    if os.environ.get("SLIMTUNE_VERBOSE") == "1":
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
