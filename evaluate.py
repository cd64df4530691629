"""Score an embedding trained on the toy model: `python evaluate.py outputs/.../toy-concept.pt purple_star`.

A DreamArtist pair is recognised by its `-neg` file next to the given one. Prints recovery, classifier accuracy (and the oracle's) and the four denoising losses as JSON; see
lit_ti.toy.evaluation for the definitions.
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
    scores = evaluate_file(args.embedding, args.concept, args.samples, args.init_text, args.cfg_scale)
    print(json.dumps(scores, indent=1))


if __name__ == "__main__":
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("embedding", help="a .pt / .safetensors / .bin embedding trained on the toy model")
    parser.add_argument("concept", help="the toy concept it should show, <colour>_<shape> (e.g. purple_star)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--init-text", default="*", help="what recovery is measured from (the run's init text)")
    parser.add_argument("--cfg-scale", default="3.0", help="DreamArtist pairs: the training guidance")
    report_user_errors(main, parser.parse_args())
