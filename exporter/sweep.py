"""`python -m exporter.sweep` still runs the coverage sweep, which now lives above both packages in zoo/sweep.py.

Only this launcher names the upper package; nothing in the exporter imports it.
"""
if __name__ == "__main__":
    from vitparity import entry_point

    entry_point(lambda: __import__("zoo.sweep", fromlist=["main"]).main, "interrupted")
