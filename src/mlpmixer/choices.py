"""The choices and defaults that `mixer CMD --help` shows for modules that import torch (export formats,
benchmark dtypes, few-shot settings), kept here, free of torch, so that --help lists them in a tenth of a
second rather than the seconds torch takes to import. The training recipes' own choices are in recipes.py."""

from __future__ import annotations

EXPORT_FORMATS = ("onnx", "torchscript", "exported-program")  # export.py
EXPORT_SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "exported-program": ".pt2"}  # the default of each
BENCH_DTYPES = ("fp32", "bf16", "fp16")  # bench.DTYPES: fp32, or bf16/fp16 autocast
FEWSHOT_L2 = 2.0**10  # fewshot.py: the ℓ2 regularisation of big_vision's few-shot evaluation
FEWSHOT_SHOTS = (1, 5, 10, 25)  # images per class
