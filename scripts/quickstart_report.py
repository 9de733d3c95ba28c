"""The quickstart's report for a person: report.md with named figures per stage, a one-line verdict each, and PNG
pictures (judge agreement, reward-model accuracy beside its baselines, DPO and PPO curves, held-out policy figures,
ML efficiency per generator). scripts/quickstart.py calls write_report(run_dir, report) at the end of a run; run it
alone to redraw a finished run's report: python scripts/quickstart_report.py RUN_DIR.
"""

import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from llama_mp.jsonl import read_jsonl, write_json_atomic, write_text_atomic  # noqa: E402

RM_ACCURACY_TARGET = 0.65  # held-out synthetic pairs (the main-job issue's target)
GOAL_RATIO = 0.9  # ML efficiency of a generator, as a share of real rows'
STAGE_ORDER = ["llama_mp", "salmon_responses", "salmon_judge", "reward_model", "dpo", "ppo", "policy_eval", "tabular"]


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def binomial_se(share, n):
    """The standard error of a share measured on n independent items: sqrt(p (1 - p) / n)."""
    return math.sqrt(share * (1 - share) / n) if share is not None and n else None


def figures_of(report: dict, stage: str) -> dict:
    return report["stages"].get(stage, {}).get("figures", {})


def metrics(run_dir: str, sub: str) -> list[dict]:
    path = os.path.join(run_dir, sub, "metrics.jsonl")
    return read_jsonl(path) if os.path.exists(path) else []


# ---- verdicts: one line per stage ------------------------------------------------------------------------------------
def verdict_judge(f: dict) -> str:
    j = f.get("judge_agreement")
    pairs = f"{f.get('judged_pairs', 0)} judgments of {f.get('reward_model_pairs', 0)} reward-model pairs kept"
    if not j or j.get("agreement") is None:
        return pairs
    a, b, length = j["agreement"], j["both_orders_agree"], j["length_baseline"]
    quality = ("no better than chance" if a <= 0.5 else "better than chance but below 'the longer answer wins'"
               if a < length else "at or above 'the longer answer wins'")
    return (f"judge agrees with OASST1 humans on {fmt(a, 2)} of {j['judged']} judgments ({quality}; the longer answer "
            f"wins on {fmt(length, 2)}); "
            f"both orders agree on {fmt(b, 2)}; {pairs}")


def verdict_rm(f: dict, judge: dict) -> str:
    e = f.get("eval", {})
    acc = e.get("heldout_accuracy")
    if acc is None:
        return "no held-out pairs"
    met = "meets" if acc >= RM_ACCURACY_TARGET else "misses"
    se = binomial_se(acc, e.get("heldout_pairs"))
    line = (f"held-out synthetic accuracy {fmt(acc, 2)} +- {fmt(se, 2)} on {e.get('heldout_pairs')} pairs "
            f"({met} {RM_ACCURACY_TARGET})")
    if e.get("human_accuracy") is not None:
        line += f"; OASST1 humans {fmt(e['human_accuracy'], 2)}"
        if judge:
            line += f" (judge {fmt(judge.get('agreement'), 2)}, length {fmt(judge.get('length_baseline'), 2)})"
    if e.get("heldout_flip_rate") is not None:
        line += f"; flips under negated principles {fmt(e['heldout_flip_rate'], 2)}"
    if f.get("pmp", {}).get("human_accuracy") is not None:
        line += f"; after PMP on {f['pmp']['pairs']} human pairs alone: humans {fmt(f['pmp']['human_accuracy'], 2)}"
    return line


def verdict_curve(f: dict, key: str, label: str) -> str:
    first, last = f.get("first", {}).get(key), f.get("last", {}).get(key)
    if first is None or last is None:
        return f"{f.get('steps', 0)} steps"
    return f"{label} {fmt(first)} -> {fmt(last)} over {f.get('steps')} logged steps"


def verdict_policies(f: dict, kl_target) -> str:
    policies = f.get("policies")
    if not policies:
        return f.get("skipped", "not run")
    parts = []
    for name in ("dpo", "ppo"):
        p = policies.get(name)
        if not p:
            continue
        gain, se = p["reward_gain"], p.get("reward_gain_se")
        # a gain within two standard errors of zero is not told apart from the prompts' noise
        noise = "" if not se else (f" +- {fmt(se)} (" + ("above" if abs(gain) > 2 * se else "within")
                                   + " 2 standard errors of 0)")
        within = "" if kl_target is None or name != "ppo" else (
            f", within the KL target {kl_target}" if p["kl"] <= kl_target else f", above the KL target {kl_target}")
        parts.append(f"{name}: held-out reward {'+' if gain >= 0 else ''}{fmt(gain)}{noise} at KL {fmt(p['kl'], 2)}"
                     f"{within}, win rate {fmt(p.get('win_rate'), 2)}")
    return f"{f['prompts']} held-out prompts; " + "; ".join(parts)


def verdict_tabular(f: dict) -> str:
    out = []
    for dataset, gens in f.get("ml_efficiency", {}).items():
        ratio = {g: v.get("ratio") for g, v in gens.items()}
        last_dpo = sorted((g for g in gens if g.startswith("dpo")), key=lambda g: int(g[3:]) if g[3:].isdigit() else 0)
        line = f"{dataset}: ratio naive {fmt(ratio.get('naive'), 2)}, SFT {fmt(ratio.get('sft'), 2)}"
        if last_dpo:
            line += f", {last_dpo[-1]} {fmt(ratio.get(last_dpo[-1]), 2)}"
        best = max((r for g, r in ratio.items() if g not in ("naive", "real") and "@" not in g and r is not None),
                   default=None)
        # the generators' rows are fewer than the baselines': compare with naive at their own size where evaluate
        # wrote it (naive@N), else with naive
        same_size = next((g for g in gens if g.startswith("naive@")), None)
        if same_size and ratio.get(same_size) is not None:
            line += f" against {same_size} {fmt(ratio[same_size], 2)}"
        naive = ratio.get(same_size) if same_size else ratio.get("naive")
        if best is not None and naive is not None:
            line += " (above naive)" if best > naive else " (not above naive)"
        if best is not None:
            line += f"; goal {GOAL_RATIO} {'reached' if best >= GOAL_RATIO else 'not reached'}"
        out.append(line)
    return "; ".join(out) or "no evaluation"


def verdicts(report: dict, kl_target=None) -> dict:
    judge = figures_of(report, "salmon_judge").get("judge_agreement")
    f = {name: figures_of(report, name) for name in STAGE_ORDER}
    llama = f["llama_mp"]
    responses = f["salmon_responses"]
    return {
        "llama_mp": f"{llama.get('samples')} prompts, {llama.get('tokens')} tokens sampled"
                    + (f" in {llama['dtype']}" if llama.get("dtype") else ""),
        "salmon_responses": f"{responses.get('prompts')} prompts answered twice, mean {responses.get('mean_response_chars')} "
                            f"characters, {responses.get('skipped', 0)} skipped",
        "salmon_judge": verdict_judge(f["salmon_judge"]),
        "reward_model": verdict_rm(f["reward_model"], judge),
        "dpo": verdict_curve(f["dpo"], "rewards/margin", "reward margin"),
        "ppo": verdict_curve(f["ppo"], "reward/mean", "training reward"),
        "policy_eval": verdict_policies(f["policy_eval"], kl_target),
        "tabular": verdict_tabular(f["tabular"]),
    }


# ---- pictures ----------------------------------------------------------------------------------------------------
def pictures(run_dir: str, report: dict) -> list[tuple[str, str]]:
    """(title, path relative to run_dir) of each PNG drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.join(run_dir, "plots"), exist_ok=True)
    drawn = []

    def save(fig, name: str, title: str) -> None:
        path = os.path.join(run_dir, "plots", name)
        fig.tight_layout()
        fig.savefig(path + ".tmp.png", dpi=110)
        os.replace(path + ".tmp.png", path)
        plt.close(fig)
        drawn.append((title, os.path.join("plots", name)))

    judge_file = os.path.join(run_dir, "step1", "judge_agreement.json")
    if os.path.exists(judge_file):
        with open(judge_file) as fh:
            judge = json.load(fh)
        names = list(judge["principles"])
        fig, ax = plt.subplots(figsize=(9, 3.5))
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [judge["principles"][n]["agreement"] or 0 for n in names], 0.4,
               label="agreement with humans")
        ax.bar([x + 0.2 for x in xs], [judge["principles"][n]["both_orders_agree"] or 0 for n in names], 0.4,
               label="both orders agree")
        ax.axhline(0.5, color="gray", ls=":", label="chance")
        ax.axhline(judge["overall"]["length_baseline"] or 0, color="red", ls="--", label="longer answer wins")
        ax.set_xticks(list(xs), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"Self-judge on {judge['pairs']} OASST1 human pairs, per principle")
        ax.legend(fontsize=7, ncol=4, loc="upper center")
        save(fig, "judge.png", "The self-judge against human rankings")

    rm = figures_of(report, "reward_model").get("eval", {})
    pmp = figures_of(report, "reward_model").get("pmp", {})
    jf = figures_of(report, "salmon_judge").get("judge_agreement") or {}
    bars = [("RM:\nheld-out synthetic", rm.get("heldout_accuracy"), "C0"),
            ("RM:\nOASST1 humans", rm.get("human_accuracy"), "C0"),
            ("PMP alone:\nOASST1 humans", pmp.get("human_accuracy"), "C4"),
            ("judge:\nOASST1 humans", jf.get("agreement"), "C1"),
            ("longer wins:\nOASST1 humans", jf.get("length_baseline"), "C3"),
            ("RM: flips\nwhen negated", rm.get("heldout_flip_rate"), "C2")]
    bars = [bar for bar in bars if bar[1] is not None]
    if bars:
        fig, ax = plt.subplots(figsize=(8, 3.2))
        ax.bar([n for n, _, _ in bars], [v for _, v, _ in bars], color=[c for _, _, c in bars])
        ax.axhline(0.5, color="gray", ls=":")
        ax.axhline(RM_ACCURACY_TARGET, color="C0", ls="--", lw=0.8)
        ax.set_ylim(0, 1)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title("Reward-model accuracy beside its baselines (dashed: target 0.65)")
        save(fig, "reward_model.png", "Reward model beside the judge and the length baseline")

    for sub, keys, title in (("dpo", ["loss", "rewards/margin", "rewards/accuracy"], "DPO training curves"),
                             ("ppo", ["reward/mean", "kl", "response_length"], "PPO: reward and KL per step"),
                             ("rm", ["loss", "accuracy"], "Reward-model training curves")):
        curve = metrics(run_dir, sub)
        keys = [k for k in keys if any(r.get(k) is not None for r in curve)]
        if not curve or not keys:
            continue
        fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 2.8), squeeze=False)
        for ax, key in zip(axes[0], keys):
            points = [(r["step"], r[key]) for r in curve if r.get(key) is not None]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".")
            ax.set_title(f"{sub}: {key}", fontsize=9)
            ax.set_xlabel("step")
        save(fig, f"{sub}_curves.png", title)

    policies = figures_of(report, "policy_eval").get("policies")
    if policies:
        names = list(policies)
        fig, axes = plt.subplots(1, 3, figsize=(10, 2.8))
        for ax, key, label in zip(axes, ("reward_gain", "kl", "win_rate"),
                                  ("held-out reward gain (RM), +-2 standard errors", "KL to the initial policy",
                                   "self-judge win rate")):
            err = [2 * (policies[n].get("reward_gain_se") or 0) for n in names] if key == "reward_gain" else None
            ax.bar(names, [policies[n].get(key) or 0 for n in names], yerr=err, capsize=4,
                   color=["gray", "C0", "C1"][:len(names)])
            if key == "reward_gain":
                ax.axhline(0, color="gray", lw=0.8)
            ax.set_title(label, fontsize=9)
            if key == "win_rate":
                ax.axhline(0.5, color="gray", ls=":")
                ax.set_ylim(0, 1)
        save(fig, "policies.png", "DPO and PPO against the initial policy on held-out prompts")

    tabular = figures_of(report, "tabular").get("ml_efficiency")
    if tabular:
        fig, ax = plt.subplots(figsize=(7, 3))
        datasets = list(tabular)
        same_size = sorted({g for d in tabular.values() for g in d if "@" in g})  # naive@N, real@N
        gens = [g for g in ("naive", "sft", *sorted(g for d in tabular.values() for g in d if g.startswith("dpo")),
                            "real", *same_size) if any(g in tabular[d] for d in datasets)]
        gens = list(dict.fromkeys(gens))
        width = 0.8 / len(gens)
        for i, g in enumerate(gens):
            ax.bar([x + i * width for x in range(len(datasets))],
                   [(tabular[d].get(g) or {}).get("ratio") or 0 for d in datasets], width, label=g)
        ax.axhline(GOAL_RATIO, color="red", ls="--", lw=0.8, label=f"goal {GOAL_RATIO}")
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(datasets))], datasets)
        ax.set_ylabel("ML efficiency / real")
        ax.legend(fontsize=7)
        ax.set_title("Tabular generators: ML efficiency as a share of real rows'")
        save(fig, "tabular.png", "ML efficiency per generator")
    return drawn


# ---- the page ----------------------------------------------------------------------------------------------------
def table(header: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows])


def markdown(report: dict, drawn: list[tuple[str, str]], kl_target=None) -> str:
    from step0_coldstart.evaluate import table as tabular_table
    v = verdicts(report, kl_target)
    lines = ["# Quickstart report", "", f"Model `{report.get('model')}`, config `{report['config']}`, run directory "
             f"`{report['run_dir']}`: {report['total_seconds']} s of stage time, peak memory of any one process "
             f"{report['peak_rss_mib']} MiB.", "", "| stage | status | seconds | peak memory (MiB) | verdict |",
             "|---|---|---|---|---|"]
    for name in STAGE_ORDER:
        s = report["stages"].get(name, {"status": "not run"})
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', '')} | {s.get('peak_rss_mib', '')} | "
                     f"{v[name] if s['status'] == 'done' else ''} |")
    judge = figures_of(report, "salmon_judge")
    agreement_file = os.path.join(report["run_dir"], "step1", "judge_agreement.json")
    if os.path.exists(agreement_file):
        with open(agreement_file) as fh:
            j = json.load(fh)
        lines += ["", "## The self-judge before any training", "",
                  f"{j['pairs']} OASST1 validation prompts, the best-ranked answer against the worst ({j['against']}), "
                  "judged under every principle in both orders by the policy itself:", ""]
        keys = ["judged", "agreement", "both_orders_agree", "agreement_when_consistent", "length_baseline"]
        lines += table(["principle", *keys], [[n, *[f.get(k) for k in keys]] for n, f in
                                               [*j["principles"].items(), ("overall", j["overall"])]])
    if judge.get("judged_pairs") is not None:
        lines += ["", f"Step 1 judged {judge['judged_pairs']} (pair, principle) records and kept "
                      f"{judge['reward_model_pairs']} reward-model pairs and {judge['dpo_pairs']} DPO pairs."]
    rm, pmp = figures_of(report, "reward_model").get("eval"), figures_of(report, "reward_model").get("pmp")
    if rm:
        lines += ["", "## Reward model", ""]
        lines += table(["figure", "value", "on"], [
            ["held-out synthetic accuracy", rm.get("heldout_accuracy"),
             f"{rm.get('heldout_pairs')} pairs (standard error "
             f"{fmt(binomial_se(rm.get('heldout_accuracy'), rm.get('heldout_pairs')), 2)})"],
            ["held-out flip rate under negated principles", rm.get("heldout_flip_rate"),
             f"{rm.get('heldout_flip_pairs')} pairs"],
            ["OASST1 human-pair accuracy", rm.get("human_accuracy"), f"{rm.get('human_pairs')} pairs"],
            *([["the same after preference-model pre-training alone", pmp.get("human_accuracy"),
                f"{pmp.get('human_pairs')} pairs (pre-trained on {pmp['pairs']} human pairs of other prompts)"]]
              if pmp else []),
            ["the judge's agreement with humans", (judge.get("judge_agreement") or {}).get("agreement"),
             "judge-agreement pairs"],
            ["length baseline (longer wins)", (judge.get("judge_agreement") or {}).get("length_baseline"),
             "judge-agreement pairs"]])
    policies = figures_of(report, "policy_eval").get("policies")
    if policies:
        pe = figures_of(report, "policy_eval")
        keys = ["reward_mean", "reward_gain", "reward_gain_se", "kl", "length", "unfinished", "win_rate",
                "both_orders_agree"]
        lines += ["", "## DPO and PPO on held-out prompts", "",
                  f"{pe['prompts']} first user turns of OASST1's validation split (no step trains on them); rewards by "
                  "the step-2 reward model under RL-time principles, KL per sequence to the initial policy, win rate by "
                  "the initial policy as judge (both orders):", ""]
        lines += table(["policy", *keys], [[n, *[p.get(k) for k in keys]] for n, p in policies.items()])
    tabular = figures_of(report, "tabular").get("ml_efficiency")
    if tabular:
        lines += ["", "## Tabular generators (synthetic rows -> real test split)", "", tabular_table(tabular)]
        notes = figures_of(report, "tabular").get("notes")
        lines += [f"- {k}: {n}" for k, n in (notes or {}).items()]
    example = figures_of(report, "llama_mp").get("example")
    if example:
        lines += ["", "## A sample", "", "> " + example.replace("\n", " ")]
    if drawn:
        lines += ["", "## Pictures", ""]
        for title, path in drawn:
            lines += [f"### {title}", "", f"![{title}]({path})", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(run_dir: str, report: dict, kl_target=None) -> str:
    drawn = pictures(run_dir, report)
    report = {**report, "plots": [p for _, p in drawn], "verdicts": verdicts(report, kl_target)}
    write_json_atomic(os.path.join(run_dir, "report.json"), report)
    text = markdown(report, drawn, kl_target)
    write_text_atomic(os.path.join(run_dir, "report.md"), text)
    return text


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/quickstart_report.py RUN_DIR")
    with open(os.path.join(sys.argv[1], "report.json")) as fh:
        print(write_report(sys.argv[1], json.load(fh)))
