"""The primitive ops, one package per family: each op's __init__ checks its inputs and dispatches
to a backend (backend.run); naive.py beside it is the literal reference (scoremerge.ref gathers
them); batched.py, triton.py and cuda.py are the backends' implementations. docs/architecture.md
walks the layout."""
from .entropy import entropy_weights
from .linalg import polar, truncated_svd
from .mixing import mix
from .projection import project_and_mask, reconstruct

__all__ = ["entropy_weights", "mix", "polar", "project_and_mask", "reconstruct", "truncated_svd"]
