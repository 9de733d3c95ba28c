"""The main job at a tiny size: killed (SIGKILL, whole process group) at several points and rerun, it ends with the same
outputs as an uninterrupted run; and its report holds every stage. The SmolLM2 chain through every stage runs in the
background beside the kill test (each on a core of its own)."""

import bisect
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT

CONFIG = os.path.join(ROOT, "tests/data/quickstart_tiny.yaml")


def quickstart(run_dir, counter=None, stop_at_rename=None, kill_after_rename=None, delay=0.0, stamps=None):
    """Run the quickstart. With `counter`, the run's atomic renames are counted in that file across runs. Kill its whole
    process group (SIGKILL) right after rename number stop_at_rename (the renaming process stops itself there), or
    `delay` seconds after the count reaches kill_after_rename (mid-command: a kill placed by the run's progress, not
    by the clock from its start, lands wherever the machine's speed changes between runs). stamps: a list that gets
    the seconds from the start at which each rename was seen. True if it was killed; a killed run leaves no process
    behind."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    if counter:
        env["LLAMA_MP_RENAME_COUNTER"] = counter
    if stop_at_rename:
        env["LLAMA_MP_STOP_AT_RENAME"] = str(stop_at_rename)
    with open(os.path.join(os.path.dirname(run_dir), os.path.basename(run_dir) + ".out"), "a") as out:
        start = time.perf_counter()
        with on_core(CORES[0]):
            process = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts/quickstart.py"), "--config",
                                        CONFIG, "--run_dir", run_dir], cwd=ROOT, env=env, stdout=out,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        reached = None  # when the count reached kill_after_rename
        while process.poll() is None:
            now, count = time.perf_counter(), renames(counter)
            if stamps is not None:
                stamps.extend([now - start] * (count - len(stamps)))
            if reached is None and kill_after_rename and count >= kill_after_rename:
                reached = now
            hung = now - start > 900
            if hung or (stop_at_rename and count >= stop_at_rename) or (reached is not None and now - reached >= delay):
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                assert not hung, f"the run took over 900 s: {open(out.name).read()[-3000:]}"
                assert no_process_uses(run_dir)
                return True
            time.sleep(0.02)
    if stamps is not None:  # renames in the last poll interval
        stamps.extend([time.perf_counter() - start] * (renames(counter) - len(stamps)))
    assert process.returncode == 0, open(out.name).read()[-3000:]
    return False


# The kill test's runs on the first core, the SmolLM2 chain beside them on the last one: the quickstart gives each
# command the cores it may use (one thread a process here), so the two never run more threads than there are cores,
# and every run of the kill test computes with the same thread count.
CORES = sorted(os.sched_getaffinity(0))


@contextlib.contextmanager
def on_core(core):
    """Processes started inside run on `core` alone: a child inherits the CPU affinity of the thread that starts it
    (no code between fork and exec, where this process's other threads may hold locks)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def renames(counter):
    return os.path.getsize(counter) if counter and os.path.exists(counter) else 0


def no_process_uses(run_dir, wait=10.0):
    """No live process names run_dir on its command line (workers of the killed run end with their launcher)."""
    deadline = time.time() + wait
    while True:
        left = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().decode(errors="replace")
                with open(f"/proc/{pid}/stat") as f:
                    zombie = f.read().split(")")[-1].split()[0] == "Z"
            except OSError:
                continue
            if run_dir in cmdline and not zombie:
                left.append(pid)
        if not left or time.time() > deadline:
            return not left
        time.sleep(0.1)


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def same_weights(a, b):
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def final_checkpoint(directory):
    with open(os.path.join(directory, "latest")) as f:
        return os.path.join(directory, f.read().strip())


SMOLLM2_TINY = os.path.join(ROOT, "tests/data/quickstart_smollm2_tiny.yaml")
SMOLLM2_TEST = "test_the_smollm2_chain_runs_end_to_end"


def start_smollm2_chain(tmp_path_factory):
    """The SmolLM2 chain's quickstart, started on the last core: (process, run_dir, its output file)."""
    run_dir = str(tmp_path_factory.mktemp("smollm2") / "smol")
    with on_core(CORES[-1]), open(run_dir + ".out", "w") as out:
        process = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts/quickstart.py"), "--config",
                                    SMOLLM2_TINY, "--run_dir", run_dir], cwd=ROOT,
                                   env={**os.environ, "PYTHONPATH": ROOT}, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    return process, run_dir, out.name


def end(process):
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="module", autouse=True)
def smollm2_chain(request, tmp_path_factory):
    """The SmolLM2 chain, started in the background before this module's first test when its test is selected, so
    that it runs beside the kill test instead of after it. Under pytest-xdist (where every worker sees every test) its
    test starts it itself."""
    selected = any(getattr(item, "originalname", item.name) == SMOLLM2_TEST for item in request.session.items)
    chain = start_smollm2_chain(tmp_path_factory) if selected and "PYTEST_XDIST_WORKER" not in os.environ else None
    yield chain
    if chain:  # its test failed early or was not reached
        end(chain[0])


def test_killed_quickstart_ends_like_an_uninterrupted_one(tmp_path):
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    stamps = []  # the uninterrupted run's renames, seconds from its start
    quickstart(whole, counter=str(tmp_path / "whole.renames"), stamps=stamps)
    # 10 kills spread over the whole run, each rerun itself killed again, at the points 8%, 16%, .. 80% of the
    # uninterrupted run's time, placed by its progress there (the renames it had made and the seconds since its last
    # one), not by the clock from a rerun's start, which misses where the machine's speed changes between runs:
    # alternately right after that last rename (an atomic rename of a final file or record) and mid-command
    # (sampling, training) those seconds after it. The count goes on across reruns, which redo some renames: a kill
    # whose rename the count has passed comes right after the next one.
    kills, counter = 0, str(tmp_path / "cut.renames")
    for i in range(1, 11):
        done = bisect.bisect_right(stamps, 0.08 * i * stamps[-1])
        # (at most 3% of the run: after a long wait a faster rerun would be far past that point)
        since = min(0.08 * i * stamps[-1] - (stamps[done - 1] if done else 0.0), 0.03 * stamps[-1])
        after = max(done, renames(counter) + 1)
        since = since if after == done else 0.0  # (a later rename than planned: right after it, wherever it is)
        if i % 2:
            kills += quickstart(cut, counter=counter, stop_at_rename=after)
        else:
            kills += quickstart(cut, counter=counter, kill_after_rename=after, delay=since)
    quickstart(cut)
    assert kills >= 10  # it really was interrupted, all over the run
    report = {name: json.load(open(os.path.join(d, "report.json"))) for name, d in (("whole", whole), ("cut", cut))}
    assert [s["status"] for s in report["whole"]["stages"].values()] == ["done"] * 8
    assert set(report["whole"]["stages"]) == set(report["cut"]["stages"])
    # every difference at once (figures with both values, files, weights, curves), so that a failure names the first
    # stage that diverged and not only the first one checked
    differences = []
    for name, stage in report["whole"]["stages"].items():
        figures = {k: v for k, v in stage["figures"].items() if k != "outputs"}
        other = {k: v for k, v in report["cut"]["stages"][name]["figures"].items() if k != "outputs"}
        if json.dumps(figures, sort_keys=True) != json.dumps(other, sort_keys=True):
            differences.append(f"{name} figures: whole {json.dumps(figures, sort_keys=True)[:600]} "
                               f"cut {json.dumps(other, sort_keys=True)[:600]}")
    # final files identical byte for byte, final weights bit for bit
    for rel in ("step1/oasst1_response0.jsonl", "step1/oasst1_response1.jsonl", "step1/oasst1_preference.jsonl",
                "step1/synthetic_preference.json", "step1/synthetic_preference_pairs.jsonl", "step1/pmp_pairs.json",
                "rm_pmp/eval.json", "rm/eval.json",
                "ppo/rollouts/step_1.jsonl", "ppo/rollouts/step_2.jsonl", "tabular/r1/abalone.raw.jsonl",
                "tabular/r1/abalone.score.jsonl", "tabular/report.json"):
        if open(os.path.join(whole, rel), "rb").read() != open(os.path.join(cut, rel), "rb").read():
            differences.append(f"file {rel}")
    for sub in ("rm_pmp", "rm", "dpo", "ppo", "tabular/sft", "tabular/dpo1"):
        a, b = final_checkpoint(os.path.join(whole, sub)), final_checkpoint(os.path.join(cut, sub))
        if not same_weights(os.path.join(a, "consolidated.00.pth"), os.path.join(b, "consolidated.00.pth")):
            # with both runs' first records: a first step that already differs was computed from the same inputs
            # in both runs (no kill carries state into it), so it points at the arithmetic, not at the resume
            first = [open(os.path.join(d, sub, "metrics.jsonl")).readline().strip() for d in (whole, cut)]
            differences.append(f"weights {sub}; first records: whole {first[0]} cut {first[1]}")
    for sub in ("rm_pmp", "rm", "dpo", "ppo"):  # curves read as if never stopped
        steps = [[json.loads(line)["step"] for line in open(os.path.join(d, sub, "metrics.jsonl"))] for d in (whole, cut)]
        if steps[0] != steps[1]:
            differences.append(f"curve steps {sub}: {steps}")
    assert not differences, "\n".join(differences)
    for sub in ("rm_pmp", "rm", "dpo", "ppo", "tabular/sft", "tabular/dpo1"):  # float32 reaches every trainer
        with open(os.path.join(whole, sub, "metrics.jsonl")) as f:
            assert {json.loads(line)["precision"] for line in f} == {"fp32"}, sub
    markdown = open(os.path.join(whole, "report.md")).read()
    assert "| reward_model | done |" in markdown and "ML efficiency" in markdown
    # the tabular round's files: guided rows parse, parsed rows carry one ds1 prompt per anchor and a gain
    tabular = os.path.join(whole, "tabular")
    raw = [json.loads(line) for line in open(os.path.join(tabular, "r1", "abalone.raw.jsonl"))]
    assert len(raw) == 2 * 2  # 2 held-out prompts x num_repeat 2
    parsed = [r for r in raw if r["status"] == "SUCCESS"]
    assert parsed and all(len(r["reward_ds1"]) == 4 for r in parsed)
    scored = [json.loads(line) for line in open(os.path.join(tabular, "r1", "abalone.score.jsonl"))]
    assert all((r["gain_score"] is None) == (r["status"] != "SUCCESS") for r in scored)
    with open(os.path.join(tabular, "r1", "abalone.syn.csv")) as f:
        assert sum(1 for _ in f) == 1 + len(parsed)
    fed = [json.loads(line) for line in open(os.path.join(tabular, "r1", "fed", "abalone_client_0.train.jsonl"))]
    assert len(fed) == sum(r["result"]["Rings"] is not None for r in parsed)
    generators = report["whole"]["stages"]["tabular"]["figures"]["ml_efficiency"]["abalone"]
    few = max(generators["sft"]["rows"], generators["dpo1"]["rows"])  # the baselines are added at that size too
    assert set(generators) == {"real", "naive", "sft", "dpo1", f"real@{few}", f"naive@{few}"}


def test_the_smollm2_chain_runs_end_to_end(smollm2_chain, tmp_path_factory):
    """The real model through the same stages at a tiny budget (so the real path cannot rot): ChatML responses, the
    judge's agreement with human pairs, judging in the template, a LoRA reward model, DPO and PPO, the tabular round."""
    process, run_dir, out = smollm2_chain or start_smollm2_chain(tmp_path_factory)
    try:
        process.wait(timeout=1500)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the SmolLM2 chain took over 1500 s: {open(out).read()[-3000:]}")
    finally:
        end(process)
    assert process.returncode == 0, open(out).read()[-6000:]
    report = json.load(open(os.path.join(run_dir, "report.json")))
    assert [s["status"] for s in report["stages"].values()] == ["done"] * 8
    responses = [json.loads(line) for line in open(os.path.join(run_dir, "step1", "oasst1_response0.jsonl"))]
    assert len(responses) == 4 and all(r["finish_reason"] in ("eos", "length", "prompt_too_long") for r in responses)
    judge = report["stages"]["salmon_judge"]["figures"]["judge_agreement"]
    assert 0.0 <= judge["agreement"] <= 1.0 and 0.0 <= judge["length_baseline"] <= 1.0
    for sub in ("rm_pmp", "rm", "dpo", "ppo"):  # LoRA runs: adapters pointing to their base, the tokenizer carried
        ckpt = final_checkpoint(os.path.join(run_dir, sub))
        assert os.path.isfile(os.path.join(ckpt, "adapter_config.json")), sub
        assert os.path.isfile(os.path.join(ckpt, "tokenizer.json")), sub
    # the reward model trained its synthetic pairs on top of the PMP run (SALMON's two stages), PPO read that chain
    rm_base = json.load(open(os.path.join(final_checkpoint(os.path.join(run_dir, "rm")), "adapter_config.json")))["base"]
    assert rm_base == final_checkpoint(os.path.join(run_dir, "rm_pmp"))
    assert report["stages"]["reward_model"]["figures"]["pmp"]["pairs"] == 2
    assert "abalone" in report["stages"]["tabular"]["figures"]["ml_efficiency"]
    lengths = json.load(open(os.path.join(run_dir, "tabular", "r0", "lengths.json")))  # heldout_examples 2, SFT 1
    assert (lengths["buddy"]["mean_examples"], lengths["abalone"]["mean_examples"]) == (1, 2)
    evaluation = report["stages"]["policy_eval"]["figures"]  # held-out prompts: the trained policies against the start
    assert evaluation["prompts"] == 2 and set(evaluation["policies"]) == {"initial", "dpo", "ppo"}
    assert evaluation["policies"]["initial"]["kl"] == 0.0 and evaluation["policies"]["initial"]["reward_gain"] == 0.0
    assert all(0.0 <= evaluation["policies"][p]["win_rate"] <= 1.0 for p in ("dpo", "ppo"))
    markdown = open(os.path.join(run_dir, "report.md")).read()
    for picture in report["plots"]:  # every picture drawn is embedded in the page
        assert os.path.isfile(os.path.join(run_dir, picture)) and f"]({picture})" in markdown
    assert {"plots/judge.png", "plots/policies.png", "plots/tabular.png"} <= set(report["plots"])


def test_a_pmp_set_up_whose_human_check_reads_pmps_prompts_fails_before_any_stage():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        from quickstart import QuickstartConfig, Salmon, check_pmp
    finally:
        sys.path.remove(os.path.join(ROOT, "scripts"))

    def check(**salmon):
        check_pmp(QuickstartConfig(salmon=Salmon(**salmon)), "q.yaml")

    check(pmp_pairs=64, judge_eval_pairs=40, pmp_skip_prompts=80)  # the shipped sizes
    check(pmp_pairs=0)  # no PMP
    check(pmp_pairs=64, rm_flags=["--human_eval_file", ""])  # no human check at all
    with pytest.raises(ValueError, match="q.yaml: salmon.pmp_pairs needs salmon.judge_eval_pairs > 0"):
        check(pmp_pairs=64, judge_eval_pairs=0)  # the trainer's default check reads every pair
    with pytest.raises(ValueError, match="q.yaml: PMP would train on 20 of the 40 prompts the human check reads"):
        check(pmp_pairs=64, judge_eval_pairs=40, pmp_skip_prompts=20)
    with pytest.raises(ValueError, match="PMP would train on"):  # a later flag wins: the check is back on
        check(pmp_pairs=64, judge_eval_pairs=40, pmp_skip_prompts=20, rm_flags=["--human_eval_file", ""],
              pmp_flags=["--human_eval_file", "x.jsonl"])


def test_tabular_verdict_compares_the_generators_with_naive_at_their_own_size():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        from quickstart_report import verdict_tabular
    finally:
        sys.path.remove(os.path.join(ROOT, "scripts"))
    gens = {"real": {"ratio": 0.87}, "naive": {"ratio": 0.6}, "sft": {"ratio": 0.1}, "dpo1": {"ratio": 0.2}}
    # 64 generated rows: above naive's 64 rows (0.05), below naive's 500 (0.6)
    line = verdict_tabular({"ml_efficiency": {"abalone": {**gens, "real@64": {"ratio": 0.58},
                                                          "naive@64": {"ratio": 0.05}}}})
    assert "against naive@64 0.05 (above naive)" in line and "goal 0.9 not reached" in line
    assert "(not above naive)" in verdict_tabular({"ml_efficiency": {"abalone": gens}})


def test_policy_and_reward_model_verdicts_carry_their_standard_errors():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        from quickstart_report import verdict_policies, verdict_rm
    finally:
        sys.path.remove(os.path.join(ROOT, "scripts"))
    policies = {"initial": {"reward_gain": 0.0, "reward_gain_se": 0.0, "kl": 0.0},
                "dpo": {"reward_gain": 0.05, "reward_gain_se": 0.02, "kl": 0.1, "win_rate": 0.6},   # 2.5 se
                "ppo": {"reward_gain": -0.03, "reward_gain_se": 0.02, "kl": 0.2, "win_rate": 0.4}}  # 1.5 se
    line = verdict_policies({"prompts": 40, "policies": policies}, kl_target=4.0)
    assert "dpo: held-out reward +0.050 +- 0.020 (above 2 standard errors of 0)" in line
    assert "ppo: held-out reward -0.030 +- 0.020 (within 2 standard errors of 0) at KL 0.20, within" in line
    # 14 of 23 right: sqrt(14/23 * 9/23 / 23) = 0.1018
    line = verdict_rm({"eval": {"heldout_accuracy": 14 / 23, "heldout_pairs": 23}}, {})
    assert line.startswith("held-out synthetic accuracy 0.61 +- 0.10 on 23 pairs (misses 0.65)")
