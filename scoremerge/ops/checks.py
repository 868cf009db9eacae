"""Input checks shared by the ops: shapes, dtypes and devices, with the offending values."""
import torch

FLOAT_DTYPES = (torch.float32, torch.float64)


def check_matrix_batch(name, x, ndim=3):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < ndim:
        raise ValueError(f"{name} must have at least {ndim} dims, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64 (compute dtype), got {x.dtype}")


def check_same(what, **tensors):
    values = {name: getattr(t, what) for name, t in tensors.items()}
    if len(set(values.values())) > 1:
        raise ValueError(f"{what} differ: " + ", ".join(f"{n}={v}" for n, v in values.items()))


PRECISIONS = ("ieee", "tf32x3", "tf32")


def check_precision(precision):
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be None or one of {PRECISIONS}, got {precision!r}")


def default_precision(precision, x):
    """None means: 3xTF32 for fp32 on a GPU (each operand split into a high and a low tf32 part,
    three tensor-core products: about fp32's accuracy, where plain fp32 products would run on
    the FMA units), full precision elsewhere (fp64, the interpreter)."""
    if precision is not None:
        return precision
    return "tf32x3" if x.is_cuda and x.dtype == torch.float32 else "ieee"

