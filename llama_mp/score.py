"""Teacher-forced log-probabilities of texts.

  python -m llama_mp.score --ckpt_dir D --tokenizer_path T --text "Once upon a time" [--text ...]

Prints one JSON list with, per text: "text", "tokens" (without BOS), "token_logprobs" (the log-prob of each token after
BOS given everything before it) and "mean_nll" (minus their mean). A tokenizer that adds no BOS (SmolLM2) has the
text's first token as the context: it is then neither in "tokens" nor scored. Runs unchanged under python, torchrun
and srun.
"""

import argparse
import json
from dataclasses import dataclass, field

from llama_mp import cli
from llama_mp.config import parse_config, require


@dataclass
class ScoreOptions(cli.ModelOptions):
    text: list[str] = field(default_factory=list, metadata={"help": "a text to score (repeat the flag for several)"})
    seed: int = 1


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m llama_mp.score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML of the options below (every key is also a flag)")
    _, opts = parse_config(parser, ScoreOptions)
    require(opts, "text")
    _, sampler = cli.build(opts, opts.seed)
    encoded = [sampler.tokenizer.encode(t, bos=True, eos=False) for t in opts.text]
    for text, ids in zip(opts.text, encoded):
        if len(ids) < 2:
            raise ValueError(f"--text {text!r} encodes to no tokens to score after its context")
    contexts, token_lists = [ids[:1] for ids in encoded], [ids[1:] for ids in encoded]
    scores = sampler.score(contexts, token_lists)
    out = [{"text": t, "tokens": toks, "token_logprobs": lp, "mean_nll": -sum(lp) / len(lp)}
           for t, toks, lp in zip(opts.text, token_lists, scores)]
    cli.log(json.dumps(out))


if __name__ == "__main__":
    cli.run(main)
