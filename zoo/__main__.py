"""`python -m zoo PATTERN ...`: the coverage sweep (zoo/sweep.py)."""
from vitparity import entry_point

entry_point(lambda: __import__("zoo.sweep", fromlist=["main"]).main, "interrupted")
