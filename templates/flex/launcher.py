"""Flex-template launcher: parse the template's parameters, build the graph, submit, exit.

Dataflow runs this file (FLEX_TEMPLATE_PYTHON_PY_FILE) in the template image. It must
exit once the job is submitted: ``pipeline.main.run`` does not wait for remote runners.
"""

import logging
import sys

from pipeline.main import run

if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)
    run(sys.argv[1:])
