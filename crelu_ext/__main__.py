"""``python -m crelu_ext <command>``; commands: bench, train, analyze."""

import sys

COMMANDS = {
    "bench": "crelu_ext.bench",
    "train": "crelu_ext.train",
    "analyze": "crelu_ext.analysis",
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python -m crelu_ext {{{','.join(COMMANDS)}}} [options]")
    import importlib

    module = importlib.import_module(COMMANDS[sys.argv[1]])
    module.main(sys.argv[2:])


if __name__ == "__main__":
    main()
