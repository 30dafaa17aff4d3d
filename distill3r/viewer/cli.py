"""Show a reconstruction written by ``infer`` in the browser (viser), or export it as one HTML file.

    python stages/view.py OUTPUT [--scene NAME] [--host 127.0.0.1] [--port 8080]
        [--percentile 0] [--max-points 1000000] [--static FILE.html [--steps 10]]

OUTPUT is an ``infer`` output folder (its only scene, or ``--scene``), one of a scene's files
(``<scene>_student.ply``, ``_cameras.json``, ``_info.json``) or their ``<folder>/<scene>``
prefix. Live: serves the viewer at ``http://HOST:PORT`` until interrupted (Ctrl-C). With
``--static``: writes a self-contained HTML file (no server, no network) and exits.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Sequence

from distill3r.viewer.scene import find_scene_files, load_view_scene


def parser(prog: str = "view") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].strip())
    p.add_argument("output", help="infer output folder, a scene's output file, or its "
                   "<folder>/<scene> prefix")
    p.add_argument("--scene", help="the scene to show when the folder holds several")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default "
                   "%(default)s; 0.0.0.0 for other machines)")
    p.add_argument("--port", type=int, default=8080, help="port (default %(default)s; viser "
                   "takes the next free one when it is busy)")
    p.add_argument("--percentile", type=float, default=0.0,
                   help="initial confidence percentile of the slider (0-99)")
    p.add_argument("--max-points", type=int, default=1_000_000,
                   help="draw at most this many points (a uniform random subset; default "
                   "%(default)s)")
    p.add_argument("--static", metavar="FILE", help="write a self-contained HTML file instead "
                   "of serving")
    p.add_argument("--steps", type=int, default=10, help="confidence bands of the static "
                   "file's timeline (1: none; default %(default)s)")
    return p


def _run(args: argparse.Namespace) -> int:
    from distill3r.viewer import app

    if not 0 <= args.percentile <= 99:
        raise ValueError(f"--percentile must be in [0, 99], got {args.percentile}")
    if args.max_points < 1:
        raise ValueError(f"--max-points must be >= 1, got {args.max_points}")
    scene = load_view_scene(find_scene_files(args.output, args.scene), args.max_points)
    if args.static:
        path = app.export_html(scene, args.static, steps=args.steps)
        print(f"view: {scene.name}: {len(scene.points):,} points, {scene.num_views} views -> "
              f"{path} ({path.stat().st_size / 1e6:.1f} MB)")
        return 0
    server, viewer = app.serve(scene, args.host, args.port, args.percentile)
    print(f"view: {scene.name}: {viewer.points_drawn():,} points, {scene.num_views} views at "
          f"http://{args.host}:{server.get_port()} (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the viewer; the exit status (1 with ``view: error: ...`` for bad input). ``prog``:
    the program name in usage lines (``distill3r view`` from the console command)."""
    args = parser(prog or "view").parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"view: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
