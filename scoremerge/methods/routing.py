"""Which keys take the matrix path, and batching same-shape keys for it."""
import re
from collections import defaultdict

# A stacked group [B, T, m, n] is cut into chunks of at most this many bytes in the compute dtype.
MAX_GROUP_BYTES = 1 << 30


def excluded(key, exclude):
    """True when any exclude pattern (a regular expression, searched anywhere) matches the key."""
    return any(re.search(p, key) for p in exclude)


def routes_to_matrix(shape, key, T, exclude):
    """The matrix path: 2-D, not excluded, and min(m, n) // T >= 1 singular directions per task.

    A 2-D key with fewer rows or columns than tasks would get an empty basis and lose its update
    entirely; it takes the mean path instead (scoremerge.ref does the same).
    """
    return len(shape) == 2 and not excluded(key, exclude) and min(shape) // T >= 1


def shape_groups(shapes, T, exclude, itemsize, min_chunks=1):
    """Matrix-path keys grouped by shape, each group cut to fit MAX_GROUP_BYTES and, where it
    has the keys, into at least min_chunks chunks (one per CPU worker). Largest work first.

    shapes: dict key -> shape, in model order. Returns a list of key lists.
    """
    by_shape = defaultdict(list)
    for key, shape in shapes.items():
        if routes_to_matrix(shape, key, T, exclude):
            by_shape[tuple(shape)].append(key)
    groups = []
    for (m, n), keys in by_shape.items():
        per_key = T * m * n * itemsize
        step = max(1, min(MAX_GROUP_BYTES // per_key, -(-len(keys) // min_chunks)))
        groups += [keys[i:i + step] for i in range(0, len(keys), step)]
    return sorted(groups, key=lambda g: -len(g) * _cost(shapes[g[0]]))


def _cost(shape):
    """Rough flops of one key's decompositions: Gram (m n r) plus eigensolver (r^3)."""
    m, n = shape
    r = min(m, n)
    return m * n * r + r ** 3
