"""The ``fastloss bench --plot`` figure."""
from __future__ import annotations

import numpy as np


_COLORS = {"numpy": "#8c8c8c", "numba": "#1f77b4", "cython": "#ff7f0e", "cuda": "#2ca02c"}


def plot(rows, info, threads, path) -> None:
    """Two panels sharing the workload axis: speedup vs NumPy (log scale) and % of the memcpy
    bandwidth, one bar per backend.  Uses the Agg canvas directly (no pyplot, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    by = {(r["workload"], r["backend"]): r for r in rows}
    rivals = [b for b in backends if b != "numpy"]  # numpy is the 1x line of the speedup panel
    n, nb = len(workloads), len(backends)
    fig = Figure(figsize=(14, 1.8 + 0.2 * n * max(nb, 2)), layout="constrained")
    FigureCanvasAgg(fig)
    ax_s, ax_m = fig.subplots(1, 2, sharey=True)
    ax_s.set_xscale("log")
    ys = np.arange(n)

    def get(w, b, key, scale=1.0):
        r = by.get((w, b))
        return np.nan if r is None or r[key] is None else scale * r[key]

    # speedup: bars grow from the 1x line, right = faster than NumPy, left = slower
    h = 0.8 / max(len(rivals), 1)
    speeds = []
    for j, b in enumerate(rivals):
        ypos = ys + (j - (len(rivals) - 1) / 2) * h
        sp = np.array([get(w, b, "speedup_vs_numpy") for w in workloads])
        speeds.extend(sp[np.isfinite(sp)])
        ax_s.barh(ypos, sp - 1.0, h, left=1.0, label=b, color=_COLORS.get(b))
        for y, v, w in zip(ypos, sp, workloads):
            if np.isfinite(v):
                bad = not by[(w, b)]["ok"]
                txt = f"{v:.0f}x" if v >= 10 else f"{v:.1f}x" if v >= 1 else f"{v:.2f}x" if v >= 0.1 else f"{v:.2g}x"
                ax_s.text(v, y, f" {txt} " + ("MISMATCH " if bad else ""), va="center",
                          ha="left" if v >= 1 else "right", fontsize=7, color="red" if bad else "black")
    if not rivals:
        ax_s.text(1.0, n / 2, "only the NumPy baseline ran", ha="center", va="center")
    lo = min([0.5] + [v / 2 for v in speeds])
    hi = max([2.0] + [v * 2.5 for v in speeds])
    ax_s.set_xlim(lo, hi)
    # share of the copy bandwidth, every backend
    h = 0.8 / nb
    for j, b in enumerate(backends):
        ypos = ys + (j - (nb - 1) / 2) * h
        ax_m.barh(ypos, [get(w, b, "memcpy_share", 100.0) for w in workloads], h, label=b, color=_COLORS.get(b))
    ax_s.axvline(1.0, color="black", lw=0.8)
    ax_s.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax_s.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax_m.set_xlim(0, max(105.0, ax_m.get_xlim()[1]))
    ax_s.set_xlabel("speedup vs NumPy backend (x, log scale; higher is better)")
    ax_m.axvline(100.0, color="black", lw=0.8, ls="--")
    ax_m.set_xlabel("% of np.copyto bandwidth on the same bytes (dashed: a 1-thread copy)")
    ax_s.set_yticks(ys, workloads, fontsize=8)
    ax_s.invert_yaxis()
    for ax in (ax_s, ax_m):
        ax.grid(axis="x", alpha=0.3)
    ax_m.legend(loc="lower right", fontsize=8)
    nthreads = threads.get("fastloss", threads.get("numba", "?"))
    fig.suptitle(f"fastloss bench: {info['cpu_model']}, {info['cpus_usable']} cores, threads={nthreads}, "
                 f"numpy {info['numpy']}, numba {info['numba']}", fontsize=10)
    fig.savefig(path, dpi=110)
