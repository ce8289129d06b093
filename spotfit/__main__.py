"""``python -m spotfit``: the same as the ``spotfit`` command."""

from spotfit.cli import main

if __name__ == "__main__":
    main(prog_name="spotfit")
