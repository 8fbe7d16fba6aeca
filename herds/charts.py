"""A throughput chart as plain SVG numbers, rendered by the template: no JavaScript needed."""

from __future__ import annotations

WIDTH, HEIGHT, PAD = 600, 160, 30


def throughput_chart(samples: list[list[float]], planned: int) -> dict | None:
    """Tasks finished over time: a polyline plus the labels of its axes."""
    if len(samples) < 2:
        return None
    last_t = max(samples[-1][0], 1.0)
    top = max(planned, samples[-1][1], 1)
    plot_w, plot_h = WIDTH - 2 * PAD, HEIGHT - 2 * PAD
    points = " ".join(
        f"{PAD + plot_w * t / last_t:.1f},{HEIGHT - PAD - plot_h * n / top:.1f}"
        for t, n in samples
    )
    rate = samples[-1][1] / last_t
    return {
        "width": WIDTH,
        "height": HEIGHT,
        "pad": PAD,
        "left": PAD,
        "right": WIDTH - PAD,
        "top": PAD,
        "bottom": HEIGHT - PAD,
        "points": points,
        "max_tasks": top,
        "seconds": round(last_t, 1),
        "rate": round(rate, 2),
    }
