"""The repository root on sys.path, imported first by every research script.

`python research/study.py` puts research/ on the path, not the root where the method lives (train.py, cli.py,
data.py, ...); this one import makes those importable wherever the script is run from. ROOT is that folder.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
