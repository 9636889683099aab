"""Where the shipped Hydra configs live.

In a source checkout (editable install) they are the top-level ``conf/`` folder; a built wheel
carries the same files as ``lightning_prune/conf`` (see ``[tool.hatch.build]`` in
pyproject.toml).
"""

from __future__ import annotations

from pathlib import Path


def config_dir() -> Path:
    """Absolute path of the folder holding ``train.yaml`` and the config groups."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"lightning-prune's configs were not found in {here / 'conf'} (wheel) nor {here.parent / 'conf'} "
        "(source checkout); reinstall the package"
    )
