"""The demo's outputs: text tables (methods x target rotations, methods x online streams),
results.json and PNG charts."""
import json
import statistics

from ..io.atomic import write_file_atomically

_REFERENCE_LABELS = {"base": "base (pretrained)", "expert_in_domain": "expert, own domain *",
                     "best_single_expert": "best single expert **",
                     "logit_ensemble": "logit ensemble ***"}


def format_table(results, spread=None):
    """Methods x target rotations. spread (seeds.summarise's): each cell mean +- sd over seeds."""
    domains = results["domains"]
    n_sources = len(domains) - 1
    w = _width(spread)
    head = f"{'':24s}" + "".join(f"{str(a) + ' deg':>{w}s}" for a in domains) + f"{'mean':>{w}s}"
    lines = [f"Leave-one-domain-out on rotated digits: accuracy (%) on the held-out rotation, "
             f"{n_sources} source experts merged" + _seeds_note(results, spread),
             head + f"{'merge ms':>10s}", "references"]
    for key, label in _REFERENCE_LABELS.items():
        lines.append(_line(label, results["reference"][key], domains,
                           _part(spread, "reference", key)))
    lines.append(f"merged, alpha = {results['config']['alpha']}")
    for label, row in results["merged"].items():
        ms = 1000 * statistics.median(row["merge_seconds"].values())     # not the warm-up
        lines.append(_line(label, row["accuracy"], domains, _part(spread, "merged", label))
                     + f"{ms:10.1f}")
    if results["tuned_alpha"]:
        lines.append("merged, alpha chosen on the source domains' validation splits")
        lines[-1] += " " * max(0, len(head) - len(lines[-1]) + 2) + "  alpha range"
        for label, row in results["tuned_alpha"].items():
            alphas = list(row["alpha"].values())
            lines.append(_line(label, row["accuracy"], domains,
                               _part(spread, "tuned_alpha", label))
                         + f"{min(alphas):6.1f} - {max(alphas):.1f}")
    lines += ["*   each expert on its own rotation's test split (in-domain, not held out)",
              "**  the source expert that scores best on the target, chosen in hindsight",
              f"*** mean logits of the {n_sources} source experts: {n_sources} forward passes, "
              "not one merged model",
              "merge ms: median over the targets of one merge_task_vectors call"]
    return "\n".join(lines)


def format_online_table(online, spread=None):
    """Methods x streams: accuracy (%) over each stream of unlabeled test batches, then each
    online strategy's median milliseconds per batch and merged forwards per batch."""
    from .online import BASELINES, DEFAULT, LABELS
    streams = online["streams"]
    w = _width(spread)
    head = (f"{'':32s}" + "".join(f"{name:>{w}s}" for name in streams) + f"{'mean':>{w}s}"
            + f"{'ms/batch':>10s}{'fwd':>6s}")
    lines = [f"Online: streams of {online['batch']}-image unlabeled batches from held-out "
             "rotations (a+b: half of every batch from each); accuracy (%)"
             + ("" if spread is None else ", mean +- sd over seeds"), head]
    for key, label in LABELS.items():
        values = [streams[name]["accuracy"][key] for name in streams]
        sds = [None] * len(values) if spread is None else \
            [spread["streams"][name][key] for name in streams]
        line = f"  {label:30s}" + "".join(_cell(v, s) for v, s in zip(values, sds)) \
            + _cell(online["mean"][key], None if spread is None else spread["mean"][key])
        if key not in BASELINES:
            ms = statistics.median(r["ms_per_batch"][key] for r in streams.values())
            fwd = statistics.fmean(r["merged_forwards"][key] for r in streams.values())
            line += f"{ms:10.1f}{fwd:6.1f}"
        lines.append(line)
    lines += [f"+   {DEFAULT}: OnlineMerger's defaults with each expert's calibration record "
              "(its entropy on its own validation split)",
              "**  the source expert that scores best on the stream, chosen in hindsight",
              "*** mean logits of the source experts: K forward passes, not one merged model",
              "ms/batch: median over the streams, every pass included; fwd: merged-model "
              "forwards per batch (the K expert passes come on top)"]
    return "\n".join(lines)


def _width(spread):
    return 8 if spread is None else 11


def _cell(value, sd):
    if sd is None:
        return f"{100 * value:8.1f}"
    return f"{100 * value:6.1f}\u00b1{100 * sd:<4.1f}"


def _part(spread, section, key):
    return None if spread is None else spread[section][key]


def _seeds_note(results, spread):
    if spread is None:
        return ""
    seeds = results["config"]["seed"]
    return f"; mean +- sd over seeds {min(seeds)}-{max(seeds)}"


def _line(label, accuracy, domains, spread=None):
    """One table row; spread: None or {"accuracy": {angle: sd}, "mean": sd of the per-seed
    means}."""
    values = [accuracy[_key(accuracy, a)] for a in domains]
    mean = statistics.fmean(values)
    if spread is None:
        return f"  {label:22s}" + "".join(_cell(v, None) for v in values) + _cell(mean, None)
    sds = [spread["accuracy"][_key(spread["accuracy"], a)] for a in domains]
    return f"  {label:22s}" + "".join(_cell(v, s) for v, s in zip(values, sds)) \
        + _cell(mean, spread["mean"])


def _key(d, angle):
    return angle if angle in d else str(angle)         # int keys in memory, str after JSON


def write_json(results, path):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
    write_file_atomically(path, write)


def plot_online(results, path, spread=None):
    """Accuracy per stream and method of the online section, as grouped bars (with the spread
    over seeds as error bars when given)."""
    plt = _pyplot()

    from .online import LABELS
    streams = results["online"]["streams"]
    names = list(streams)
    fig, ax = plt.subplots(figsize=(13, 5.5))
    width = 0.8 / len(LABELS)
    for i, (key, label) in enumerate(LABELS.items()):
        err = None if spread is None else [100 * spread["online"]["streams"][n][key]
                                           for n in names]
        ax.bar([j + (i - (len(LABELS) - 1) / 2) * width for j in range(len(names))],
               [100 * streams[n]["accuracy"][key] for n in names], width, yerr=err,
               label=label.rstrip(" *+"), error_kw={"elinewidth": 0.6})
    ax.set_xticks(range(len(names)), [f"{n} deg" for n in names])
    ax.set_xlabel("held-out rotation(s) the stream draws from")
    ax.set_ylabel("accuracy over the stream (%)")
    ax.set_ylim(bottom=max(0, 100 * min(min(r["accuracy"].values()) for r in streams.values()) - 10))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=5, fontsize=8)
    ax.set_title("scoremerge demo, online: one merged model per batch or group "
                 f"({_seeds_title(results)})")
    _save(plt, fig, path)


def _seeds_title(results):
    seed = results["config"]["seed"]
    if isinstance(seed, list):
        return f"mean and sd over seeds {min(seed)}-{max(seed)}"
    return f"seed {seed}"


def plot(results, path, spread=None):
    """Two panels: mean held-out accuracy per method (alpha fixed and tuned) against the
    references (with the spread over seeds as error bars when given), and accuracy per target
    rotation."""
    plt = _pyplot()

    domains = results["domains"]
    merged, tuned, ref = results["merged"], results["tuned_alpha"], results["reference"]
    labels = list(merged)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 6.5), gridspec_kw={"width_ratios": [1.1, 1]})
    y = range(len(labels))
    h = 0.4 if tuned else 0.8
    def err(section):
        return None if spread is None else [100 * spread[section][k]["mean"] for k in labels]
    ax1.barh([i - h / 2 * bool(tuned) for i in y], [100 * merged[k]["mean"] for k in labels], h,
             xerr=err("merged"), label=f"alpha = {results['config']['alpha']}")
    if tuned:
        ax1.barh([i + h / 2 for i in y], [100 * tuned[k]["mean"] for k in labels], h,
                 xerr=err("tuned_alpha"), label="alpha tuned on source validation")
    for key, style in (("base", ":"), ("best_single_expert", "--"), ("logit_ensemble", "-.")):
        ax1.axvline(100 * statistics.fmean(ref[key].values()), color="k", linestyle=style,
                    label=_REFERENCE_LABELS[key].rstrip(" *"))
    ax1.set_yticks(list(y), labels)
    ax1.invert_yaxis()
    ax1.set_xlabel("mean accuracy on the held-out rotation (%)")
    ax1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, fontsize=8)

    for k in labels:
        ax2.plot(domains, [100 * merged[k]["accuracy"][_key(merged[k]["accuracy"], a)]
                           for a in domains], marker="o", label=k)
    ax2.plot(domains, [100 * ref["base"][_key(ref["base"], a)] for a in domains], "k:",
             label="base")
    ax2.plot(domains, [100 * ref["logit_ensemble"][_key(ref["logit_ensemble"], a)]
                       for a in domains], "k-.", label="logit ensemble")
    ax2.set_xticks(domains)
    ax2.set_xlabel("held-out rotation (degrees)")
    ax2.set_ylabel(f"accuracy (%), alpha = {results['config']['alpha']}")
    ax2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=4, fontsize=8)
    fig.suptitle("scoremerge demo: leave-one-rotation-out merging of digit experts "
                 f"({_seeds_title(results)})")
    _save(plt, fig, path)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")             # files only, never a window
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path):
    fig.tight_layout()
    try:
        write_file_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
