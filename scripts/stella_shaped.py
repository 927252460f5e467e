"""Build a random-weight model folder laid out exactly like Stella v5, at any size (tests/helpers/stella_shaped.py).

python scripts/stella_shaped.py /tmp/tiny-stella                 # the tests' tiny shape
python scripts/stella_shaped.py /tmp/stella-1.5b-shape --full    # stella_en_1.5B_v5 shapes, random weights
python scripts/stella_shaped.py /tmp/stella-400m-shape --400m --full   # stella_en_400M_v5 (NewModel) shapes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the builder lives with the tests that use it
from tests.helpers.stella_shaped import (  # noqa: E402
    FULL_1_5B,
    FULL_400M,
    build_stella_400m_shaped,
    build_stella_shaped,
)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--full", action="store_true", help="full-size shapes (1.5B: about 6 GB of fp32)")
    parser.add_argument("--400m", dest="new_model", action="store_true", help="stella_en_400M_v5's NewModel shape")
    args = parser.parse_args()
    if args.new_model:
        print(build_stella_400m_shaped(args.out, **(FULL_400M if args.full else {})))
    else:
        print(build_stella_shaped(args.out, **(FULL_1_5B if args.full else {})))
