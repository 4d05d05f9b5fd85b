"""Closed polygons of a 2D mask, holes encoded as PS3.3 C.8.8.6.3 allows (numpy, scipy, scikit-image).

Points are ``(row, column)`` pixel indices (float); a polygon is an ``(n, 2)``
array that does not repeat its first point.

* Rings (:func:`mask_contours`): every boundary of the mask as its own closed
  polygon, traced with marching squares (``skimage.measure.find_contours`` at
  level 0.5 on the zero-padded mask). A polygon passes half-way between inside
  and outside pixel centres, so no pixel centre lies on any edge and an
  even-odd (XOR) fill of all the rings at pixel centres gives back exactly the
  mask. The mask is 4-connected (face neighbours), the background 8-connected,
  as marching squares resolves its saddles; a single pixel is a 4-point diamond.
* Keyholes (:func:`keyhole_polygons`): one polygon per 4-connected region. Each
  hole of the region is entered through a zero-width cut: an edge from a
  point of the region's outline (or of a hole already joined to it) to the
  hole's top-left vertex, the hole traversed against the outline's direction,
  and the same edge back. The cut runs along a row half-way between pixel
  rows, so it crosses no pixel centre; it cancels itself under both the
  even-odd and the non-zero rule, so either fill gives the region with its
  holes. An island inside a hole is a region of its own, with its own polygon.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.measure import find_contours


def mask_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Every boundary of a 2D mask as a closed polygon: outlines and holes alike (combine them by XOR)."""
    padded = np.pad(np.asarray(mask, bool).astype(np.uint8), 1)
    # find_contours closes each contour by repeating its first point; the padding shifts indices by one
    return [_drop_collinear(contour[:-1] - 1.0) for contour in find_contours(padded, 0.5)]


def keyhole_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """One closed polygon per 4-connected region of a 2D mask, its holes joined by zero-width cuts."""
    mask = np.asarray(mask, bool)
    rings = mask_contours(mask)
    regions = np.pad(ndimage.label(mask)[0], 1)
    by_region: dict[int, list[np.ndarray]] = {}
    for ring in rings:
        by_region.setdefault(_region_of(ring, regions), []).append(ring)
    return [group[0] if len(group) == 1 else _join_holes(group) for group in by_region.values()]


def _region_of(ring: np.ndarray, padded_regions: np.ndarray) -> int:
    """The region a ring bounds: that of the inside pixel of the two its first vertex lies between."""
    row, col = ring[0] + 1.0  # into the padded grid
    pair = ((int(np.floor(row)), int(col)), (int(np.ceil(row)), int(col))) if row % 1 else \
        ((int(row), int(np.floor(col))), (int(row), int(np.ceil(col))))
    return int(max(padded_regions[pair[0]], padded_regions[pair[1]]))


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    prev, nxt = np.roll(points, 1, axis=0), np.roll(points, -1, axis=0)
    a, b = points - prev, nxt - points
    cross = a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0]
    keep = cross != 0
    return points[keep] if keep.sum() >= 3 else points


def _signed_area(points: np.ndarray) -> float:
    rows, cols = points[:, 0], points[:, 1]
    return float(np.sum(cols * np.roll(rows, -1) - np.roll(cols, -1) * rows) / 2.0)


def _join_holes(rings: list[np.ndarray]) -> np.ndarray:
    """A region's outline (its ring of largest area) with its other rings (its holes) cut in.

    Holes are taken top-left vertex first and each is cut in from that vertex
    leftwards along its row, to the nearest ring point met (on the outline or
    on a hole taken before, as nothing else can lie nearer): the rings and the
    cuts form a tree, written out depth first.
    """
    order = sorted(range(len(rings)), key=lambda i: -abs(_signed_area(rings[i])))
    outline = rings[order[0]]
    sign = float(np.sign(_signed_area(outline)))
    holes = [rings[i] if np.sign(_signed_area(rings[i])) != sign else rings[i][::-1] for i in order[1:]]
    holes.sort(key=_top_left)
    tree = _Tree([outline, *holes], sign)
    for child in range(1, len(tree.rings)):
        tree.cut(child)
    return tree.polygon()


def _top_left(points: np.ndarray) -> tuple[float, float]:
    row = float(points[:, 0].min())
    return row, float(points[points[:, 0] == row, 1].min())


class _Tree:
    """Rings of one region (0: the outline, then the holes top-left first) and the cuts joining them."""

    def __init__(self, rings: list[np.ndarray], sign: float) -> None:
        self.rings = rings
        self.sign = sign
        self.starts = [0] + [_vertex_index(r, *_top_left(r)) for r in rings[1:]]
        self.meets: list[np.ndarray] = [rings[0][0]]  # per hole: the point its cut leaves the tree at
        # on ring r, edge e (from vertex e): (distance along the edge, the point, the hole cut in there)
        self.cuts: dict[tuple[int, int], list[tuple[float, np.ndarray, int]]] = {}
        self._edges = _RowIndex(rings)

    def cut(self, child: int) -> None:
        row, col = self.rings[child][self.starts[child]]
        ring, edge, point = self._edges.nearest_left(row, col, below=child)
        n = len(self.rings[ring])
        end = self.rings[ring][(edge + 1) % n]
        if np.array_equal(point, end):  # at the edge's end vertex: the next edge's start
            edge = (edge + 1) % n
        along = float(np.hypot(*(point - self.rings[ring][edge])))
        self.cuts.setdefault((ring, edge), []).append((along, point, child))
        self.meets.append(point)

    def polygon(self) -> np.ndarray:
        """The rings and cuts as one point sequence, depth first from the outline (no recursion)."""
        points: list[np.ndarray] = []
        stack = [iter(self._tokens(0))]
        while stack:
            token = next(stack[-1], None)
            if token is None:
                stack.pop()
            elif isinstance(token, int):
                stack.append(iter(self._tokens(token)))
            else:
                points.append(token)
        return np.asarray(points)

    def _tokens(self, r: int) -> list[np.ndarray | int]:
        """Ring ``r`` from its start vertex, each hole cut into it in place (an int: write that ring there)."""
        ring, start = self.rings[r], self.starts[r]
        n = len(ring)
        tokens: list[np.ndarray | int] = []
        last: list[np.ndarray | int] = []
        for step in range(n):
            v = (start + step) % n
            tokens.append(ring[v])
            for along, point, child in sorted(self.cuts.get((r, v), []), key=lambda c: c[0]):
                if along > 0:
                    tokens += [point, child, point]
                elif r > 0 and step == 0 and not self._start_faces_right(r):
                    last = [child, ring[v]]  # into the corner after the ring's own cut, at its end
                else:
                    tokens += [child, ring[v]]
        if r > 0:
            tokens.append(ring[start])  # back to the start vertex: the caller writes the cut back
        return tokens + last

    def _start_faces_right(self, r: int) -> bool:
        """At a hole's start vertex, split by its own cut: does the corner it is entered by face +column?"""
        ring, start = self.rings[r], self.starts[r]
        return _faces_right(self.meets[r], ring[start], ring[(start + 1) % len(ring)], self.sign)


def _vertex_index(ring: np.ndarray, row: float, col: float) -> int:
    return int(np.flatnonzero((ring[:, 0] == row) & (ring[:, 1] == col))[0])


class _RowIndex:
    """Every edge of a region's rings, bucketed by the half-integer rows it spans (where cuts run)."""

    def __init__(self, rings: list[np.ndarray]) -> None:
        self.a = np.concatenate(rings)
        self.b = np.concatenate([np.roll(r, -1, axis=0) for r in rings])
        self.ring = np.concatenate([np.full(len(r), i) for i, r in enumerate(rings)])
        self.edge = np.concatenate([np.arange(len(r)) for r in rings])
        low = np.rint(2 * np.minimum(self.a[:, 0], self.b[:, 0])).astype(int)
        high = np.rint(2 * np.maximum(self.a[:, 0], self.b[:, 0])).astype(int)
        first, last = low + (low % 2 == 0), high - (high % 2 == 0)  # odd keys: rows k + 0.5
        count = np.maximum(0, (last - first) // 2 + 1)
        ids = np.repeat(np.arange(len(self.a)), count)
        within = np.arange(len(ids)) - np.repeat(np.cumsum(count) - count, count)
        keys = first[ids] + 2 * within
        order = np.argsort(keys, kind="stable")
        self.keys, self.ids = keys[order], ids[order]

    def nearest_left(self, row: float, col: float, below: int) -> tuple[int, int, np.ndarray]:
        """The point of rings ``0..below-1`` nearest left of ``(row, col)`` on that row: (ring, edge, point)."""
        key = int(round(2 * row))
        lo, hi = np.searchsorted(self.keys, [key, key + 1])
        ids = self.ids[lo:hi]
        ids = ids[self.ring[ids] < below]
        a, b = self.a[ids], self.b[ids]
        flat = a[:, 0] == b[:, 0]
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.where(flat, np.maximum(a[:, 1], b[:, 1]), a[:, 1] + (row - a[:, 0]) * (b[:, 1] - a[:, 1]) / (b[:, 0] - a[:, 0]))
        x = np.where(x < col, x, -np.inf)
        if not x.size or not np.isfinite(x.max()):
            raise ValueError("a hole outside its region's outline: the rings are not one region's boundaries")
        best = int(np.argmax(x))
        return int(self.ring[ids[best]]), int(self.edge[ids[best]]), np.array([row, x[best]])


def _faces_right(before: np.ndarray, here: np.ndarray, after: np.ndarray, sign: float) -> bool:
    """Whether the region's side of the corner ``before → here → after`` holds the direction +column."""
    into = np.arctan2(*(before - here))  # angles in the (column, row) plane, from +column
    out = np.arctan2(*(after - here))
    span = (into - out) % (2 * np.pi) if sign > 0 else (out - into) % (2 * np.pi)
    turn = (0.0 - out) % (2 * np.pi) if sign > 0 else (out - 0.0) % (2 * np.pi)
    return bool(0 < turn < span)
