"""jaxserve's status and error lines go through `logging`, under the "jaxserve" logger tree
(`jaxserve.engine`, `jaxserve.server`, ...). The commands (and `LLM(show_progress=True)`) call
`configure()` once: one line per record on stderr, with a time stamp. An application that set up
logging itself keeps its own configuration: `configure` then changes nothing."""

from __future__ import annotations

import logging
import sys


def configure(level: int = logging.INFO) -> None:
    logger = logging.getLogger("jaxserve")
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
