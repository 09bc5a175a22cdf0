"""PCA rotations for funnel search on models not trained with a Matryoshka loss.

A rotation puts a table's principal axes first, so a short prefix of the rotated rows carries the
most variance a prefix can; the store keeps the rows rotated onto the first ``components`` axes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic

import numpy as np

from embedtools.protocols import ArrayBackend, ArrayT

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["MOMENT_CHUNK_VALUES", "Rotation", "principal_axes", "rotate"]

#: Values per float64 chunk when a rotation's moments are summed (8 MiB): a float64 copy of a
#: whole table could be twice its size again.
MOMENT_CHUNK_VALUES = 1 << 20


@dataclass(frozen=True)
class Rotation(Generic[ArrayT]):
    """A PCA rotation of a table: ``matrix`` (host, ``d x d``, principal axes by falling variance)
    and the rows rotated onto its first ``components`` axes (on the backend), with a norm cache
    that searches fill (and the ledger charges)."""

    matrix: npt.NDArray[np.float32]
    components: int
    prefix: ArrayT
    norms: dict[int, ArrayT] = field(default_factory=dict[int, ArrayT])
    #: A cosine funnel's first stage: the rotated prefix at a width, normalised (as the table's own ``unit_prefixes``).
    unit_prefixes: dict[int, ArrayT] = field(default_factory=dict[int, ArrayT])
    #: A certified funnel's bounded rotated prefixes, by prefix width (:mod:`embedtools.search.screening`).
    bound_prefixes: dict[int, ArrayT] = field(default_factory=dict[int, ArrayT])


def principal_axes(host: npt.NDArray[np.float32], chunk_values: int | None = None) -> npt.NDArray[np.float32]:
    """The principal axes of ``host``'s rows (uncentred second moments: cosine and dot scores
    are taken about the origin), by falling variance, as float32 columns.

    Moments are summed in float64 chunks of ``chunk_values`` (default :data:`MOMENT_CHUNK_VALUES`)
    so the sum is accurate without a float64 copy of the table."""
    d = host.shape[1]
    step = max(1, (MOMENT_CHUNK_VALUES if chunk_values is None else chunk_values) // max(d, 1))
    moments = np.zeros((d, d), dtype=np.float64)
    for start in range(0, host.shape[0], step):
        chunk = host[start : start + step].astype(np.float64)
        moments += chunk.T @ chunk
    eigenvalues, eigenvectors = np.linalg.eigh(moments)
    matrix = np.ascontiguousarray(eigenvectors[:, np.argsort(eigenvalues)[::-1]], dtype=np.float32)
    matrix.setflags(write=False)
    return matrix


def rotate(
    backend: ArrayBackend[ArrayT], host: npt.NDArray[np.float32], matrix: npt.NDArray[np.float32], components: int
) -> Rotation[ArrayT]:
    """``host``'s rows rotated onto the first ``components`` axes, on the backend, with an empty
    norm cache: re-applied whenever the table's rows change, the matrix itself is kept."""
    prefix = np.ascontiguousarray(host @ matrix[:, :components], dtype=np.float32)
    return Rotation(matrix=matrix, components=components, prefix=backend.from_numpy(prefix))
