"""The statistics behind every verdict, checked against scipy on fixed numbers: paired t
intervals, two one-sided tests (equivalence), the minimum detectable effect (noncentral t), the
verdict rules (including the equivalence verdict and no verdict below five seeds) and the
difference in differences."""
import math

import numpy as np
import pytest
from scipy import stats as sps

from radio_core.sweep.stats import (difference_in_differences, judge, mean_ci, minimum_detectable_effect,
                                    paired_values)

A = [0.612, 0.598, 0.631, 0.605, 0.620, 0.615]
B = [0.590, 0.585, 0.602, 0.588, 0.611, 0.596]


def test_paired_interval_matches_scipy_ttest_rel():
    d = paired_values(dict(enumerate(A)), dict(enumerate(B)))
    iv = mean_ci(d)
    res = sps.ttest_rel(A, B)
    ci = res.confidence_interval(0.95)
    assert iv.low == pytest.approx(ci.low, abs=1e-12) and iv.high == pytest.approx(ci.high, abs=1e-12)
    assert (iv.low > 0) == (res.pvalue < 0.05)


@pytest.mark.parametrize("margin", [0.005, 0.02, 0.05])
def test_equivalence_is_two_one_sided_tests(margin):
    """Equivalent within +-m iff both one-sided t-tests (H0: d <= -m, H0: d >= m) reject at 5%."""
    d = np.array(A) - np.array(B)
    j = judge(list(d), margin)
    p_low = sps.ttest_1samp(d, -margin, alternative="greater").pvalue
    p_high = sps.ttest_1samp(d, margin, alternative="less").pvalue
    assert j.equivalent == (max(p_low, p_high) < 0.05)
    ci90 = sps.ttest_1samp(d, 0).confidence_interval(0.90)
    assert (j.tost.low, j.tost.high) == (pytest.approx(ci90.low, abs=1e-12), pytest.approx(ci90.high, abs=1e-12))


@pytest.mark.parametrize("n, expected", [(5, 1.682), (10, 0.996), (30, 0.529)])
def test_minimum_detectable_effect_has_the_stated_power(n, expected):
    """80% power of a two-sided paired t-test at 5%: the effect (in SDs) that G*Power tabulates,
    and the noncentral t's power at that effect is 0.8."""
    mde = minimum_detectable_effect(1.0, n)
    assert mde == pytest.approx(expected, abs=1e-3)
    crit = sps.t.ppf(0.975, n - 1)
    ncp = mde * math.sqrt(n)
    power = sps.nct.sf(crit, n - 1, ncp) + sps.nct.cdf(-crit, n - 1, ncp)
    assert power == pytest.approx(0.8, abs=1e-9)
    assert minimum_detectable_effect(0.02, n) == pytest.approx(0.02 * mde, rel=1e-9)  # scales with the SD


def test_verdict_rules():
    up = [0.031, 0.024, 0.029, 0.035, 0.027]  # clearly above 0 and above a 0.01 margin
    flat = [0.001, -0.002, 0.0015, -0.001, 0.0005]  # tightly around 0
    down = [-x for x in up]
    noisy = [0.05, -0.04, 0.03, -0.05, 0.02]
    assert judge(up, 0.01).verdict("higher") == "reproduced"
    assert judge(down, 0.01).verdict("higher") == "not reproduced (reversed)"
    assert judge(flat, 0.01).verdict("higher") == "not reproduced (equivalent within the margin)"
    assert judge(noisy, 0.01).verdict("higher") == "inconclusive"
    # non-inferiority: a small loss inside the margin is "not worse"; a large one is not
    assert judge(flat, 0.01).verdict("not_worse") == "reproduced"
    assert judge(down, 0.01).verdict("not_worse") == "not reproduced (worse by more than the margin)"
    assert judge(noisy, 0.01).verdict("not_worse") == "inconclusive"
    assert judge(flat, 0.01).verdict("equivalent") == "reproduced"
    assert judge(up, 0.01).verdict("equivalent") == "not reproduced (differs by more than the margin)"
    # fewer than five seeds: no verdict, however clear the numbers
    assert judge(up[:4], 0.01).verdict("higher") == "no verdict (n = 4 < 5)"
    assert judge([], 0.01).verdict("higher") == "no verdict (n = 0 < 5)"
    with pytest.raises(ValueError, match="needs a margin"):
        judge(flat, None).verdict("not_worse")


def test_difference_in_differences_pairs_by_seed():
    a64, a128 = {0: 0.60, 1: 0.62, 2: 0.58}, {0: 0.40, 1: 0.45, 2: 0.41}
    b64, b128 = {0: 0.61, 1: 0.63, 2: 0.57, 3: 0.9}, {0: 0.58, 1: 0.60, 2: 0.55}
    did = difference_in_differences(a64, a128, b64, b128)
    assert did == pytest.approx([0.20 - 0.03, 0.17 - 0.03, 0.17 - 0.02])  # seed 3 lacks a 128 px score
