import pytest
from omegaconf import OmegaConf

from pruneflow.errors import UserError
from pruneflow.schedules import Schedule


def make(kind: str, total: int = 10, **kw) -> Schedule:
    return Schedule.from_config(OmegaConf.create({"name": kind, **kw}), 0.8, total)


def test_cubic_matches_formula_and_ends_on_target():
    s = make("cubic", total=10)
    # s(k) = 0.8 * (1 - (1 - (k+1)/10)^3)
    assert s.sparsity(0) == pytest.approx(0.8 * (1 - 0.9**3))
    assert s.sparsity(4) == pytest.approx(0.8 * (1 - 0.5**3))
    assert s.sparsity(9) == pytest.approx(0.8)
    assert all(s.is_update_step(k) for k in range(10))


def test_seven_cubic_keep_ratio():
    # SEVEN's code: r_k = keep + (1-keep) * (1 - (k+1)/iter_num)^3 (kept fraction)
    s = Schedule.from_config(OmegaConf.create({"name": "cubic"}), 0.7, 100)
    for k in (0, 17, 50, 99):
        keep = 0.3 + 0.7 * (1 - (k + 1) / 100) ** 3
        assert 1 - s.sparsity(k) == pytest.approx(keep)


def test_warmups_and_frequency():
    s = make("cubic", total=20, initial_warmup=5, final_warmup=5, frequency=3)
    assert s.sparsity(4) == 0 and not s.is_update_step(4)
    assert s.sparsity(14) == pytest.approx(0.8) and s.is_update_step(14)  # ramp ends at step 14
    assert s.sparsity(19) == pytest.approx(0.8)
    assert [k for k in range(20) if s.is_update_step(k)] == [7, 10, 13, 14, 16, 19]


def test_fraction_warmups():
    s = make("cubic", total=100, initial_warmup=0.1, final_warmup=0.2)
    assert (s.initial_warmup, s.final_warmup) == (10, 20)


def test_linear_exponential_oneshot():
    assert make("linear").sparsity(4) == pytest.approx(0.8 * 0.5)
    assert 1 - make("exponential").sparsity(4) == pytest.approx(0.2**0.5)
    one = make("oneshot", initial_warmup=3)
    assert one.sparsity(2) == 0 and one.sparsity(3) == pytest.approx(0.8) and one.is_update_step(3)


def test_schedule_that_cannot_finish_is_an_error():
    s = make("cubic", total=10, initial_warmup=6, final_warmup=4)
    with pytest.raises(UserError, match="cannot reach its target"):
        s.validate()


def test_warmup_floats_below_one_are_rounded_fractions_and_from_one_steps():
    s = make("cubic", total=100, initial_warmup=0.29, final_warmup=1.0)
    # 0.29 * 100 is 28.999999999999996 in floating point: rounded, not truncated; 1.0 is one step
    assert (s.initial_warmup, s.final_warmup) == (29, 1)


def test_validate_accepts_zero_warmups_and_rejects_a_zero_frequency():
    make("cubic", total=10).validate()  # no warm-ups, frequency 1
    make("oneshot", total=1).validate()
    with pytest.raises(UserError, match="schedule.frequency"):
        make("cubic", total=10, frequency=0).validate()
    with pytest.raises(UserError, match="schedule.final_warmup"):
        make("cubic", total=10, final_warmup=-1).validate()


def test_exponential_ramp_by_hand_and_every_kind_lands_exactly_on_its_target():
    s = make("exponential", total=10)
    # kept fraction 0.2^p after step k, p = (k + 1) / 10
    assert [1 - s.sparsity(k) for k in (0, 1, 6)] == pytest.approx([0.2**0.1, 0.2**0.2, 0.2**0.7])
    for kind in ("cubic", "linear", "exponential"):
        t = Schedule.from_config(OmegaConf.create({"name": kind}), 0.1, 10)
        assert t.sparsity(9) == 0.1  # exactly (1 - (1 - 0.1)^1 would be 0.09999999999999998)


def test_oneshot_prunes_at_the_end_of_the_initial_warmup():
    s = make("oneshot", total=10, initial_warmup=3, frequency=3)
    assert s.last_ramp_step == 3
    assert [s.sparsity(k) for k in range(10)] == [0.0] * 3 + [pytest.approx(0.8)] * 7
    assert [k for k in range(10) if s.is_update_step(k)] == [3, 5, 8]


def test_a_zero_target_with_warmups_filling_the_stage_stays_dense():
    """Nothing to reach (a dense run): validate accepts the warm-ups, every step is 0."""
    s = Schedule.from_config(OmegaConf.create({"name": "cubic", "initial_warmup": 2, "final_warmup": 2}), 0.0, 4)
    s.validate()
    assert [s.sparsity(k) for k in range(4)] == [0.0] * 4


def test_step_offset_runs_the_schedule_one_step_ahead_as_masked_run_squad():
    """masked_run_squad.py's global_step starts at 1: the mask after step k is their
    schedule_threshold at k + 2 (k + 1 in masked_run_glue.py)."""
    for kind in ("cubic", "linear", "exponential", "oneshot"):
        base = make(kind, total=20, initial_warmup=5, final_warmup=4, frequency=3)
        ahead = make(kind, total=20, initial_warmup=5, final_warmup=4, frequency=3, step_offset=1)
        ahead.validate()
        assert [ahead.sparsity(k) for k in range(19)] == [base.sparsity(k + 1) for k in range(19)]
        assert ahead.last_ramp_step == base.last_ramp_step - 1
        assert [ahead.is_update_step(k) for k in range(19)] == [base.is_update_step(k + 1) for k in range(19)]
    # by hand, cubic: their threshold at global_step g is 0.2 + 0.8 (1 - (g - 5) / 11)^3 (kept fraction)
    ahead = make("cubic", total=20, initial_warmup=5, final_warmup=4, step_offset=1)
    for k in (3, 4, 9, 14):
        g = k + 2
        keep = 1.0 if g <= 5 else 0.2 + 0.8 * max(0.0, 1 - (g - 5) / 11) ** 3
        assert 1 - ahead.sparsity(k) == pytest.approx(keep)


@pytest.mark.parametrize("offset", [2, -1, True])
def test_a_step_offset_beyond_the_initial_warmup_is_refused(offset):
    # the prune stage's first forward runs unpruned, so their counter may run ahead only into the warm-up
    with pytest.raises(UserError, match="schedule.step_offset"):
        make("cubic", total=20, initial_warmup=1, step_offset=offset).validate()
