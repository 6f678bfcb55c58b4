"""A driver's own project, as a new user has it: a package next to the script, not installed anywhere.

``write_project(dir, version)`` lays out::

    dir/driver.py            forks mylib's functions and one of its own to the cluster at argv[1]
    dir/mylib/__init__.py    re-exports, with a relative import
    dir/mylib/shapes.py      VERSION, a class and a dataclass result

Each ``area()`` prints a line, which the driver shows prefixed with where it
ran; the driver prints its findings as one ``RESULT {json}`` line
(:func:`result_line`).

Two projects with different ``version`` have two different ``mylib``s under
one name: the case where two drivers on one cluster must each get their own.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

INIT = """
    from .shapes import VERSION, Area, Square


    def square(x):
        return Square(x).area()
"""

SHAPES = """
    import dataclasses
    import os
    import socket
    import time

    VERSION = {version}


    @dataclasses.dataclass
    class Area:
        value: float
        version: int
        host: str
        pid: int


    class Square:
        def __init__(self, side):
            self.side = side

        def area(self):
            time.sleep(0.005)
            print(f"area of {{self.side}} by mylib v{{VERSION}}")  # reaches the driver's terminal
            return Area(self.side * self.side, VERSION, socket.gethostname(), os.getpid())
"""

DRIVER = """
    import json
    import sys

    import distfork
    from mylib import VERSION, Area, square


    def twice(x):  # defined in __main__: pickled by value, its global `square` by reference
        return square(x).value * 2


    distfork.init(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    areas = [f.result(timeout=120) for f in [distfork.fork(square, i) for i in range(n)]]
    doubled = [f.result(timeout=120) for f in [distfork.fork(twice, i) for i in range(n)]]
    shipper = distfork.api._runtime.driver.shipper
    package = shipper.package if shipper is not None else None
    out = {
        "version": VERSION,
        "all_areas": all(type(a) is Area for a in areas),
        "values": [a.value for a in areas],
        "versions": sorted({a.version for a in areas}),
        "doubled": doubled,
        "ran_on": sorted({(a.host, a.pid) for a in areas}),
        "package": package.hash if package else None,
        "package_names": list(package.names) if package else [],
    }
    distfork.shutdown()
    print("RESULT " + json.dumps(out), flush=True)
"""


def write_project(where: Path, version: int) -> Path:
    """The project at ``where`` (made); returns its driver script."""
    (where / "mylib").mkdir(parents=True, exist_ok=True)
    (where / "mylib" / "__init__.py").write_text(textwrap.dedent(INIT))
    (where / "mylib" / "shapes.py").write_text(textwrap.dedent(SHAPES).format(version=version))
    driver = where / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER))
    return driver


def result_line(stdout: str) -> dict:  # type: ignore[type-arg]
    """The driver's ``RESULT`` line among the task lines it shows."""
    import json

    (line,) = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))  # type: ignore[no-any-return]
