"""The cubic kept-fraction schedule tau(t) and the resolution of t_i / t_f given as fractions."""
import math

import pytest

from roselora_export.errors import InputError
from roselora_export.method import RoseLoraConfig, kept_fraction


def test_no_pruning_up_to_and_at_t_init():
    assert [kept_fraction(t, 0.05, 3, 20) for t in (0, 1, 3)] == [1.0, 1.0, 1.0]


def test_final_fraction_at_and_after_t_final():
    assert kept_fraction(20, 0.05, 3, 20) == pytest.approx(0.05)
    assert kept_fraction(25, 0.05, 3, 20) == pytest.approx(0.05)


def test_cubic_between_t_init_and_t_final():
    t_i, t_f, tau = 3, 20, 0.05
    for t in (4, 10, 19):
        expected = tau + (1 - tau) * (1 - (t - t_i) / (t_f - t_i)) ** 3
        assert kept_fraction(t, tau, t_i, t_f) == pytest.approx(expected)
    assert kept_fraction(4, tau, t_i, t_f) > kept_fraction(10, tau, t_i, t_f) > kept_fraction(19, tau, t_i, t_f) > tau


def test_fractions_below_one_are_taken_of_the_total_steps():
    cfg = RoseLoraConfig(t_init=0.1, t_final=0.7, steps=100)
    assert cfg.schedule_steps() == (10, 70)
    assert cfg.schedule_steps(200) == (20, 140)


def test_values_of_one_or_more_are_step_counts():
    assert RoseLoraConfig(t_init=3, t_final=20).schedule_steps(1000) == (3, 20)


def test_kept_count_is_ceil_tau_d():
    cfg = RoseLoraConfig(tau=0.05)
    assert cfg.kept_count(576) == math.ceil(0.05 * 576) == 29
    assert cfg.kept_count(192) == 10
    assert cfg.kept_count(200) == 10  # 0.05 * 200 is 10.000000000000002 in floating point


@pytest.mark.parametrize("field, value", [("tau", 0.0), ("tau", 1.5), ("rank", 0), ("beta", 1.0), ("steps", 0), ("clamp", -1.0)])
def test_out_of_range_settings_are_input_errors_naming_the_option(field, value):
    with pytest.raises(InputError, match=f"--{field.replace('_', '-')}"):
        RoseLoraConfig(**{field: value})
