"""Training-step time in bfloat16 autocast (Lightning's ``bf16-mixed``) over float32, measured in one run.

With ``precision: bf16-mixed`` a bench task trains under ``torch.autocast`` in bfloat16:
convolutions and matrix products run in bfloat16 (on CPUs with AMX or AVX-512 BF16 through
oneDNN's bfloat16 kernels), the weights and the optimizer's state stay float32. This script trains
each network for one epoch of random channels-last images through Lightning, once in ``32-true``
and once in ``bf16-mixed``, alternating (float32, bfloat16, float32, ...) so that load from other
processes affects both alike, and reports the ratio of the median step times (forward, backward,
optimizer step; with ``--gates`` also BAR's gates, penalty and gate step). On a CPU without
bfloat16 instructions the ratio is below 1: keep ``32-true`` there.

Usage: ``python benchmarks/bf16_mixed.py [--models lenet5 resnet20 vgg16] [--rounds 3] [--steps 20]
[--batch 128] [--threads 1] [--gates] [--out file.json]``; prints a Markdown table (and, with ``--out``,
writes the medians and the run's context as JSON).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bar_overhead import compare_settings  # noqa: E402  (the sibling benchmark's timed Lightning epoch)


def main(argv: list[str] | None = None) -> dict:
    variants = {"float32": {"channels_last": True}, "bf16_mixed": {"channels_last": True, "precision": "bf16-mixed"}}
    return compare_settings(Path(__file__).name, __doc__.splitlines()[0], variants, "bfloat16 autocast",
                            {"float32": "float32", "bf16_mixed": "bf16-mixed"}, argv)


if __name__ == "__main__":
    main()
