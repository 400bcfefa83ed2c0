"""Write the help every ``dkacq`` command ships with (``dkacq/commands/help/``), and the versions of Python
and the libraries it was written with, which must be the pinned ones (``constraints.txt``).
``tests/test_help.py`` fails until this has run after a change to an option or its docstring:

    python scripts/write_help.py

Each command module's help is written in a new process, as ``dkacq <command> --help`` builds it: the
lists of known subclasses in it name the classes that module imports, not those of other commands.
"""

import json
import subprocess
import sys

from dkacq.cli import COMMANDS
from dkacq.commands import helptext

RENDER = "import json, sys; from dkacq.commands import helptext; "
RENDER += "print(json.dumps({command: helptext.render(command, sys.argv[1]) for command in sys.argv[2:]}))"

if __name__ == "__main__":
    modules: dict[str, list[str]] = {}
    for command, module in COMMANDS.items():
        modules.setdefault(module, []).append(command)
    processes = [
        subprocess.Popen([sys.executable, "-c", RENDER, module, *commands], stdout=subprocess.PIPE, text=True)
        for module, commands in modules.items()
    ]
    texts = {}
    for process in processes:
        output, _ = process.communicate()
        if process.returncode:
            raise SystemExit(process.returncode)
        texts |= json.loads(output)
    helptext.write_shipped({command: texts[command] for command in COMMANDS})
    print(helptext.SHIPPED)
