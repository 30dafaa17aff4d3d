"""An offline HTML template for ``dvc plots show``.

DVC's default plot page loads vega, vega-lite and vega-embed from a CDN, so it is blank on a
machine without internet. :func:`write_offline_template` inlines the same three libraries (the
versions ``dvc_render``'s ``VegaRenderer.SCRIPTS`` pins) into a template for
``dvc plots show --html-template``; the scripts come from the npm registry (``npm pack``, the
packages' own minified builds, no dependencies) and are cached locally, never committed.

    python -m distill3r.plots --cache .venv/share/distill3r --out .venv/share/distill3r/plots.html
    dvc plots show --html-template .venv/share/distill3r/plots.html -o reports/plots
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from distill3r.atomic import replacing

# (package, version, file inside the package): dvc_render 1.x loads exactly these
VEGA_SCRIPTS = (("vega", "5.20.2", "build/vega.min.js"),
                ("vega-lite", "5.2.0", "build/vega-lite.min.js"),
                ("vega-embed", "6.18.2", "build/vega-embed.min.js"))
# DVC fills these into the template with str.replace (dvc_render/html.py HTML.embed)
_DVC_PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")

TEMPLATE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    <title>Distill3R plots</title>
{inline_scripts}
    <style>body {{ font-family: sans-serif; }} div {{ display: inline-block; margin: 8px; }}</style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def fetch_script(package: str, version: str, member: str, cache: Path) -> Path:
    """``<cache>/<package>-<version>.min.js``, downloaded with ``npm pack`` when missing."""
    out = cache / f"{package}-{version}.min.js"
    if out.is_file():
        return out
    npm = shutil.which("npm")
    if npm is None:
        raise ValueError("npm not found: install Node.js (npm) to build the offline plot page")
    cache.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([npm, "pack", f"{package}@{version}", "--pack-destination",
                           str(cache), "--silent"], capture_output=True, text=True)
    tgz = cache / f"{package}-{version}.tgz"
    if done.returncode != 0 or not tgz.is_file():
        raise ValueError(f"npm pack {package}@{version} failed: {done.stderr.strip()[-400:]}")
    with tarfile.open(tgz) as tar:
        data = tar.extractfile(f"package/{member}")
        if data is None:
            raise ValueError(f"{tgz}: no package/{member}")
        with replacing(out) as tmp:
            tmp.write_bytes(data.read())
    tgz.unlink()
    return out


def write_offline_template(cache: Path, out: Path) -> Path:
    """Write the self-contained template to ``out`` (scripts from ``cache``)."""
    blocks = []
    for package, version, member in VEGA_SCRIPTS:
        code = fetch_script(package, version, member, cache).read_text(encoding="utf-8")
        if "</script" in code.lower() or any(p in code for p in _DVC_PLACEHOLDERS):
            raise ValueError(f"{package}@{version} cannot be inlined (holds a script end tag or "
                             "a DVC placeholder)")
        blocks.append(f"    <script>/* {package}@{version} */\n{code}\n    </script>")
    html = TEMPLATE.format(inline_scripts="\n".join(blocks))
    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing(out) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write the offline `dvc plots show` template.")
    p.add_argument("--cache", required=True, help="folder for the downloaded scripts")
    p.add_argument("--out", required=True, help="template HTML to write")
    args = p.parse_args(argv)
    try:
        path = write_offline_template(Path(args.cache), Path(args.out))
    except (ValueError, OSError) as exc:
        print(f"plots: error: {exc}", file=sys.stderr)
        return 1
    print(f"plots: offline template -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
