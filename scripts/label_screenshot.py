"""A screenshot of the labelling page (docs/label/d3po_round.png) with headless Chromium.

    diffalign train configs/d3po_digits.yaml --set args.labels=runs/labels --out runs/d3po-human   # stops, exit 3
    python scripts/label_screenshot.py runs/labels/epoch-0000 docs/label/d3po_round.png --answered 5

The round is copied to a temporary folder first, `--answered` pairs are answered there ("a"),
so the original round is left as it was.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from diffalign.label import make_server


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("round")
    p.add_argument("out")
    p.add_argument("--answered", type=int, default=5)
    p.add_argument("--size", default="1100,640")
    a = p.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("chromium not found (apt-get install chromium)")
    out = Path(a.out).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # the page names the folder relative to where `diffalign label` runs
        folder = Path(tmp) / "runs" / "labels" / Path(a.round).name
        shutil.copytree(Path(a.round).resolve(), folder, ignore=shutil.ignore_patterns("answers.json", "labels.json"))
        server = make_server(folder, port=0)
        for _ in range(a.answered):
            server.feedback.answer(server.feedback.state()["item"]["id"], "a")
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                            f"--window-size={a.size}", f"--screenshot={out}",
                            "--virtual-time-budget=3000", server.url], check=True, timeout=60,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finally:
            server.shutdown()
            server.server_close()
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
