"""Subprocess entry of the kill/resume test: python _run_fit.py CONFIG_JSON OUT [--resume]."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import toy  # noqa: E402,F401

from lungcore.train import fit  # noqa: E402

if __name__ == "__main__":
    fit(json.loads(Path(sys.argv[1]).read_text()), out=sys.argv[2], resume="--resume" in sys.argv)
