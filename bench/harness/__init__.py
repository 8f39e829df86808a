"""The benchmark harness: what every script under ``bench/`` shares. Not part of the package.

A script runs as ``python bench/<script>.py``, so ``bench/`` is on ``sys.path`` and this folder
imports as ``harness``:

  timing    interleaved rounds, calibrated per cell, medians of the slowest rank
  report    library versions and machine, tables with ratios against goals, the JSON document
  records   the messages and payloads the scripts move
  peers     the peers benchmark's methods: MPI floor, pickle, pkl5, typedcoll, gloo and torch
  model     the scaling model: bytes and latency steps per collective, typedcoll against MPI
  plots     the PNGs (matplotlib, imported only when a plot is drawn)
"""
