#!/usr/bin/env python3
"""Rebuild the reproduce-table cells behind a report from the report itself.

The cells of docs/results-baselines.md (then docs/results.md) and docs/results-tiny.md were cached under runs/ (gitignored) and
not kept. This script reads a report's "Every cell" table and its header (steps, learning rate,
seed, sequence length, calibration, windows, tasks) and writes the cells as `reproduce-table`
caches them (xtask/src/table.rs `CellResult`), with every value at the precision the report
printed it. What the report does not show is filled in and marked: `calibration_windows` is the
driver's default (64; the report does not print it), `finished_utc` is null (the report gives
only the range of finishing times), `machine` is the one the report names (or null).

    python3 docs/data/transcribe_cells.py docs/results-baselines.md docs/data/results-baselines.cells.json
    python3 docs/data/transcribe_cells.py docs/results-tiny.md docs/data/results-tiny.cells.json \
        --learning-rate 0.001

The xtask test `docs_tables_are_what_the_generator_writes_from_the_committed_cells` renders
these cells with the report generator and compares every table and ordering to the report.
"""
import argparse
import json
import re
import sys


def header_settings(md, learning_rate):
    m = re.search(r"Search steps (\d+), (?:learning rate ([0-9.e-]+), )?seed (\d+), sequence length (\d+)[^,]*, calibration: (.*?)  \n", md)
    steps, lr, seed, seq_len, calibration = m.groups()
    if lr is None:
        if learning_rate is None:
            sys.exit("the report does not print the learning rate: pass --learning-rate")
        lr = learning_rate
    windows = re.search(r"Perplexity over the first (\d+) windows of each held-out text; multiple choice on (.*?) \((.*?)\)\.", md)
    eval_windows, tasks, questions = windows.groups()
    limit = re.match(r"the first (\d+) questions of each", questions)
    return {
        "steps": int(steps),
        "learning_rate": float(lr),
        "seed": int(seed),
        "seq_len": int(seq_len),
        "calibration": calibration.split(", "),
        "calibration_windows": 64,
        "eval_windows": int(eval_windows),
        "tasks": tasks.split(", "),
        "mc_limit": int(limit.group(1)) if limit else None,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("report")
    ap.add_argument("out")
    ap.add_argument("--learning-rate", default=None)
    args = ap.parse_args()
    md = open(args.report, encoding="utf-8").read()
    settings = header_settings(md, args.learning_rate)
    machine = re.search(r"^Cells finished .* on (.*)\.$", md, re.M)
    table = md.split("## Every cell\n", 1)[1]
    cells = []
    heldout_order = []
    for line in table.splitlines():
        cols = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cols) != 7 or cols[0] in ("model", "---"):
            continue
        model, method, target, achieved, ppl, acc, seconds = cols
        perplexity = {}
        for item in ppl.split(", "):
            name, value = item.rsplit(" ", 1)
            perplexity[name] = float(value)
            if name not in heldout_order:
                heldout_order.append(name)
        accuracy = {}
        for item in acc.split(", "):
            name, pair = item.split(" ", 1)
            a, n = pair.split(" / ")
            accuracy[name] = [float(a), float(n)]
        cells.append({
            "model": model,
            "method": method,
            "target_ratio": float(target.rstrip(" %")) / 100,
            "achieved_ratio": float(achieved.rstrip(" %")) / 100,
            "perplexity": perplexity,
            "accuracy": accuracy,
            "seconds": float(seconds),
            "finished_utc": None,
            "machine": machine.group(1) if machine else None,
        })
    # The orderings list the held-out texts in the driver's order (persuasion, then kjv-john).
    order = re.findall(r"^- [^,]+, ([^:]+): ", md.split("## Which orderings reproduce", 1)[1], re.M)
    heldout = list(dict.fromkeys(order)) or heldout_order
    settings["heldout"] = [[name, f"data/heldout/{name}.txt"] for name in heldout]
    for cell in cells:
        cell["settings"] = settings
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump({"transcribed_from": args.report, "cells": cells}, fh, indent=1)
        fh.write("\n")
    print(f"{args.out}: {len(cells)} cells")


if __name__ == "__main__":
    main()
