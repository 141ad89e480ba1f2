"""Loss curves from the Trainer's log history, written as PNG files."""

from __future__ import annotations

from pathlib import Path


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """Exponential moving average; the weight grows with the number of points (0 for <= 1 point).

    >>> smooth([1.0, 1.0, 1.0])
    [1.0, 1.0, 1.0]
    """
    if not values:
        return []
    if weight is None:
        weight = min(0.9, 0.5 + 0.4 * (1 - 10 / max(len(values), 10)))
    out, last = [], values[0]
    for value in values:
        last = weight * last + (1 - weight) * value
        out.append(last)
    return out


def plot_losses(log_history: list[dict], output_dir: str | Path, run_name: str | None = None) -> list[Path]:
    """Write training_loss.png (raw and smoothed), training_eval_loss.png if eval loss was logged and
    training_reward.png if a reward was (grpo), titled with `run_name` (default: output_dir's name; the
    final save draws into a staging dir, so it names the run).

    Returns:
        The paths written (empty when there was no training loss logged).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, file_name, label in (
        ("loss", "training_loss.png", "train loss"),
        ("eval_loss", "training_eval_loss.png", "eval loss"),
        ("reward", "training_reward.png", "train reward"),  # grpo: the weighted reward of the completions
    ):
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry and "step" in entry]
        if not points:
            continue
        steps, values = zip(*points, strict=True)
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot(
            steps,
            values,
            color="#1f77b4",
            alpha=0.35 if len(points) > 1 else 1.0,
            marker="o" if len(points) < 20 else None,
            label=label,
        )
        if len(points) > 1:
            ax.plot(steps, smooth(list(values)), color="#1f77b4", label="smoothed")
        ax.set_xlabel("step")
        ax.set_ylabel(key.removeprefix("eval_"))
        ax.set_title(f"{label} of {run_name or Path(output_dir).name}")
        ax.legend()
        ax.grid(alpha=0.3)
        path = Path(output_dir) / file_name
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
