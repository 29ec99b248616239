"""metrics.py against values computed by hand on tiny arrays."""
import math

import numpy as np
import pytest

from mfconvert.metrics import cosine_per_row, mean_cosine, nearest_neighbour_agreement, sqnr_db

# Four points on the unit circle: 0 deg, 10 deg, 90 deg, 100 deg. Nearest neighbours (among the
# other rows): 0<->1, 2<->3.
ANG = np.deg2rad([0.0, 10.0, 90.0, 100.0])
REF = np.stack([np.cos(ANG), np.sin(ANG)], axis=1)


def test_identical():
    assert mean_cosine(REF, REF) == pytest.approx(1.0)
    assert nearest_neighbour_agreement(REF, REF) == 1.0
    assert sqnr_db(REF, REF) == math.inf


def test_cosine_hand_values():
    ref = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    test = np.array([[2.0, 0.0], [1.0, 0.0], [-3.0, -4.0]])  # scaled, orthogonal, opposite
    np.testing.assert_allclose(cosine_per_row(ref, test), [1.0, 0.0, -1.0])
    assert mean_cosine(ref, test) == pytest.approx(0.0)
    # 45 degrees apart: cos = 1/sqrt(2)
    assert mean_cosine([[1.0, 0.0]], [[1.0, 1.0]]) == pytest.approx(1 / math.sqrt(2))


def test_nearest_neighbour_agreement_permuted():
    # Move row 1 from 10 deg to 80 deg: its neighbour becomes row 2 (90 deg) instead of row 0,
    # and row 0's neighbour becomes row 2 (90 deg is nearer than 100) instead of row 1.
    # Rows 2 and 3 keep each other. Agreement = 2/4.
    test = REF.copy()
    test[1] = [np.cos(np.deg2rad(80.0)), np.sin(np.deg2rad(80.0))]
    assert nearest_neighbour_agreement(REF, test) == pytest.approx(0.5)
    # Scaling rows does not change cosine neighbours.
    assert nearest_neighbour_agreement(REF, REF * np.array([[1.0], [5.0], [0.1], [2.0]])) == 1.0
    # Swapping the pairs' identities (rows 0,1 take 2,3's points and vice versa) keeps every
    # neighbour index: 0<->1 and 2<->3 still hold.
    assert nearest_neighbour_agreement(REF, REF[[2, 3, 0, 1]]) == 1.0
    # A permutation that breaks every pair: 0,2 adjacent and 1,3 adjacent -> agreement 0.
    assert nearest_neighbour_agreement(REF, REF[[0, 2, 1, 3]]) == 0.0


def test_sqnr_hand_value():
    ref = np.array([[3.0, 4.0]])          # norm 5
    test = np.array([[3.0, 4.5]])         # noise norm 0.5 -> 20*log10(10) = 20 dB
    assert sqnr_db(ref, test) == pytest.approx(20.0)
    assert sqnr_db(ref, ref * 0.9) == pytest.approx(20.0)  # noise = 0.1 * ref


def test_shape_checks():
    with pytest.raises(ValueError):
        mean_cosine(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError):
        nearest_neighbour_agreement(np.ones((1, 3)), np.ones((1, 3)))
