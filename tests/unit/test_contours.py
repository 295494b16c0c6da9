"""Polygons for ``response_mask_format=polygon``: the outer contour of a mask's largest part,
clockwise from its topmost-leftmost pixel, corners only (OpenCV's border following)."""

from __future__ import annotations

import numpy as np

from pipeline.schema import outer_contour


def mask(rows: str) -> np.ndarray:
    return np.array([[c == "#" for c in row] for row in rows.split()], bool)


def test_a_rectangle_is_its_four_corners_clockwise():
    assert outer_contour(mask("""
        ......
        .####.
        .####.
        ......""")) == [(1, 1), (4, 1), (4, 2), (1, 2)]


def test_holes_are_ignored_and_diagonals_kept():
    assert outer_contour(mask("""
        .###.
        #...#
        .###.""")) == [(1, 0), (3, 0), (4, 1), (3, 2), (1, 2), (0, 1)]


def test_the_largest_part_wins_and_of_equal_parts_the_first_a_scan_meets():
    assert outer_contour(mask("""
        #.....
        ...###
        ......""")) == [(3, 1), (5, 1)]
    assert outer_contour(mask("""
        ....##
        ##....""")) == [(4, 0), (5, 0)]


def test_a_lone_pixel_and_an_empty_mask():
    assert outer_contour(mask("... .#. ...")) == [(1, 1)]
    assert outer_contour(np.zeros((3, 3), bool)) == []
