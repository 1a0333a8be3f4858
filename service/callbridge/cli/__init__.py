"""The ``callbridge`` command: `main` parses the arguments and runs one subcommand.

* `main`: ``run``, ``check-config``, ``simulate``, ``demo``, ``verify``; configures logging;
* `admin`: ``callbridge admin ...``, a client of the admin API;
* `simulate`: the simulator's turbulence flags, shared by ``simulate`` and ``demo``;
* `event_schemas`: ``callbridge event-schemas``, the event catalog written to files.

The only place that reads the process's arguments and exits with a code.
"""

from callbridge.cli.main import main

__all__ = ["main"]
