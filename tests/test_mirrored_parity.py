"""Mirrored training over 2 and 4 devices equals single-device training."""

import pytest
from dp_cases import CASES, assert_same, run

import kerasdist as kd


@pytest.fixture(scope="module")
def single_device():
    return {case: run(case) for case in CASES}


@pytest.mark.parametrize("num_devices", [2, 4])
@pytest.mark.parametrize("case", CASES)
def test_mirrored_matches_single_device(single_device, case, num_devices):
    strategy = kd.get_strategy(
        "mirrored", devices=[f"/cpu:{i}" for i in range(num_devices)])
    result = run(case, strategy)
    assert_same(result, single_device[case])


def test_one_device_strategy_matches_no_strategy(single_device):
    strategy = kd.get_strategy("one_device")
    assert_same(run("adam_dict", strategy), single_device["adam_dict"])
