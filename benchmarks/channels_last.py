"""Training-step time with channels-last image batches over contiguous (NCHW) ones, measured in one run.

The datamodules' ``channels_last=True`` lays every image batch out channels-last (NHWC) after the
transfer to the device; the convolutions then run channels-last through the network. This script
trains each network for one epoch of random images through Lightning, once with contiguous and
once with channels-last batches, alternating (contiguous, channels-last, contiguous, ...) so that
load from other processes affects both alike, and reports the ratio of the median step times
(forward, backward, optimizer step; with ``--gates`` also BAR's gates, penalty and gate step).

Usage: ``python benchmarks/channels_last.py [--models lenet5 resnet20 vgg16] [--rounds 3] [--steps 20]
[--batch 128] [--threads 1] [--gates] [--out file.json]``; prints a Markdown table (and, with ``--out``,
writes the medians and the run's context as JSON).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bar_overhead import compare_settings  # noqa: E402  (the sibling benchmark's timed Lightning epoch)


def main(argv: list[str] | None = None) -> dict:
    variants = {"contiguous": {"channels_last": False}, "channels_last": {"channels_last": True}}
    return compare_settings(Path(__file__).name, __doc__.splitlines()[0], variants, "Channels-last batches",
                            {"contiguous": "contiguous", "channels_last": "channels-last"}, argv)


if __name__ == "__main__":
    main()
