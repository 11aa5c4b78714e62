"""`python -m llava_jax.datagen captions ...` and `python -m llava_jax.datagen instruct ...` (see those modules)."""
import argparse
import sys

from llava_jax.datagen import captions, instruct


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m llava_jax.datagen", description=__doc__)
  sub = parser.add_subparsers(dest="command", required=True)
  for name, module in (("captions", captions), ("instruct", instruct)):
    p = sub.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_args(p)
    p.set_defaults(run=module.run)
  args = parser.parse_args(argv)
  return args.run(args)


if __name__ == "__main__":
  sys.exit(main())
