"""The numbers over seeds and the verdict on each of the paper's claims (experiments/paper.py's CLAIMS), and the
picture of the tables: plain statistics, no training.

A claim says that one row scores above another. Over the seeds both rows ran with, it **holds** where the mean
of the per-seed differences is above two standard errors of that mean, is **reversed** where it is below minus
two, and is **undecided** otherwise or with fewer than two seeds. The differences are paired by seed: at seed k
both rows start from seed k's stage-1 encoder where they use one, and their data order and heads are drawn from
the same seed, so the pairing removes what the two rows share of the noise.
"""
import math
import statistics

RULE = ("a claim 'A > B' holds where the mean over the seeds of A − B (paired by seed) is above two standard "
        "errors of that mean, is reversed below minus two standard errors, and is undecided otherwise or with "
        "fewer than two seeds")
Z = 2.0  # standard errors a difference must pass


def summary(values):
    """{'mean', 'std', 'n'} of the numbers of ``values`` that are not None (std: sample deviation, None below
    two numbers; mean: None for none)."""
    present = [v for v in values if v is not None]
    return {"mean": statistics.fmean(present) if present else None,
            "std": statistics.stdev(present) if len(present) > 1 else None, "n": len(present)}


def verdict(better, worse, z=Z):
    """('holds' | 'reversed' | 'undecided', mean difference, its standard error, n) for the claim that
    ``better`` (numbers per seed, None where missing) is above ``worse``, over the seeds both have."""
    diffs = [a - b for a, b in zip(better, worse) if a is not None and b is not None]
    n = len(diffs)
    mean = statistics.fmean(diffs) if diffs else None
    if n < 2:
        return "undecided", mean, None, n
    se = statistics.stdev(diffs) / math.sqrt(n)
    if mean > z * se and mean > 0:
        return "holds", mean, se, n
    if mean < -z * se and mean < 0:
        return "reversed", mean, se, n
    return "undecided", mean, se, n


def spread(cell):
    """'47.9 ± 1.2 (n=3)' (one seed: '47.9 (n=1)')."""
    text = f"{cell['mean']:.1f}"
    return text + (f" ± {cell['std']:.1f}" if cell["std"] is not None else "") + f" (n={cell['n']})"


def difference(claim):
    """A judged claim's measured difference as text: '+3.1 ± 0.8 (n=3)'."""
    if claim["difference"] is None:
        return "-"
    se = f" ± {claim['standard_error']:.1f}" if claim["standard_error"] is not None else ""
    return f"{claim['difference']:+.1f}{se} (n={claim['n']})"


def plot(result, path):
    """One panel per table: each row's (and column's) measured mean with its standard deviation, each seed's
    number, and the paper's number; written to ``path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tables = list(result["tables"].items())
    if not tables:
        return
    heights = [max(1, sum(1 for r in t["rows"] for c in r["cells"] if c.get("paper") is not None
                          or c.get("measured") is not None)) for _, t in tables]
    fig, axes = plt.subplots(len(tables), 1, figsize=(9, 1.2 + 0.32 * sum(heights) + 0.6 * len(tables)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (_, table) in zip(axes[:, 0], tables):
        labels, y = [], 0
        for row in table["rows"]:
            for column, cell in zip(table["columns"], row["cells"]):
                if cell.get("paper") is None and cell.get("measured") is None:
                    continue
                labels.append(row["name"][:48] + (f" [{column}]" if len(table["columns"]) > 1 else ""))
                if cell.get("paper") is not None:
                    ax.plot(cell["paper"], y, marker="x", color="tab:red", ms=7, ls="none")
                if cell.get("measured") is not None:
                    seeds = [v for v in cell["values"] if v is not None]
                    ax.plot(seeds, [y] * len(seeds), marker="o", color="tab:blue", ms=3, alpha=0.4, ls="none")
                    ax.errorbar(cell["mean"], y, xerr=cell["std"] or 0, fmt="o", color="tab:blue", ms=6, capsize=3)
                y += 1
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(table["title"], fontsize=8, loc="left")
    axes[-1, 0].set_xlabel(f"% ({result['dataset']}, scale '{result['scale']}', {result['seeds']} seed(s) asked):"
                           " blue = measured mean ± std (dots: each seed), red x = the paper's (CIFAR-10)",
                           fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(found, titles, path):
    """One panel per kind of run ({kind: {run: {seed: numbers per epoch}}}): each run's mean over its seeds
    per epoch as a line, each seed's as a thin one; written to ``path`` (nothing where no run has a log)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    kinds = [k for k in titles if found.get(k)]
    if not kinds:
        return
    fig, axes = plt.subplots(len(kinds), 1, figsize=(9, 3.2 * len(kinds)), squeeze=False)
    for ax, kind in zip(axes[:, 0], kinds):
        for i, (name, seeds) in enumerate(sorted(found[kind].items())):
            color = plt.get_cmap("tab20")(i % 20)
            for values in seeds.values():
                ax.plot(range(1, len(values) + 1), values, color=color, lw=0.5, alpha=0.5)
            length = max(len(v) for v in seeds.values())
            mean = [statistics.fmean(v[e] for v in seeds.values() if len(v) > e) for e in range(length)]
            ax.plot(range(1, length + 1), mean, color=color, lw=1.6, marker=".", ms=3, label=f"{name} ({len(seeds)})")
        ax.set_title(titles[kind], fontsize=9, loc="left")
        ax.set_xlabel("epoch (all rounds in order)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=3, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
