"""``python -m crelu_ext <command>``; commands: bench, train, analyze.

The commands' own modules import their optional dependencies only when they run, so
``--help`` works without them; a missing one ends the command with one line that names
the extra to install, in the form that fits where the package was imported from."""

import importlib
import importlib.util
import sys
from pathlib import Path

PROG = "python -m crelu_ext"
# Each command: its module (with a main(argv)), its pip extra (pyproject.toml), what it does.
COMMANDS = {
    "bench": ("crelu_ext.bench", "bench", "time the fused op against the composition it replaces"),
    "train": ("crelu_ext.paper.train", "paper", "train the paper's networks, check the parity"),
    "analyze": ("crelu_ext.paper.analysis", "paper", "the paper's analyses of a trained network"),
}
OPTIONAL_MODULES = {"numpy", "tqdm", "sklearn", "matplotlib", "pytest_benchmark"}
# What each command reaches on every run, looked for before it starts: analyze would
# otherwise train for minutes before it finds matplotlib missing. What only some runs
# need (scikit-learn for train's digits, matplotlib for bench's plots) is found missing
# where it is imported, with the same message.
NEEDS = {
    "bench": ("tqdm",),
    "train": ("numpy", "tqdm"),
    "analyze": ("numpy", "sklearn", "tqdm", "matplotlib"),
}
PACKAGE_DIR = Path(__file__).resolve().parent


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: {PROG} {{{','.join(COMMANDS)}}} [options]", "", "commands:"]
    lines += [f"  {name:{width}}  {about}" for name, (_, _, about) in COMMANDS.items()]
    lines += ["", f"{PROG} <command> --help shows the command's options."]
    return "\n".join(lines)


def install_hint(extra: str) -> str:
    """How to install ``extra`` for the package that is running: in a source
    checkout (pyproject.toml next to the package) from that checkout."""
    checkout = PACKAGE_DIR.parent
    if (checkout / "pyproject.toml").is_file():
        return f'pip install --no-build-isolation ".[{extra}]" (run in {checkout})'
    return f'pip install "crelu_ext[{extra}]"'


def missing_extra(command: str, module: str, extra: str) -> SystemExit:
    return SystemExit(
        f"{PROG} {command} needs {module}, which is not installed: {install_hint(extra)}"
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(usage())
        sys.exit(0)
    if not argv or argv[0] not in COMMANDS:
        error = f"\n{PROG}: error: unknown command {argv[0]!r}" if argv else ""
        print(usage() + error, file=sys.stderr)
        sys.exit(2)
    command, arguments = argv[0], argv[1:]
    module_name, extra, _ = COMMANDS[command]
    if not {"-h", "--help"} & set(arguments):  # help needs no extra
        for needed in NEEDS.get(command, ()):
            if importlib.util.find_spec(needed) is None:
                raise missing_extra(command, needed, extra)
    try:
        # The import too: an extra's module imported with the command's module
        # (tests/tools/test_cli.py keeps them out) still ends in the hint.
        importlib.import_module(module_name).main(arguments)
    except ModuleNotFoundError as error:
        missing = (error.name or "").partition(".")[0]
        if missing not in OPTIONAL_MODULES:
            raise
        raise missing_extra(command, missing, extra) from None


if __name__ == "__main__":
    main()
