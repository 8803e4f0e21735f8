"""The ``batchrun`` command's entry point; ``python -m batchrun`` is the same command."""

import sys


def main() -> None:
    """Run the command line. ``batchrun --version`` alone answers before the
    command line interface loads: a tenth of a second of imports it never uses."""
    if sys.argv[1:] == ["--version"]:
        from batchrun import __version__

        sys.stdout.write(f"batchrun {__version__}\n")
        return
    from batchrun.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
