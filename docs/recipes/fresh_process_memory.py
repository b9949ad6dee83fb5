"""`eval.measure.run_in_fresh_process`: the CPU peak memory it reports after set-up.

Each row is one fresh process: set-up allocates and frees a "loading transient", calls
`mark_setup_done()`, then the measured work holds two float32 buffers of `mb` MiB each. The
table of docs/RESULTS.md ("run_in_fresh_process: CPU peak memory after set-up").

    python docs/recipes/fresh_process_memory.py
"""

from __future__ import annotations

from pathlib import Path

MIB = 2**20


def alloc(mb: int, setup_mb: int) -> dict:
    """The measured target, run in the fresh process."""
    import torch

    from eval.measure import mark_setup_done

    transient = torch.ones(setup_mb * 2**18)  # float32: setup_mb MiB, a loading transient
    del transient
    mark_setup_done()
    x = torch.ones(mb * 2**18)
    y = x * 2  # a second buffer of the same size: peak = 2 * mb
    return {"expected_bytes": 2 * mb * MIB, "checksum": float(y[0])}


def main() -> None:
    import argparse

    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    from eval.measure import run_in_fresh_process

    print("| measured work (MiB) | set-up transient (MiB) | peak_memory_bytes (MiB) | set-up peak RSS − set-up RSS (MiB) |")
    print("|---:|---:|---:|---:|")
    for mb, setup in [(16, 128), (64, 256), (256, 512)]:
        r = run_in_fresh_process(f"{Path(__file__).resolve()}:alloc", {"mb": mb, "setup_mb": setup})
        if "error" in r:
            raise SystemExit(r["error"])
        print(f"| {r['expected_bytes'] / MIB:.0f} | {setup} | {r['peak_memory_bytes'] / MIB:.1f} | "
              f"{(r['setup_peak_rss_bytes'] - r['setup_rss_bytes']) / MIB:.1f} |")


if __name__ == "__main__":
    main()
