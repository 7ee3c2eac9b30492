"""The coverage sweep over timm's model zoo: above the exporter and the comparator, it drives both (zoo/sweep.py)."""
