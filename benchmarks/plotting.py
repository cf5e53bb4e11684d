"""Optional plotting: matplotlib (Agg backend) when installed, else a message and None."""

from __future__ import annotations

import sys
from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or None (with a message on
    stderr) when matplotlib is not installed (``make bench-deps`` installs it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: plot skipped (pip install matplotlib)",
              file=sys.stderr)
        return None
    return plt


def save_figure(fig, path: Path, dpi: int) -> None:
    """``fig`` laid out tight and written to ``path`` (its folder made) at ``dpi``, then
    closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
