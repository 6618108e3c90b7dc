"""dealcl: continual low-rank fine-tuning of language models.

The folders follow the data flow: data → prompts → models → methods → train → eval → runs.
"""
import os as _os

# oneDNN (PyTorch's CPU matmul library) keeps a compiled kernel per matmul shape, 1024 by
# default; dynamic padding makes new shapes with every batch width, and the cache grew a run's
# resident memory by ~120 MB per stage. 64 kernels: peak RSS of three training stages 3.2 →
# 2.8 GB, step time within noise (docs/PERFORMANCE.md, "Memory"). Only effective when dealcl
# is imported before torch (the CLI always is); a value the user set wins.
_os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")

__version__ = "0.1.0"

# (not `methods`: that name is the subpackage dealcl.methods)
_API = ("run", "resume", "compare", "load_run", "report", "registered_methods")


def __getattr__(name: str):
    # The API is imported on first use, so `import dealcl` stays light (no torch).
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'dealcl' has no attribute {name!r}")


__all__ = ["__version__", *_API]
