"""llama_mp/config.py, the one configuration mechanism: class defaults <- YAML file <- flags, by the field annotations,
strictly, unknown keys refused at every level; and the commands' config files still loading as they did."""

import argparse
import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

from conftest import ROOT
from llama_mp.config import (Arg, PositiveInt, add_config_flags, load_config, load_configs, parse_config,
                             require)


@dataclass
class Section:
    max_prompts: int = 48
    max_gen_len: int = 128
    judge: bool = True


@dataclass
class Options:
    steps: int = 10
    lr: float = 1e-5
    name: str = "run"
    fast: bool = False
    ckpt: Optional[str] = None
    parallel: Optional[int] = None
    datasets: list[str] = field(default_factory=lambda: ["a.yaml"])
    flags: list[Arg] = field(default_factory=list)
    overrides: dict[str, dict] = field(default_factory=dict)
    salmon: Section = field(default_factory=Section)


@dataclass
class Other:
    name: str = "other"  # shared with Options: one key, one flag, given to both
    beta: float = 0.1


def write(tmp_path, text: str, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def parse(argv: list[str], *classes):
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=None)
    return parse_config(parser, *(classes or (Options,)), argv=argv)


def test_defaults_then_yaml_then_flags(tmp_path):
    _, defaults = parse([])
    assert defaults == Options()
    assert defaults.salmon == Section(48, 128, True) and defaults.datasets == ["a.yaml"] and defaults.ckpt is None
    config = write(tmp_path, "steps: 20\nlr: 1e-3\nname: yaml\nfast: true\nckpt: some/dir\ndatasets: [b.yaml, c.yaml]\n"
                             "flags: [--lora_rank, 16, --lr, 2.0e-4]\nsalmon: {max_prompts: 8, judge: false}\n")
    _, from_file = parse(["--config", config])
    assert from_file.steps == 20 and from_file.lr == 0.001 and isinstance(from_file.lr, float)  # YAML's text 1e-3
    assert from_file.name == "yaml" and from_file.fast is True and from_file.ckpt == "some/dir"
    assert from_file.datasets == ["b.yaml", "c.yaml"]
    assert from_file.flags == ["--lora_rank", "16", "--lr", "0.0002"]  # arguments: numbers kept as texts
    assert from_file.salmon == Section(max_prompts=8, max_gen_len=128, judge=False)  # the section's other key: default
    _, both = parse(["--config", config, "--steps", "30", "--lr", "5e-4", "--fast", "false", "--datasets", "d.yaml",
                     "e.yaml", "f.yaml", "--salmon.max_gen_len", "64", "--ckpt", "null"])
    assert both.steps == 30 and both.lr == 5e-4 and both.fast is False and both.ckpt is None
    assert both.name == "yaml"  # no flag: the file's value stands
    assert both.datasets == ["d.yaml", "e.yaml", "f.yaml"]
    assert both.salmon == Section(max_prompts=8, max_gen_len=64, judge=False)  # merged key by key: file, then flag
    _, empty = parse(["--config", config, "--datasets"])
    assert empty.datasets == []  # a list flag with no value is the empty list


def test_optional_null_and_values(tmp_path):
    config = write(tmp_path, "ckpt: null\nparallel: 2\n")
    _, options = parse(["--config", config])
    assert options.ckpt is None and options.parallel == 2
    _, options = parse(["--config", config, "--parallel", "null"])
    assert options.parallel is None
    _, options = parse(["--parallel", "4", "--ckpt", "x"])
    assert options.parallel == 4 and options.ckpt == "x"


def test_dict_field_and_flag(tmp_path):
    config = write(tmp_path, "overrides:\n  med: {fed_clients: 4}\n")
    _, options = parse(["--config", config])
    assert options.overrides == {"med": {"fed_clients": 4}}
    _, options = parse(["--config", config, "--overrides", "{abalone: {scorer: llm}}"])
    assert options.overrides == {"abalone": {"scorer": "llm"}}  # a flag replaces the mapping


@pytest.mark.parametrize("body, message", [
    ("steps: 2.5\n", "steps must be int, got 2.5"),  # never truncated to 2
    ("steps: '3'\n", "steps must be int, got '3'"),
    ("steps: true\n", "steps must be int, got True"),
    ("lr: fast\n", "lr must be float, got 'fast'"),
    ("lr: false\n", "lr must be float, got False"),
    ("fast: 'yes'\n", "fast must be bool, got 'yes'"),
    ("fast: 1\n", "fast must be bool, got 1"),
    ("name: 3\n", "name must be str, got 3"),
    ("ckpt: [a]\n", "ckpt must be str or null, got ['a']"),
    ("steps: null\n", "steps must be int, got None"),
    ("datasets: a.yaml\n", "datasets must be a list of str, got 'a.yaml'"),
    ("datasets: [a.yaml, 3]\n", "datasets[1] must be str, got 3"),
    ("flags: [--x, true]\n", "flags[1] must be a text or a number, got True"),
    ("overrides: {med: 4}\n", "overrides.med must be a mapping, got 4"),
    ("salmon: 8\n", "salmon must be a mapping (section), got 8"),
    ("salmon: {max_prompts: 2.5}\n", "salmon.max_prompts must be int, got 2.5"),
    ("salmon: {judge: 'no'}\n", "salmon.judge must be bool, got 'no'"),
])
def test_a_wrong_type_names_the_file_key_type_and_value(tmp_path, body, message):
    config = write(tmp_path, body)
    with pytest.raises(ValueError) as err:
        parse(["--config", config])
    assert str(err.value) == f"{config}: {message}"


@pytest.mark.parametrize("argv, message", [
    (["--steps", "2.5"], "--steps must be int, got '2.5'"),
    (["--steps", "1e3"], "--steps must be int, got '1e3'"),
    (["--lr", "fast"], "--lr must be float, got 'fast'"),
    (["--fast", "yes"], "--fast must be bool, got 'yes'"),
    (["--fast", "1"], "--fast must be bool, got '1'"),
    (["--parallel", "two"], "--parallel must be int or null, got 'two'"),
    (["--salmon.max_prompts", "8.0"], "--salmon.max_prompts must be int, got '8.0'"),
    (["--salmon.judge", "maybe"], "--salmon.judge must be bool, got 'maybe'"),
])
def test_a_wrong_flag_value_names_the_flag(argv, message):
    with pytest.raises(ValueError) as err:
        parse(argv)
    assert str(err.value) == message


def test_bool_flags_take_true_and_false_only():
    assert parse(["--fast", "true"])[1].fast is True and parse(["--fast", "True"])[1].fast is True
    assert parse(["--fast", "false"])[1].fast is False
    assert parse(["--salmon.judge", "false"])[1].salmon.judge is False


@dataclass
class Choices:
    mode: Literal["auto", "none", "template"] = "auto"
    batch: PositiveInt = 4
    count: Optional[PositiveInt] = None
    stop: list[str] = field(default_factory=list)
    overwrite_like: bool = False


def test_a_bare_bool_flag_is_true_and_list_flags_accumulate():
    assert parse(["--overwrite_like"], Choices)[1].overwrite_like is True
    assert parse(["--overwrite_like", "false"], Choices)[1].overwrite_like is False
    assert parse(["--stop", "a", "--stop", "b", "c"], Choices)[1].stop == ["a", "b", "c"]


def test_literal_choices_and_positive_counts(tmp_path):
    assert parse(["--mode", "none", "--batch", "1", "--count", "null"], Choices)[1] == Choices(mode="none", batch=1)
    assert load_config(Choices, None, write(tmp_path, "mode: template\ncount: 3\n")) == Choices(mode="template", count=3)
    for argv, message in ((["--mode", "chat"], "--mode must be one of auto, none, template, got 'chat'"),
                          (["--batch", "0"], "--batch must be a positive int, got '0'"),
                          (["--count", "-2"], "--count must be a positive int or null, got '-2'")):
        with pytest.raises(ValueError) as err:
            parse(argv, Choices)
        assert str(err.value) == message
    for text, message in (("mode: 1\n", "mode must be one of auto, none, template, got 1"),
                          ("batch: 0\n", "batch must be a positive int, got 0"),
                          ("batch: 2.0\n", "batch must be a positive int, got 2.0"),
                          ("batch: true\n", "batch must be a positive int, got True")):
        path = write(tmp_path, text, "bad.yaml")
        with pytest.raises(ValueError) as err:
            load_config(Choices, None, path)
        assert str(err.value) == f"{path}: {message}"


def test_require_names_the_first_missing_option():
    require(Choices(mode="none"), "mode", "batch")
    with pytest.raises(ValueError) as err:
        require(Options(ckpt=None, datasets=[]), "name", "ckpt", "datasets")
    assert str(err.value) == "--ckpt is required (a flag, or a key of --config)"


def test_unknown_keys_are_refused_at_every_level(tmp_path):
    top = write(tmp_path, "steps: 3\nstepz: 4\n")
    with pytest.raises(ValueError) as err:
        parse(["--config", top])
    assert str(err.value) == f"{top}: unknown keys ['stepz'] (did you mean steps?)"
    nested = write(tmp_path, "salmon: {max_prompts: 8, max_promts: 9}\n", "nested.yaml")
    with pytest.raises(ValueError) as err:
        parse(["--config", nested])
    assert str(err.value) == f"{nested}: unknown keys ['salmon.max_promts'] (did you mean salmon.max_prompts?)"
    far = write(tmp_path, "zzz: 1\n", "far.yaml")
    with pytest.raises(ValueError) as err:
        load_config(Options, None, far)
    assert str(err.value) == f"{far}: unknown keys ['zzz']"
    with pytest.raises(SystemExit):  # an unknown flag is argparse's own error
        parse(["--salmon.nope", "1"])


def test_classes_sharing_one_file(tmp_path):
    config = write(tmp_path, "name: shared\nbeta: 0.5\nsteps: 4\n")
    _, options, other = parse(["--config", config, "--beta", "0.25"], Options, Other)
    assert options.name == other.name == "shared" and options.steps == 4 and other.beta == 0.25
    with pytest.raises(ValueError, match="unknown keys"):
        load_config(Other, None, config)  # alone, Other does not know steps
    assert load_configs((Options, Other), None, None) == (Options(), Other())


def test_flags_are_added_once_per_name_with_sections_dotted():
    parser = argparse.ArgumentParser()
    add_config_flags(parser, Options, Other)
    flags = {a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"}
    assert flags == {"--steps", "--lr", "--name", "--fast", "--ckpt", "--parallel", "--datasets", "--flags",
                     "--overrides", "--salmon.max_prompts", "--salmon.max_gen_len", "--salmon.judge", "--beta"}


COMMAND = """
import sys
from dataclasses import dataclass, field
sys.path.insert(0, {root!r})
from llama_mp import cli
from llama_mp.config import parse_config
import argparse

@dataclass
class Section:
    max_prompts: int = 48

@dataclass
class Options:
    steps: int = 10
    salmon: Section = field(default_factory=Section)

def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    args, options = parse_config(parser, Options)
    print(options.steps, options.salmon.max_prompts)

cli.run(main)
"""


@pytest.mark.parametrize("body, message", [
    ("steps: 3\nsteeps: 4\n", "unknown keys ['steeps'] (did you mean steps?)"),
    ("salmon: {max_prompt: 4}\n", "unknown keys ['salmon.max_prompt'] (did you mean salmon.max_prompts?)"),
    ("salmon: {max_prompts: 2.5}\n", "salmon.max_prompts must be int, got 2.5"),
])
def test_a_command_exits_2_with_one_line_naming_the_file(tmp_path, body, message):
    script = write(tmp_path, COMMAND.format(root=ROOT), "command.py")
    config = write(tmp_path, body)
    result = subprocess.run([sys.executable, script, "--config", config], capture_output=True, text=True, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0] == f"error: {config}: {message}"
    good = write(tmp_path, "salmon: {max_prompts: 4}\n", "good.yaml")
    result = subprocess.run([sys.executable, script, "--config", good, "--steps", "7"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout.split() == ["7", "4"], result.stderr


def test_the_round_driver_refuses_an_unknown_key_in_one_line(tmp_path):
    config = write(tmp_path, "sft_lr: 1e-3\nsft_lrr: 2\n")
    result = subprocess.run([sys.executable, "-m", "step0_coldstart.rounds", "--config", config, "--workdir",
                             str(tmp_path / "w")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines == [f"error: {config}: unknown keys ['sft_lrr'] (did you mean sft_lr?)"]


def test_the_commands_config_files_load_as_written():
    from step0_coldstart.leave_one_out import load_config as loo_config
    from step0_coldstart.rounds import RoundsConfig
    from step0_coldstart.syn_addprompt import SynConfig
    at = lambda p: os.path.join(ROOT, p)  # noqa: E731
    tiny = load_config(RoundsConfig, None, at("configs/synfed_tiny.yaml"))
    assert tiny.sft_lr == RoundsConfig().sft_lr == 2e-3  # the one SFT default, stated in RoundsConfig
    assert tiny.max_seq_len == 1024 and tiny.sft_epochs == 2.0 and tiny.num_clusters == 16
    assert tiny.syn_config == "configs/syn_addprompt_tiny.yaml" and tiny.scorer_ckpt is None
    smol = load_config(RoundsConfig, None, at("configs/synfed_smollm2.yaml"))
    assert smol.sft_lr == 2e-4 and smol.dpo_lr == 5e-5 and smol.sft_flags == ["--lora_rank", "16", "--lora_alpha", "32"]
    for test_config in ("tests/data/synfed_tiny_quickstart.yaml", "tests/data/synfed_smollm2_tiny.yaml"):
        assert load_config(RoundsConfig, None, at(test_config)).sft_lr == 1e-3  # the tests' budgets, as before
    assert load_config(SynConfig, None, at("configs/syn_addprompt.yaml")) == SynConfig(temperature=0.8, top_p=0.9,
                                                                                       max_value_tokens=16)
    assert load_config(SynConfig, None, at("configs/syn_addprompt_smollm2.yaml")) == SynConfig(
        temperature=0.5, top_p=0.9, guided=True, max_value_tokens=8)
    assert smol.syn_config == "configs/syn_addprompt_smollm2.yaml"
    assert (smol.num_examples, smol.heldout_examples, smol.heldout_prompts) == (3, 8, 32)
    assert tiny.heldout_examples is None and tiny.sample_batch_size == RoundsConfig().sample_batch_size == 8
    assert load_config(SynConfig, None, at("configs/syn_addprompt_tiny.yaml")) == SynConfig(guided=True,
                                                                                            max_value_tokens=8)
    assert load_config(SynConfig, None, at("tests/data/syn_addprompt_tiny.yaml")) == SynConfig(
        num_repeat=2, max_gen_len=48, seed=1, guided=True, max_value_tokens=6)
    loo, shared = loo_config(at("configs/synfed_loo.yaml"))
    assert loo.rounds == 1 and loo.never_sft == ["configs/tabular/med.yaml"] and len(loo.datasets) == 5
    assert loo.fold_overrides == {"med": {"fed_split_method": "site", "fed_clients": 4}}
    assert shared["sft_lr"] == 1e-5 and shared["dpo_lr"] == 1e-6 and "datasets" not in shared
    with open(at("scripts/r0_s1_gen_synsft.sh")) as f:
        assert "RoundsConfig.sft_lr" in f.read()  # the shell script reads the default instead of restating it


def quickstart_config_class():
    import importlib.util
    spec = importlib.util.spec_from_file_location("quickstart_for_test", os.path.join(ROOT, "scripts/quickstart.py"))
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.join(ROOT, "scripts"))  # as when run: its own directory first (quickstart_report)
    try:
        spec.loader.exec_module(module)  # its main() runs only as a script
    finally:
        sys.path.remove(os.path.join(ROOT, "scripts"))
    return module.QuickstartConfig


def test_every_shipped_config_loads_with_the_classes_of_its_command():
    """Each configs/*.yaml through the classes its command parses it with: every key known and of its type (a config
    that drifts from its command fails here, not in a user's run). A new config file must be listed."""
    from llama_mp.cli import Layout, ModelOptions
    from llama_mp.train import TrainConfig
    from step0_coldstart.leave_one_out import load_config as loo_config
    from step0_coldstart.rounds import RoundsConfig
    from step0_coldstart.syn_addprompt import SynConfig
    from step0_coldstart.synscore_anchors import AnchorsConfig
    from step1_synthetic_preference.generate_responses import ResponseOptions
    from step1_synthetic_preference.synthetic_preference import SyntheticPreferenceOptions
    from step2_reward_model.train_reward_model import RewardModelOptions
    from step3_rl.train_dpo import DPOOptions
    from step3_rl.train_ppo import PPOOptions
    quickstart = quickstart_config_class()
    commands = {
        "dpo_tiny.yaml": (Layout, TrainConfig, DPOOptions), "dpo_70b.yaml": (Layout, TrainConfig, DPOOptions),
        "ppo_tiny.yaml": (Layout, TrainConfig, PPOOptions), "ppo_70b.yaml": (Layout, TrainConfig, PPOOptions),
        "reward_model_tiny.yaml": (Layout, TrainConfig, RewardModelOptions),
        "reward_model_70b.yaml": (Layout, TrainConfig, RewardModelOptions),
        "quickstart.yaml": (quickstart,), "quickstart_stories260K.yaml": (quickstart,),
        "syn_addprompt.yaml": (ModelOptions, SynConfig), "syn_addprompt_tiny.yaml": (ModelOptions, SynConfig),
        "syn_addprompt_smollm2.yaml": (ModelOptions, SynConfig),
        "synfed_tiny.yaml": (RoundsConfig,), "synfed_smollm2.yaml": (RoundsConfig,), "synfed_loo.yaml": None,
        "synfed_loo_smollm2.yaml": None,
        "synscore_anchors.yaml": (AnchorsConfig,), "responses_tiny.yaml": (ResponseOptions,),
        "judge.yaml": (SyntheticPreferenceOptions,),
    }
    shipped = sorted(n for n in os.listdir(os.path.join(ROOT, "configs")) if n.endswith(".yaml"))
    assert shipped == sorted(commands)
    for name, classes in commands.items():
        path = os.path.join(ROOT, "configs", name)
        if classes is None:
            loo_config(path)
            continue
        loaded = load_configs(classes, None, path)
        with open(path) as f:
            given = yaml.safe_load(f) or {}
        assert given, f"{name} sets nothing"
        for key, value in given.items():  # the file's value arrived (a key two classes share: in both)
            holders = [c for c in loaded if hasattr(c, key)]
            assert holders, (name, key)
            for holder in holders:
                got = getattr(holder, key)
                if isinstance(got, float):  # YAML 1.1 reads 1e-3 as a text
                    assert got == float(value), (name, key)
                elif isinstance(got, list):  # an argument list: numbers kept as texts
                    assert [str(g) for g in got] == [str(v) for v in value], (name, key)
                elif not dataclasses.is_dataclass(got):  # a section: its own keys are checked by the loader
                    assert got == value, (name, key)
