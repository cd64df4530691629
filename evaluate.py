"""Score an embedding trained on the toy model: `python evaluate.py outputs/.../toy-concept.pt purple_star`.

A DreamArtist pair is recognised by its `-neg` file next to the given one. A pivotal-tuning run is scored with
its bundle as both the embedding and the LoRA, at a strength as A1111's `<lora:name:0.7>`:
`python evaluate.py RUN/toy-concept-lora.safetensors blue_ring --lora RUN/toy-concept-lora.safetensors
--lora-strength 0.7`. Prints recovery, classifier accuracy (and the oracle's), editability and the four denoising
losses as JSON; see lit_ti.toy.evaluation for the definitions.
"""

import argparse
import json
import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from lit_ti.errors import report_user_errors
from lit_ti.toy.evaluation import evaluate_file


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one `error:` line and exit 2, as every lit_ti entry point
        self.exit(2, f"error: {message}; see python evaluate.py --help\n")


def main(args: argparse.Namespace) -> None:
    scores = evaluate_file(
        args.embedding,
        args.concept,
        args.samples,
        args.init_text,
        args.cfg_scale,
        lora=args.lora,
        lora_strength=args.lora_strength,
        lora_max_timestep=args.lora_max_timestep,
        first_seed=args.first_seed,
    )
    print(json.dumps(scores, indent=1))


if __name__ == "__main__":
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("embedding", help="a .pt / .safetensors / .bin embedding trained on the toy model")
    parser.add_argument("concept", help="the toy concept it should show, <colour>_<shape> (e.g. purple_star)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="the accuracy's first sample seed: score a copy picked as the best on seeds 0-31 on --first-seed 32",
    )
    parser.add_argument("--init-text", default="*", help="what recovery is measured from (the run's init text)")
    parser.add_argument("--cfg-scale", default="3.0", help="DreamArtist pairs: the training guidance")
    parser.add_argument("--lora", help="a LoRA file applied for the learned measures (pivotal tuning's bundle)")
    parser.add_argument("--lora-strength", type=float, default=1.0, help="the LoRA's multiplier (-10 to 10)")
    parser.add_argument(
        "--lora-max-timestep", type=int, help="apply the LoRA only in sampling steps below this timestep (1-1000)"
    )
    report_user_errors(main, parser.parse_args())
