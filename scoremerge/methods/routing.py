"""Which keys take the matrix path, and batching same-shape keys for it."""
import re
from collections import defaultdict

# A stacked group [B, T, m, n] is cut into chunks of at most this many bytes in the compute dtype.
MAX_GROUP_BYTES = 1 << 30

# Matrix methods that decompose the summed task matrix instead of splitting its rank r into T
# per-task bases of r // T directions: they have a basis whenever r >= 1, so a [2, 64] head with
# T = 3 is merged isotropically, as the Iso authors' code and FusionBench do.
WHOLE_RANK_METHODS = frozenset({"iso_c", "iso_cts"})


def excluded(key, exclude):
    """True when any exclude pattern (a regular expression, searched anywhere) matches the key."""
    return any(re.search(p, key) for p in exclude)


def min_rank(method, T):
    """The smallest min(m, n) for which `method` has a basis: 1 for Iso-C and Iso-CTS, T for
    SCORE and TSV-M (k = min(m, n) // T must be at least 1), and T when no method is named."""
    return 1 if method in WHOLE_RANK_METHODS else T


def routes_to_matrix(shape, key, T, exclude, method=None):
    """The matrix path: 2-D, not excluded, and min(m, n) >= min_rank(method, T).

    A 2-D key below that rank would get an empty basis and lose its update entirely; it takes
    the mean path instead (scoremerge.ref does the same).
    """
    return (len(shape) == 2 and not excluded(key, exclude)
            and min(shape) >= min_rank(method, T))


def shape_groups(shapes, T, exclude, itemsize, min_chunks=1, method=None):
    """Matrix-path keys of `method` grouped by shape, each group cut to fit MAX_GROUP_BYTES and,
    where it has the keys, into at least min_chunks chunks (one per CPU worker). Largest work
    first.

    shapes: dict key -> shape, in model order. Returns a list of key lists.
    """
    by_shape = defaultdict(list)
    for key, shape in shapes.items():
        if routes_to_matrix(shape, key, T, exclude, method):
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
