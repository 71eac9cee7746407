"""``python -m pyzsl.train <method> [options]``: train a pyzsl method; ``--help`` after a method lists its options."""
import argparse
import importlib
import sys

from .runner import add_common_arguments, cleanup_distributed

# method name -> module with add_arguments(parser, method) and main(args, method) -> dict of final metrics
METHODS = {
    "lesa": "pyzsl.train.lesa",
    "tfvaegan": "pyzsl.train.tfvaegan",
    "clswgan": "pyzsl.train.tfvaegan",
}
DESCRIPTIONS = {
    "lesa": "LESA shared multi-attention, multi-label ZSL (synthetic, nus-wide, openimages)",
    "tfvaegan": "TF-VAEGAN feature generation, generalized ZSL (synthetic-gzsl, cub, awa2, sun, flo)",
    "clswgan": "f-CLSWGAN, TF-VAEGAN without encoder/feedback/decoder (same datasets)",
}


def build_parser(method=None) -> argparse.ArgumentParser:
    """The CLI; only ``method``'s module is imported (the others' options are not needed to parse its flags)."""
    parser = argparse.ArgumentParser(prog="python -m pyzsl.train", description=__doc__)
    methods = parser.add_subparsers(dest="method", required=True, metavar="METHOD")
    for name, module_name in METHODS.items():
        sub = methods.add_parser(name, help=DESCRIPTIONS[name], description=DESCRIPTIONS[name])
        if name == method:
            add_common_arguments(sub)
            importlib.import_module(module_name).add_arguments(sub, name)
    return parser


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    try:
        return importlib.import_module(METHODS[args.method]).main(args, args.method)
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, KeyError) as error:  # bad input: a clear message, not a traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
