"""Benchmarks that show the serving path adds no waste; run them with `python -m bench`.

Each section lives in its own module and returns a `report.Section`: rows for
the printed table and the raw figures for the JSON file.
"""
