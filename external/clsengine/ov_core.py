"""The process's one OpenVINO Core.

OpenVINO expects one Core per process: each Core loads its device plugins and thread pools again, and a
process that created Cores by the dozen (a test suite; a tool measuring many models) was seen to crash in
their teardown (Ultralytics reuses one Core for the same reason). Every reader, compiler and device query of
the engine, the work-dir scripts and the tools goes through this one.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import openvino as ov


@functools.cache
def openvino_core() -> "ov.Core":
    import openvino as ov

    return ov.Core()
