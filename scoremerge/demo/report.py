"""The demo's outputs: text tables (methods x target rotations, methods x online streams),
results.json and PNG charts."""
import json
import statistics

from ..io.atomic import write_file_atomically

_REFERENCE_LABELS = {"base": "base (pretrained)", "expert_in_domain": "expert, own domain *",
                     "best_single_expert": "best single expert **",
                     "logit_ensemble": "logit ensemble ***"}


def format_table(results):
    domains = results["domains"]
    n_sources = len(domains) - 1
    head = f"{'':24s}" + "".join(f"{str(a) + ' deg':>8s}" for a in domains) + f"{'mean':>8s}"
    lines = [f"Leave-one-domain-out on rotated digits: accuracy (%) on the held-out rotation, "
             f"{n_sources} source experts merged",
             head + f"{'merge ms':>10s}", "references"]
    for key, label in _REFERENCE_LABELS.items():
        lines.append(_line(label, results["reference"][key], domains))
    lines.append(f"merged, alpha = {results['config']['alpha']}")
    for label, row in results["merged"].items():
        ms = 1000 * statistics.median(row["merge_seconds"].values())     # not the warm-up
        lines.append(_line(label, row["accuracy"], domains) + f"{ms:10.1f}")
    if results["tuned_alpha"]:
        lines.append("merged, alpha chosen on the source domains' validation splits")
        lines[-1] += " " * max(0, len(head) - len(lines[-1]) + 2) + "  alpha range"
        for label, row in results["tuned_alpha"].items():
            alphas = list(row["alpha"].values())
            lines.append(_line(label, row["accuracy"], domains)
                         + f"{min(alphas):6.1f} - {max(alphas):.1f}")
    lines += ["*   each expert on its own rotation's test split (in-domain, not held out)",
              "**  the source expert that scores best on the target, chosen in hindsight",
              f"*** mean logits of the {n_sources} source experts: {n_sources} forward passes, "
              "not one merged model",
              "merge ms: median over the targets of one merge_task_vectors call"]
    return "\n".join(lines)


def format_online_table(online):
    """Methods x streams: accuracy (%) over each stream of unlabeled test batches."""
    from .online import LABELS
    streams = online["streams"]
    head = f"{'':32s}" + "".join(f"{name:>8s}" for name in streams) + f"{'mean':>8s}"
    lines = [f"Online: streams of {online['batch']}-image unlabeled batches from held-out "
             "rotations (a+b: half of every batch from each); accuracy (%)", head]
    for key, label in LABELS.items():
        values = [streams[name]["accuracy"][key] for name in streams]
        lines.append(f"  {label:30s}" + "".join(f"{100 * v:8.1f}" for v in values)
                     + f"{100 * online['mean'][key]:8.1f}")
    ms = statistics.median(r["ms_per_batch"]["online entropy"] for r in streams.values())
    lines += ["+   one merged model per batch from the entropy of the experts' predictions "
              f"(median {ms:.1f} ms per batch here, all passes included)",
              "**  the source expert that scores best on the stream, chosen in hindsight",
              "*** mean logits of the source experts: K forward passes, not one merged model"]
    return "\n".join(lines)


def _line(label, accuracy, domains):
    values = [accuracy[_key(accuracy, a)] for a in domains]
    mean = statistics.fmean(values)
    return f"  {label:22s}" + "".join(f"{100 * v:8.1f}" for v in values) + f"{100 * mean:8.1f}"


def _key(d, angle):
    return angle if angle in d else str(angle)         # int keys in memory, str after JSON


def write_json(results, path):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
    write_file_atomically(path, write)


def plot_online(results, path):
    """Accuracy per stream and method of the online section, as grouped bars."""
    plt = _pyplot()

    from .online import LABELS
    streams = results["online"]["streams"]
    names = list(streams)
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / len(LABELS)
    for i, (key, label) in enumerate(LABELS.items()):
        ax.bar([j + (i - (len(LABELS) - 1) / 2) * width for j in range(len(names))],
               [100 * streams[n]["accuracy"][key] for n in names], width, label=label.rstrip(" *+"))
    ax.set_xticks(range(len(names)), [f"{n} deg" for n in names])
    ax.set_xlabel("held-out rotation(s) the stream draws from")
    ax.set_ylabel("accuracy over the stream (%)")
    ax.set_ylim(bottom=max(0, 100 * min(min(r["accuracy"].values()) for r in streams.values()) - 10))
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=len(LABELS), fontsize=8)
    ax.set_title("scoremerge demo, online: per-batch entropy-adaptive merging (seed "
                 f"{results['config']['seed']})")
    _save(plt, fig, path)


def plot(results, path):
    """Two panels: mean held-out accuracy per method (alpha fixed and tuned) against the
    references, and accuracy per target rotation."""
    plt = _pyplot()

    domains = results["domains"]
    merged, tuned, ref = results["merged"], results["tuned_alpha"], results["reference"]
    labels = list(merged)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 6.5), gridspec_kw={"width_ratios": [1.1, 1]})
    y = range(len(labels))
    h = 0.4 if tuned else 0.8
    ax1.barh([i - h / 2 * bool(tuned) for i in y], [100 * merged[k]["mean"] for k in labels], h,
             label=f"alpha = {results['config']['alpha']}")
    if tuned:
        ax1.barh([i + h / 2 for i in y], [100 * tuned[k]["mean"] for k in labels], h,
                 label="alpha tuned on source validation")
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
    fig.suptitle("scoremerge demo: leave-one-rotation-out merging of digit experts (seed "
                 f"{results['config']['seed']})")
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
