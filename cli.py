"""Run normtf from a clone without installing it: python cli.py --help."""

from normtf.cli import main

if __name__ == "__main__":
    main()
