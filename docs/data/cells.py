#!/usr/bin/env python3
"""Moves reproduce-table cells between a run's cache and a committed cells file.

    python3 docs/data/cells.py collect REPORT.md CACHE OUT.cells.json
        The cells of a finished run, in the report's order ("Every cell"), with the rows as the
        report's command gave them (`--methods`, `ROW@R1/R2` limits), paths made relative to
        the repository. The docs test renders a report from this file and compares.
    python3 docs/data/cells.py seed CELLS.json CACHE [--absolute FIELDS]
        Writes committed cells into a cache, so that a new run with the same settings reuses them
        and computes only the cells it adds. Paths stay as the file has them (what a run was
        given on its command line), except in the FIELDS (comma-separated: calibration, heldout,
        tasks), which are made absolute under the repository: the driver names its defaults
        (the Austen calibration, the held-out texts, the tasks) by absolute path. Existing cache
        files are left alone. A seeded cell has no plan file: a `+recovery` row whose base cell
        was seeded searches again.
"""
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def stem(method, ratio):
    return "{}-{:02d}".format(method.replace(":", "-").replace("+", "-"), round(ratio * 100))


FIELDS = ("calibration", "heldout", "tasks")


def map_paths(settings, f, fields=FIELDS):
    if "calibration" in fields:
        settings["calibration"] = [f(p) for p in settings["calibration"]]
    if "heldout" in fields:
        settings["heldout"] = [[name, f(p)] for name, p in settings["heldout"]]
    if "tasks" in fields:
        settings["tasks"] = [f(p) for p in settings["tasks"]]


def relative(p):
    path = Path(p)
    return str(path.relative_to(ROOT)) if path.is_absolute() and path.is_relative_to(ROOT) else p


def rows_of(report):
    command = re.search(r"^Command: `(.*)`", report, re.M).group(1)
    given = re.search(r"--methods[ =](\S+)", command).group(1).split(",")
    methods, limits = [], {}
    for entry in given:
        name, _, ratios = entry.partition("@")
        methods.append(name)
        if ratios:
            limits[name] = [float(r) for r in ratios.split("/")]
    return methods, limits


def collect(report_path, cache, out):
    report = Path(report_path).read_text()
    methods, limits = rows_of(report)
    table = report[report.index("## Every cell") :]
    cells = []
    for line in table.splitlines()[4:]:
        if not line.startswith("| "):
            break
        model, method, target = [c.strip() for c in line.strip("|").split("|")[:3]]
        ratio = float(target.rstrip(" %")) / 100
        cell = json.loads((Path(cache) / model / (stem(method, ratio) + ".json")).read_text())
        map_paths(cell["settings"], relative)
        cells.append(cell)
    collected = {
        "collected_from": f"{cache}/*/*.json, the cache of the run {report_path} names, in its order (paths made relative to the repository)",
        "methods": methods,
        "row_ratios": limits,
        "cells": cells,
    }
    Path(out).write_text(json.dumps(collected, indent=1) + "\n")
    print(f"{out}: {len(cells)} cells")


def seed(cells_path, cache, absolute=()):
    written = 0
    for cell in json.loads(Path(cells_path).read_text())["cells"]:
        path = Path(cache) / cell["model"] / (stem(cell["method"], cell["target_ratio"]) + ".json")
        if path.exists():
            continue
        map_paths(cell["settings"], lambda p: str(ROOT / p), absolute)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cell, indent=2))
        written += 1
    print(f"{cache}: {written} cells seeded from {cells_path}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "collect":
        collect(*sys.argv[2:])
    elif len(sys.argv) in (4, 6) and sys.argv[1] == "seed" and sys.argv[4:5] in ([], ["--absolute"]):
        fields = sys.argv[5].split(",") if len(sys.argv) == 6 else []
        if any(f not in FIELDS for f in fields):
            sys.exit(f"--absolute {sys.argv[5]}: expected some of {', '.join(FIELDS)}")
        seed(sys.argv[2], sys.argv[3], absolute=fields)
    else:
        sys.exit(__doc__)
