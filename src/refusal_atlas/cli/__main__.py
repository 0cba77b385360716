"""`python -m refusal_atlas.cli` runs the same entry point as the `refusal-atlas` script."""

from refusal_atlas.cli import main

main()
