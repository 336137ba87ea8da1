"""Screenshots of the shopping-guide page (desktop and phone width) on an export, e.g. MovieLens with posters:

    python bench/page_screenshots.py --artifacts artifacts/ml100k_mm --user 42 --out docs/

Starts `python serve.py` on the folder, opens the page in headless Chromium (apt-get install -y chromium),
picks the user, clicks the first recommendation, and saves `<name>-desktop.png` and `<name>-phone.png`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.server_process import start_server  # noqa: E402
from tests.browser import screenshots  # noqa: E402


def shrink(path: Path, width: int) -> None:
    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.width > width:
            image = image.resize((width, round(image.height * width / image.width)), Image.Resampling.LANCZOS)
        image.quantize(256).save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--user", type=int, required=True)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--name", default="shopping-guide")
    parser.add_argument("--max-width", type=int, default=0, help="shrink to this width, 256 colours (for docs/)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="page_screenshots_"))
    server, url = start_server(args.artifacts, None, logs)
    try:
        for path in screenshots(url, args.user, args.out, args.name):
            if args.max_width:
                shrink(path, args.max_width)
            print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(logs, ignore_errors=True)


if __name__ == "__main__":
    main()
