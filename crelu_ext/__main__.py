"""``python -m crelu_ext <command>``; commands: bench, train, analyze.

The commands' own modules import their optional dependencies only when they run, so
``--help`` works without them; a missing one ends the command with one line that names
the extra to install."""

import importlib
import sys

COMMANDS = {
    "bench": "crelu_ext.bench",
    "train": "crelu_ext.paper.train",
    "analyze": "crelu_ext.paper.analysis",
}
# The pip extra (pyproject.toml) that brings each command's optional modules.
EXTRAS = {"bench": "bench", "train": "paper", "analyze": "paper"}
OPTIONAL_MODULES = {"tqdm", "sklearn", "matplotlib"}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python -m crelu_ext {{{','.join(COMMANDS)}}} [options]")
    command = sys.argv[1]
    module = importlib.import_module(COMMANDS[command])
    try:
        module.main(sys.argv[2:])
    except ModuleNotFoundError as error:
        missing = (error.name or "").partition(".")[0]
        if missing not in OPTIONAL_MODULES:
            raise
        sys.exit(
            f"python -m crelu_ext {command} needs {missing}, which is not installed: "
            f'pip install "crelu_ext[{EXTRAS[command]}]"'
        )


if __name__ == "__main__":
    main()
