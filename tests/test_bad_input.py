"""Bad input, command by command: a user's file that is truncated, malformed, of the wrong kind or with a field of the
wrong type is one `error: <file>[:<line>]: ...` line on stderr, exit 2, no traceback, and outputs already there stay
byte for byte as they were (the command is given --overwrite where it has one, so that only the bad input stops it).

CASES holds, per command, the likely mistakes with its main input that other tests do not already cover (what they
cover is listed below it). A command that checks fails before it loads a model: a checkpoint's kind is read from its
head.pth (a reward model's holds the scalar head).
"""

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import ROOT, TOK512, run_cli

ABALONE = os.path.join(ROOT, "configs/tabular/abalone.yaml")
GOOD_RESPONSES = [{"id": "a", "instruction": "Hi", "output": "Hello there, friend."},
                  {"id": "b", "instruction": "Yo", "output": "Hey, how are you?"}]
KEEP = "an earlier run's output: keep me\n"
KEEP_METRICS = '{"step": 1, "loss": 0.69}\n'  # an earlier training run's (trainers read it back)

# Bad-input cases tested elsewhere (CASES adds, for these commands, the ones they lack: the output kept, the line
# number, an empty file, a field of the wrong type, a checkpoint of the wrong kind):
#   llama_mp.convert           test_cli (truncated llama2c .bin), test_convert_real (truncated/unknown GGUF, config.json
#                              without a key, an existing checkpoint kept)
#   llama_mp.generate          test_cli (missing shard, malformed/wrong-typed params.json, tokenizer missing or of
#                              another vocabulary)
#   llama_mp.score             test_tokenizer (tokenizer.json of an unsupported kind)
#   llama_mp.embedded          takes no user file
#   step0 evaluate             test_med (data-set YAML naming a column the CSV lacks)
#   step0 leave_one_out        test_med (config keys)
#   step0 convert_raw_to_csv   test_synfed (raw sample without status/result)
#   step0 sft_federated        test_synfed (CSV that is not a row of the data set)
#   step0 syn_addprompt        test_synfed (config with an unknown key)
#   step0 syn_addscore         test_synfed (missing contrast file, contrast row without the target)
#   step1 synthetic_preference test_step1 (response files that do not pair up, malformed JSONL, output kept)
#   step1 aggregate            test_step1 (principle without negative_definition)
#   step1 generate_responses   test_step1 (prompt record without instruction)
#   step1 judge_agreement      test_judge_agreement (missing pairs file)
#   step2 train_reward_model   test_reward_model (preference / output / principle name of a pair)
#   step3 train_dpo            test_dpo (empty chosen response)


def write(path, text: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


def jsonl(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def snapshot(directory) -> dict:
    """Every file under `directory`, path -> bytes."""
    files = {}
    for base, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, directory)] = f.read()
    return files


@pytest.fixture(scope="module")
def reward_dir(stories_dir, tmp_path_factory):
    """A reward model as step 2 leaves it: the backbone checkpoint plus head.pth with the scalar head."""
    out = str(tmp_path_factory.mktemp("rm") / "rm")
    shutil.copytree(stories_dir, out)
    dim = json.load(open(os.path.join(out, "params.json")))["dim"]
    torch.save({"head.weight": torch.zeros(1, dim), "head.bias": torch.zeros(1)}, os.path.join(out, "head.pth"))
    return out


# ---- the cases: each writes its files under tmp (inputs in tmp/in, existing outputs in tmp/out) and returns
#      (argv, the file the error must name, its line number or None) ------------------------------------------------
def generate_empty_prompts(tmp, ckpt, rm):
    prompts = write(tmp / "in/prompts.jsonl", "\n")
    write(tmp / "out/gen.jsonl", KEEP)
    return (["-m", "llama_mp.generate", "--ckpt_dir", ckpt, "--tokenizer_path", TOK512, "--prompts_file", prompts,
             "--output_file", str(tmp / "out/gen.jsonl"), "--overwrite"], prompts, None)


def generate_record_without_prompt(tmp, ckpt, rm):
    prompts = write(tmp / "in/prompts.jsonl", '{"prompt": "Once upon a time"}\n\n{"text": "Tom"}\n')
    write(tmp / "out/gen.jsonl", KEEP)
    return (["-m", "llama_mp.generate", "--ckpt_dir", ckpt, "--tokenizer_path", TOK512, "--prompts_file", prompts,
             "--output_file", str(tmp / "out/gen.jsonl"), "--overwrite"], prompts, 3)


def generate_reward_model_as_policy(tmp, ckpt, rm):
    prompts = write(tmp / "in/prompts.jsonl", '{"prompt": "Once upon a time"}\n')
    write(tmp / "out/gen.jsonl", KEEP)
    return (["-m", "llama_mp.generate", "--ckpt_dir", rm, "--tokenizer_path", TOK512, "--prompts_file", prompts,
             "--output_file", str(tmp / "out/gen.jsonl"), "--overwrite"], rm, None)


def raw_to_csv_truncated_jsonl(tmp, ckpt, rm):
    raw = write(tmp / "in/abalone.raw.jsonl", jsonl([{"syn_id": "a", "status": "INVALID_ANSWER", "result": {}}])
                + '{"syn_id": "b", "status": "SUCC')  # cut mid-line
    write(tmp / "out/abalone.syn.csv", KEEP)
    return (["-m", "step0_coldstart.convert_raw_to_csv", "--dataset", ABALONE, "--raw_file", raw, "--output_file",
             str(tmp / "out/abalone.syn.csv"), "--overwrite"], raw, 2)


def score_to_prefer_wrong_type(tmp, ckpt, rm):
    sample = {"syn_pmt_id": "p", "prompt": "Write a row", "answer": "{}", "status": "SUCCESS", "status_score": 5}
    scores = write(tmp / "in/abalone.score.jsonl", jsonl([{**sample, "gain_score": 0.5},
                                                          {**sample, "gain_score": "n/a"}]))
    write(tmp / "out/abalone.pref.jsonl", KEEP)
    return (["-m", "step0_coldstart.convert_score_to_prefer", "--score_file", scores, "--output_file",
             str(tmp / "out/abalone.pref.jsonl"), "--overwrite"], scores, 2)


def rounds_config_wrong_type(tmp, ckpt, rm):
    config = write(tmp / "in/rounds.yaml", "datasets: configs/tabular/adult.yaml\n")  # one data set, not a list
    write(tmp / "out/report.json", KEEP)
    return (["-m", "step0_coldstart.rounds", "--config", config, "--workdir", str(tmp / "out"), "--ckpt_dir", ckpt],
            config, None)


def sft_generator_column_the_csv_lacks(tmp, ckpt, rm):
    csv = write(tmp / "in/t.csv", "x,y\n0.5,a\n1.5,b\n")
    dataset = write(tmp / "in/t.yaml", f"name: t\ncsv: {csv}\ntarget: y\ntask: classification\n"
                                       "columns: {x: float, z: float, y: category}\n")
    for name in ("sft_train.jsonl", "abalone_prompts.jsonl", "lengths.json"):
        write(tmp / "out" / name, KEEP)
    return (["-m", "step0_coldstart.sft_generator", "--datasets", dataset, "--heldout", ABALONE, "--tokenizer_path",
             TOK512, "--output_dir", str(tmp / "out"), "--splits_dir", str(tmp / "splits"), "--overwrite"], csv, None)


def syn_addprompt_empty_prompts(tmp, ckpt, rm):
    prompts = write(tmp / "in/abalone_prompts.jsonl", "")
    anchors = write(tmp / "in/abalone_anchors.csv", "Sex,Length,Diameter,Height,Whole.weight,Shucked.weight,"
                    "Viscera.weight,Shell.weight,Rings\nM,0.4,0.3,0.1,0.5,0.2,0.1,0.1,9\n")
    write(tmp / "out/abalone.raw.jsonl", KEEP)
    return (["-m", "step0_coldstart.syn_addprompt", "--dataset", ABALONE, "--ckpt_dir", ckpt, "--tokenizer_path",
             TOK512, "--prompt_file", prompts, "--anchor_file", anchors, "--output_dir", str(tmp / "out"),
             "--splits_dir", str(tmp / "splits"), "--overwrite"], prompts, None)


def synscore_anchors_dataset_wrong_type(tmp, ckpt, rm):
    body = open(ABALONE).read().replace("csv: data/tabular/abalone.csv",
                                        f"csv: {ROOT}/data/tabular/abalone.csv\nsplit: {{val: 10%, test: 20%}}")
    dataset = write(tmp / "in/abalone.yaml", body)
    write(tmp / "out/abalone_anchors.csv", KEEP)
    return (["-m", "step0_coldstart.synscore_anchors", "--dataset", dataset, "--output_dir", str(tmp / "out"),
             "--splits_dir", str(tmp / "splits"), "--overwrite"], dataset, None)


def synscore_anchors_config_wrong_type(tmp, ckpt, rm):
    config = write(tmp / "in/anchors.yaml", "num_clusters: thirty-two\nseed: 0\n")
    write(tmp / "out/abalone_anchors.csv", KEEP)
    return (["-m", "step0_coldstart.synscore_anchors", "--dataset", ABALONE, "--config", config, "--output_dir",
             str(tmp / "out"), "--splits_dir", str(tmp / "splits"), "--overwrite"], config, None)


def train_sft_record_without_response(tmp, ckpt, rm):
    train = write(tmp / "in/sft_train.jsonl", jsonl([{"prompt": "Once upon a time", "response": " there was a cat."},
                                                     {"prompt": "Tom", "answer": " ran."}]))
    write(tmp / "out/metrics.jsonl", KEEP_METRICS)
    return (["-m", "step0_coldstart.train_sft", "--ckpt_dir", ckpt, "--tokenizer_path", TOK512, "--train_file", train,
             "--output_dir", str(tmp / "out"), "--max_seq_len", "512"], train, 2)


def train_sft_reward_model_as_policy(tmp, ckpt, rm):
    train = write(tmp / "in/sft_train.jsonl", jsonl([{"prompt": "Once upon a time", "response": " there was a cat."}]))
    write(tmp / "out/metrics.jsonl", KEEP_METRICS)
    return (["-m", "step0_coldstart.train_sft", "--ckpt_dir", rm, "--tokenizer_path", TOK512, "--train_file", train,
             "--output_dir", str(tmp / "out"), "--max_seq_len", "512"], rm, None)


def responses(tmp):
    return [write(tmp / f"in/r{i}.jsonl", jsonl(GOOD_RESPONSES)) for i in (0, 1)]


def aggregate_truncated_preferences(tmp, ckpt, rm):
    r0, r1 = responses(tmp)
    judgment = {"id": "a", "example_idx": 0, "principle_index": 0, "dimension": "Concise",
                "relative_score": [1.0, 2.0], "prompt_preference": 1}
    preferences = write(tmp / "in/preference.jsonl", jsonl([judgment]) + '{"id": "b", "dimension": "Conc')
    write(tmp / "out/agg.json", KEEP)
    write(tmp / "out/agg_pairs.jsonl", KEEP)
    return (["-m", "step1_synthetic_preference.aggregate_synthetic_preference", "--response_files", r0, r1,
             "--preference_file", preferences, "--output_file", str(tmp / "out/agg.json"), "--overwrite"],
            preferences, 2)


def clean_oasst1_wrong_type(tmp, ckpt, rm):
    message = {"message_id": "m1", "parent_id": None, "text": "What is a monopsony?", "role": "prompter",
               "message_tree_id": "m1"}
    messages = write(tmp / "in/messages.jsonl", jsonl([message, {**message, "message_id": "m2", "text": None}]))
    write(tmp / "out/prompts.json", KEEP)
    return (["-m", "step1_synthetic_preference.clean_oasst1_prompts", "--messages_file", messages, "--output_file",
             str(tmp / "out/prompts.json"), "--overwrite"], messages, 2)


def generate_responses_empty_prompts(tmp, ckpt, rm):
    prompts = write(tmp / "in/prompts.jsonl", "")
    write(tmp / "out/responses.jsonl", KEEP)
    return (["-m", "step1_synthetic_preference.generate_responses", "--ckpt_dir", ckpt, "--tokenizer_path", TOK512,
             "--prompt_file", prompts, "--output_file", str(tmp / "out/responses.jsonl"), "--overwrite"], prompts, None)


def judge_agreement_wrong_type(tmp, ckpt, rm):
    prompt = {"message_id": "p", "parent_id": None, "text": "Hi?", "role": "prompter", "rank": None}
    best = {"message_id": "a1", "parent_id": "p", "text": "Hello!", "role": "assistant", "rank": 0}
    pairs = write(tmp / "in/messages.jsonl", jsonl([prompt, best, {**best, "message_id": "a2", "rank": "second"}]))
    write(tmp / "out/agreement.json", KEEP)
    return (["-m", "step1_synthetic_preference.judge_agreement", "--ckpt_dir", ckpt, "--tokenizer_path", TOK512,
             "--pairs_file", pairs, "--output_file", str(tmp / "out/agreement.json"), "--overwrite"], pairs, 3)


def synthetic_preference_principle_without_field(tmp, ckpt, rm):
    r0, r1 = responses(tmp)
    principles = write(tmp / "in/principles.json", json.dumps([{"dimension": "Concise", "definition": "Be brief."},
                                                               {"dimension": "Ethical"}]))
    write(tmp / "out/preference.jsonl", KEEP)
    return (["-m", "step1_synthetic_preference.synthetic_preference", "--ckpt_dir", ckpt, "--tokenizer_path", TOK512,
             "--response_files", r0, r1, "--principle_file", principles, "--output_file",
             str(tmp / "out/preference.jsonl"), "--min_response_chars", "4", "--overwrite"], principles, None)


def rm_score_principle_without_field(tmp, ckpt, rm):
    principles = write(tmp / "in/principles.json", json.dumps([{"dimension": "Concise", "text": "Be brief."}]))
    return (["-m", "step2_reward_model.score", "--ckpt_dir", rm, "--tokenizer_path", TOK512, "--instruction", "Hi",
             "--response", "Hello", "--principle_file", principles], principles, None)


def rm_score_policy_as_reward_model(tmp, ckpt, rm):
    return (["-m", "step2_reward_model.score", "--ckpt_dir", ckpt, "--tokenizer_path", TOK512, "--instruction", "Hi",
             "--response", "Hello", "--principle", "Be brief."], ckpt, None)


def dpo_reward_model_as_policy(tmp, ckpt, rm):
    pairs = write(tmp / "in/pairs.jsonl", jsonl([{"prompt": "Hi", "chosen": "Hello there.", "rejected": "Go."}]))
    write(tmp / "out/metrics.jsonl", KEEP_METRICS)
    return (["-m", "step3_rl.train_dpo", "--ckpt_dir", rm, "--tokenizer_path", TOK512, "--train_file", pairs,
             "--output_dir", str(tmp / "out"), "--prompt_format", "plain", "--max_seq_len", "512",
             "--micro_batch_size", "1", "--epochs", "0"], rm, None)  # (accepted: it only saves checkpoint-0)


# no PPO step: a command that accepts the checkpoints loads every model, saves checkpoint-0 and exits 0
PPO_TINY = ["--ppo_steps", "0", "--rollout_batch_size", "1", "--ppo_minibatch_size", "1", "--micro_batch_size", "1",
            "--max_seq_len", "512", "--rm_max_seq_len", "1536"]


def ppo_files(tmp):
    prompts = write(tmp / "in/prompts.jsonl", jsonl([{"instruction": "Tell me a story."}]))
    write(tmp / "out/config.json", KEEP)
    write(tmp / "out/metrics.jsonl", KEEP_METRICS)
    return prompts


def ppo_prompt_without_instruction(tmp, ckpt, rm):
    ppo_files(tmp)
    prompts = write(tmp / "in/prompts.jsonl", jsonl([{"instruction": "Tell me a story."}, {"prompt": "Once upon"}]))
    return (["-m", "step3_rl.train_ppo", "--policy_ckpt", ckpt, "--reward_ckpt", rm, "--tokenizer_path", TOK512,
             "--prompt_file", prompts, "--output_dir", str(tmp / "out"), *PPO_TINY], prompts, 2)


def ppo_policy_as_reward_model(tmp, ckpt, rm):
    prompts = ppo_files(tmp)
    return (["-m", "step3_rl.train_ppo", "--policy_ckpt", ckpt, "--reward_ckpt", ckpt, "--tokenizer_path", TOK512,
             "--prompt_file", prompts, "--output_dir", str(tmp / "out"), *PPO_TINY], ckpt, None)


def ppo_reward_model_as_policy(tmp, ckpt, rm):
    prompts = ppo_files(tmp)
    return (["-m", "step3_rl.train_ppo", "--policy_ckpt", rm, "--reward_ckpt", rm, "--tokenizer_path", TOK512,
             "--prompt_file", prompts, "--output_dir", str(tmp / "out"), *PPO_TINY], rm, None)


def ppo_reward_dir_without_checkpoint(tmp, ckpt, rm):
    prompts = ppo_files(tmp)
    empty = str(tmp / "rm_not_trained")  # a reward-model training directory with no checkpoint (and no latest) yet
    os.makedirs(empty)
    return (["-m", "step3_rl.train_ppo", "--policy_ckpt", ckpt, "--reward_ckpt", empty, "--tokenizer_path", TOK512,
             "--prompt_file", prompts, "--output_dir", str(tmp / "out"), *PPO_TINY], empty, None)


def evaluate_policy_truncated_messages(tmp, ckpt, rm):
    prompt = {"message_id": "p", "parent_id": None, "text": "Tell me a story.", "role": "prompter", "rank": None}
    messages = write(tmp / "in/messages.jsonl", jsonl([prompt]) + '{"message_id": "q", "parent_id": nu')
    write(tmp / "out/policy_eval.json", KEEP)
    write(tmp / "out/policy_eval.samples.jsonl", KEEP)
    return (["-m", "step3_rl.evaluate_policy", "--initial_ckpt", ckpt, "--policy", f"same={ckpt}", "--reward_ckpt", rm,
             "--tokenizer_path", TOK512, "--messages_file", messages, "--output_file",
             str(tmp / "out/policy_eval.json"), "--overwrite"], messages, 2)



# command -> the bad input that most likely reaches it
CASES = [
    pytest.param(generate_empty_prompts, id="generate-empty-prompts-file"),
    pytest.param(generate_record_without_prompt, id="generate-prompt-field-missing-after-a-blank-line"),
    pytest.param(generate_reward_model_as_policy, id="generate-reward-model-as-policy"),
    pytest.param(raw_to_csv_truncated_jsonl, id="convert_raw_to_csv-truncated-jsonl"),
    pytest.param(score_to_prefer_wrong_type, id="convert_score_to_prefer-gain_score-wrong-type"),
    pytest.param(rounds_config_wrong_type, id="rounds-config-datasets-wrong-type"),
    pytest.param(sft_generator_column_the_csv_lacks, id="sft_generator-dataset-column-the-csv-lacks"),
    pytest.param(syn_addprompt_empty_prompts, id="syn_addprompt-empty-prompts-file"),
    pytest.param(synscore_anchors_dataset_wrong_type, id="synscore_anchors-dataset-split-wrong-type"),
    pytest.param(synscore_anchors_config_wrong_type, id="synscore_anchors-config-num_clusters-wrong-type"),
    pytest.param(train_sft_record_without_response, id="train_sft-response-field-missing"),
    pytest.param(train_sft_reward_model_as_policy, id="train_sft-reward-model-as-policy"),
    pytest.param(aggregate_truncated_preferences, id="aggregate-truncated-preference-jsonl"),
    pytest.param(clean_oasst1_wrong_type, id="clean_oasst1_prompts-text-wrong-type"),
    pytest.param(generate_responses_empty_prompts, id="generate_responses-empty-prompts-file"),
    pytest.param(judge_agreement_wrong_type, id="judge_agreement-rank-wrong-type"),
    pytest.param(synthetic_preference_principle_without_field, id="synthetic_preference-principle-without-definition"),
    pytest.param(rm_score_principle_without_field, id="rm_score-principle-without-definition"),
    pytest.param(rm_score_policy_as_reward_model, id="rm_score-policy-as-reward-model"),
    pytest.param(dpo_reward_model_as_policy, id="train_dpo-reward-model-as-policy"),
    pytest.param(ppo_prompt_without_instruction, id="train_ppo-instruction-field-missing"),
    pytest.param(ppo_policy_as_reward_model, id="train_ppo-policy-as-reward-model"),
    pytest.param(ppo_reward_model_as_policy, id="train_ppo-reward-model-as-policy"),
    pytest.param(ppo_reward_dir_without_checkpoint, id="train_ppo-reward-training-directory-without-checkpoint"),
    pytest.param(evaluate_policy_truncated_messages, id="evaluate_policy-truncated-messages-jsonl"),
]


TEST = "test_bad_input_is_one_line_naming_the_file_and_touches_no_output"
WORKERS = 2  # the cases run two at a time (each is mostly a Python start and a torch import)


@pytest.fixture(scope="module")
def runs(request, stories_dir, reward_dir, tmp_path_factory):
    """Every selected case run as a subprocess: {case: future of (result, file, line, outputs before, after)}."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if getattr(item, "originalname", "") == TEST and hasattr(item, "callspec")]

    def run(case):
        tmp = tmp_path_factory.mktemp(case.__name__)
        argv, named, line = case(tmp, stories_dir, reward_dir)
        os.makedirs(tmp / "out", exist_ok=True)
        before = snapshot(tmp / "out")
        result = run_cli(*argv, timeout=300)
        return result, named, line, before, snapshot(tmp / "out")

    slow_first = sorted(selected, key=lambda case: not case.__name__.startswith(("ppo", "dpo")))  # they load models
    with ThreadPoolExecutor(WORKERS) as pool:
        return {case: pool.submit(run, case) for case in slow_first}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_naming_the_file_and_touches_no_output(case, runs):
    result, named, line, before, after = runs[case].result()
    lines = result.stderr.splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    where = f"{named}:{line}:" if line else f"{named}"
    assert where in lines[0], (where, lines[0])
    assert after == before, "an existing output was changed"
