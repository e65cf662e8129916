"""editlab lab: a local web app with one tab per method, each showing the editlab command line of its result.

Gradio is an optional extra (``pip install -e ".[lab]"``). The server listens on the loopback address only
(127.0.0.1) unless --host says otherwise: whoever reaches it can run commands and read the files it writes.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from ..errors import UserError

NAME = "lab"
HELP = "start the lab: a local web app to run each method with its knobs and see inside it (needs the lab extra)"


def add_arguments(parser):
    parser.add_argument("--port", type=int, default=7860, help="port to serve on")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; 127.0.0.1 serves this machine only (0.0.0.0: every network)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="the model every tab runs on (any weights the commands take); default: the bundled "
                             "toy model")
    parser.add_argument("--folder", type=Path, default=None,
                        help="where runs are written, one subfolder each (default: a new temporary folder)")


def run(args):
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError('the lab needs Gradio: pip install -e ".[lab]"') from None
    from ..lab.app import serve
    from ..lab.context import LabContext

    if args.weights is not None:  # checked once here, not at the first run of every tab
        from ..checks import check_weights
        from ..options import weights_path

        check_weights(weights_path(args), "any-model", NAME)
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: give a port number in [1, 65535]")
    folder = args.folder or Path(tempfile.mkdtemp(prefix="editlab-lab-"))
    folder.mkdir(parents=True, exist_ok=True)
    logging.getLogger("editing.lab").setLevel(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up requests, one line each
    lab = LabContext(folder=folder, weights=args.weights, threads=args.threads)
    print(f"editlab lab: http://{args.host}:{args.port}  (runs written to {lab.folder})", flush=True)
    serve(lab, args.host, args.port)
