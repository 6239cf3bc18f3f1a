"""The report's first section: the identity check's verdict per algorithm (from OUT/identity/<algorithm>.json), its
figure, and the data side's evidence (from the runs' checksums and the tests that hold the inputs equal)."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from harness.report.tables import markdown

NAMES = {"fixmatch": "FixMatch", "mixmatch": "MixMatch"}
SIDES = {"own": "ours", "torchssl": "TorchSSL", "usb": "USB"}
SKIPPED_BY = {"exact": "exact mode", "shipped": "as shipped", "power": "planted bugs"}
# Quantities drawn in the figure, grouped as a step computes them (the JSON has each one).
FIGURE_GROUPS = {
    "logits": ("logits",), "losses": ("loss_x", "loss_u", "loss"), "mixed batch": ("x_mix", "t_mix"),
    "BatchNorm buffers": ("bn_buffers",), "momentum": ("momentum",), "update": ("update",),
    "parameters": ("params",), "EMA parameters": ("ema",),
}
FLOOR = 1e-12  # a bit-equal quantity is drawn here on the log axis
# The evidence that both implementations see the same inputs, and the command that rechecks each.
DATA_EVIDENCE = (
    ("TorchSSL's data sets hold our images", "before every TorchSSL run, its labelled set is compared with "
     "train[split], its unlabelled set with all train images, its test set with ours, pixel for pixel (the run "
     "refuses otherwise)", "every TorchSSL run (`third_party/torchssl/entry.py: verify_data`)"),
    ("strong augmentation, op by op", "our batched RandAugment(3, 5) and Cutout of the `torchssl` recipe equal "
     "TorchSSL's own PIL functions pixel for pixel on real images, each op, the Cutout and the whole transform",
     "`python -m pytest tests/test_augment_torchssl.py`"),
    ("weak augmentation and the paper's RandAugment", "flip and reflect-padded crop, and each of the paper's 14 ops, "
     "equal PIL's on real images", "`python -m pytest tests/test_augment.py`"),
    ("augmentation and sampling distributions", "ops, magnitudes, Cutout sizes drawn as TorchSSL draws them "
     "(frequencies against the uniform laws); batches drawn with replacement as its RandomSampler",
     "`python -m pytest tests/test_augment_torchssl.py -k statistics tests/test_recipes.py -k sampler`"),
    ("USB's inputs", "the `usb` recipe's normalisation (ImageNet mean and std, as ToTensor + Normalize compute them), "
     "its weak and strong transforms and its epoch-seeded sampler equal USB's own, pixel for pixel and index for "
     "index", "`python -m pytest tests/test_usb_recipe.py`"),
    ("decoded pixels and splits", "one sha256 of the decoded arrays and one per split file, carried by every "
     "result.json and checked by this report (table below)", "`python run_all.py --report-only`"),
)


def load_checks(out_dir: Path) -> dict[str, dict]:
    """Every OUT/identity/<algorithm>.json, by algorithm (a damaged file becomes an error entry)."""
    checks = {}
    for path in sorted((Path(out_dir) / "identity").glob("*.json")):
        try:
            checks[path.stem] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            checks[path.stem] = {"algorithm": path.stem, "error": f"{path} unreadable: {e}"}
    return checks


def title(check: dict) -> str:
    """'FixMatch, ours against TorchSSL' (a check written before it named its pair is ours against TorchSSL)."""
    return (f"{NAMES.get(check.get('algorithm'), check.get('algorithm'))}, "
            f"{SIDES[check.get('subject', 'own')]} against {SIDES[check.get('reference', 'torchssl')]}")


def headline(check: dict) -> str:
    """One line: the verdict of one check, or why there is none."""
    name = title(check)
    if "error" in check:
        return f"**{name}: the identity check could not run** ({check['error']}; log: `{check.get('log', '')}`)"
    v = check["verdict"]
    mark = "✅" if v["passed"] else "❌"
    return f"{mark} **{name}**: {v['exact']}; {v['shipped']}; {v['power']}."


def fmt_rel(x) -> str:
    return "0 (bit-equal)" if not x else f"{x:.1e}"


def cases_table(check: dict) -> list[str]:
    rows = []
    for c in check["cases"]:
        ex = c["exercised"]
        if "mask_rate" in ex:
            rates = ex["mask_rate"]
            live = (f"pseudo-labels accepted on {ex['steps_with_some_accepted']} of {len(rates)} steps "
                    f"(mean mask rate {100 * sum(rates) / len(rates):.0f}%)")
        else:
            lam = ex["lambda_u"]
            live = f"λu ramped {lam[0]:g} → {lam[-1]:g}"
        exact = "identical" if c["exact"]["identical"] else (
            f"**differs at step {c['exact']['first_difference']['step']} in "
            f"{c['exact']['first_difference']['quantity']}**")
        f = c["shipped"]["first_difference"]
        shipped = "identical" if f is None else (f"step {f['step']}, {f['quantity']} (`{f['where'] or '–'}`, "
                                                 f"{f['rel']:.1e}), from {' and '.join(c['shipped']['from']) or '?'}")
        worst = max(c["shipped"]["max_rel"].items(), key=lambda kv: kv[1])
        above = c["shipped"]["above_noise"]
        noise = "within float noise" if above is None else f"**above float noise at step {above['step']} in " \
                                                           f"{above['quantity']}**"
        values = ", ".join(f"{k} {v}" for k, v in c["spec"].items()
                           if k in ("threshold", "weight_decay", "ema_decay", "bn_momentum", "ramp_up", "lambda_u"))
        rows.append({"setting": f"{c['setting']} ({values})", "network": c["network"], "steps": c["steps"],
                     "what was exercised": live, "exact mode": exact, "as shipped: first difference, from": shipped,
                     "largest as-shipped difference (quantity)": f"{fmt_rel(worst[1])} ({worst[0]}); {noise}",
                     "seconds": c["seconds"]})
    return markdown(pd.DataFrame(rows), right=("steps", "seconds"))


def networks_table(check: dict) -> list[str]:
    """USB against TorchSSL: per case, USB's loop on TorchSSL's network and on its own, where each first differs."""
    rows = []
    for c in check["cases"]:
        for net in ("torchssl", "usb"):
            found = c[f"{net}_network"]
            f = found["first_difference"]
            rows.append({"setting": c["setting"], "network": c["network"],
                         "USB's loop driving": "TorchSSL's WideResNet" if net == "torchssl" else "USB's own WideResNet",
                         "first difference from TorchSSL": "none: identical at every step" if f is None else
                         f"step {f['step']}, {f['quantity']} (`{f['where'] or '–'}`, {f['rel']:.1e}, {f['n_diff']} "
                         f"of {f['n']} elements)",
                         "as expected": "yes" if found["as_expected"] else "**NO**", "seconds": c["seconds"]})
    return markdown(pd.DataFrame(rows), right=("seconds",))


def power_table(check: dict) -> list[str]:
    rows = []
    for c in check["cases"]:
        for p in c["power"]:
            f = p["first_difference"] or {}
            rows.append({"planted bug (in our code only)": p["bug"], "network": c["network"],
                         "caught": "yes" if p["caught"] else "**NO**", "at step": f.get("step", "–"),
                         "first quantity to differ": f.get("quantity", "–"),
                         "relative difference": fmt_rel(f.get("rel")),
                         "above float noise": "yes" if p["above_noise"] else "no: bit-exactness alone catches it"})
    return markdown(pd.DataFrame(rows), right=("at step", "relative difference")) if rows else []


def identity_figure(check: dict, path: Path) -> None:
    """Per step, the largest relative difference of each quantity group: as shipped against TorchSSL, and one ulp
    up or down in every starting weight (float noise, the larger), in the first case of each setting; log scale,
    bit-equal at FLOOR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for i, c in enumerate(check["cases"]) if c["setting"] not in
             {d["setting"] for d in check["cases"][:i]}]
    fig, axes = plt.subplots(1, len(cases), figsize=(6.5 * len(cases), 4.2), squeeze=False, sharey=True)
    colors = plt.get_cmap("tab10")
    for ax, c in zip(axes[0], cases):
        for i, (group, quantities) in enumerate(FIGURE_GROUPS.items()):
            present = [q for q in quantities if q in c["per_step"]["as shipped"]]
            if not present:
                continue
            for variant, style in (("as shipped", "-"), ("noise", ":")):
                series = [max(c["per_step"][variant][q][k] for q in present)
                          for k in range(len(c["per_step"][variant][present[0]]))]
                ax.plot(range(1, len(series) + 1), [max(v, FLOOR) for v in series], style, color=colors(i),
                        lw=1.6 if variant == "as shipped" else 1.1, label=group if variant == "as shipped" else None)
        ax.axhline(FLOOR, color="black", lw=0.8)
        ax.text(1, FLOOR * 2, "bit-equal (exact mode: every quantity, every step)", fontsize=8, va="bottom")
        ax.set_yscale("log")
        ax.set(title=f"{title(check)}, {c['network']}, {c['setting']} setting",
               xlabel="step", ylabel=f"relative difference from {SIDES[check.get('reference', 'torchssl')]}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=2, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def data_rows(runs: list[dict]) -> list[str]:
    """The checksum row of the data side: one pixel checksum over all runs, one split per (budget, seed)."""
    if not runs:
        return []
    data = {r["result"]["data_sha256"] for r in runs}
    splits: dict[tuple, set] = {}
    for r in runs:
        splits.setdefault((r["spec"]["n_labels"], r["spec"]["seed"]), set()).add(r["result"]["split_sha256"])
    bad = [k for k, v in splits.items() if len(v) > 1]
    mark = "✅" if len(data) == 1 and not bad else "❌"
    return [f"{mark} {len(runs)} finished runs: {len(data)} pixel checksum(s) (`{sorted(data)[0][:16]}…`), "
            f"{len(splits)} (budget, seed) pairs each with {'one split' if not bad else 'SEVERAL splits: ' + str(bad)}"
            f"; every run's step count is in its row of the tables below."]


def identity_section(out_dir: Path, runs: list[dict], fig_dir: Path) -> tuple[list[str], list[str]]:
    """(lines, figure names) of the section; no lines when no check ran and no runs exist."""
    checks = load_checks(out_dir)
    lines = ["## Same computation? The identity check", ""]
    if not checks:
        lines += ["No identity check here: it runs first whenever two implementations of an algorithm are asked "
                  "for (`python run_all.py identity ...` runs it alone).", ""]
    else:
        lines += [f"- {headline(c)}" for c in checks.values()]
        lines += ["", "Our training step and a reference's own training loop (TorchSSL's `train()`, USB's "
                  "`AlgorithmBase.train()`, unedited), in lockstep on the CPU: the same starting weights, the same "
                  "already-augmented batches each step, and after every step every quantity compared (learning rate, "
                  "each forward's logits, losses, mask, MixMatch's mixed batch and λ, BatchNorm buffers, momentum, the "
                  "update, parameters, EMA), then the evaluated model's logits. Ours follows the reference's recipe. "
                  "*Exact mode* runs our code with SGD as the per-parameter loop and the EMA as the reference's "
                  "expression: the answer is bit for bit. *As shipped* runs the training step our runs use (fused "
                  "SGD, multi-tensor EMA), held to float noise measured in the same lockstep: what one ulp up or "
                  "down in every starting weight does to each quantity (the larger of the two), and one ulp per step "
                  "for state carried across steps. "
                  "*Planted bugs* put a known mistake in our code only; the check must catch each one. USB against "
                  "TorchSSL runs USB's loop on TorchSSL's network and on its own, and must find what is known of "
                  "them. Seeds are for the other question: the tables below.", ""]
    figures = []
    for stem, check in checks.items():
        if "error" in check:
            continue
        lines += [f"### {title(check)}", ""]
        if check.get("subject", "own") != "own":
            lines += [*networks_table(check), "", f"Rerun: `{check.get('command', 'python run_all.py identity')}`.", ""]
            continue
        lines += [*cases_table(check), ""]
        table = power_table(check)
        if table:
            lines += table + [""]
        fig_dir.mkdir(parents=True, exist_ok=True)
        name = f"identity-{stem}.png"
        identity_figure(check, fig_dir / name)
        figures.append(name)
        ref = SIDES[check.get("reference", "torchssl")]
        lines += [f"![identity check, {title(check)}](figures/{name})", "",
                  f"*Figure: per step, the largest relative difference from {ref} (‖ours − {ref}‖ / ‖{ref}‖ "
                  f"over all tensors of a quantity) of our step as shipped (solid) and of the float-noise "
                  f"reference, one ulp up or down in every starting weight, the larger (dotted), by quantity; exact "
                  f"mode is 0 everywhere (the black line). Rerun: `{check.get('command', 'python run_all.py identity')}`; "
                  f"{check.get('threads', 1)} thread, torch {check.get('torch_version')}.*", ""]
    lines += ["### Same inputs? The data side", "", *data_rows(runs), "",
              *markdown(pd.DataFrame(DATA_EVIDENCE, columns=["evidence", "what it shows", "recheck"]))]
    return lines + [""], figures
