"""Where the project's files live: the repository root, its `experiments/` folder, and relative paths in a
config (`data.cache_dir`, `train.checkpoint_dir`), which are read under the root."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[3]  # src/lrexp/config/paths.py -> the repository
EXPERIMENTS = PROJECT_ROOT / "experiments"


def project_path(path: str | Path) -> Path:
    """`path` as given if absolute, else under the project root (not the working directory), so a run
    finds the same caches and checkpoints from whichever folder it starts."""
    path = Path(path)
    return path if path.is_absolute() else PROJECT_ROOT / path
