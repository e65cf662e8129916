"""editlab lab: a local web app, one tab per method, on the bundled toy model by default.

Every tab runs the ``editlab`` command its knobs describe (``runner.run_command``), in this process, and shows the
command line beside the result: running that line in a shell writes the same PNG, byte for byte.
"""
