"""The dedupe stage's account of offsets (pipeline.stages.sequence): records applied in
offset order with none left out, whatever order the consumer hands them over in."""

from __future__ import annotations

from pipeline.stages.sequence import RESEEK_AFTER, STALL_AFTER, Sequencer

A, B = ("funnel.raw.click", 0), ("funnel.raw.open", 1)


def batch(*records):
    return [(tp, offset, offset, (tp, offset)) for tp, offset in records]


def runs(*records):
    """Runs of records (tp, first, last), as a fetch hands them over."""
    return [(tp, first, last, (tp, first, last)) for tp, first, last in records]


def test_in_order_records_are_applied_and_become_committable_once_durable():
    seq = Sequencer()
    seq.reset({A: 10, B: 0})
    out = seq.admit(batch((A, 10), (B, 0), (A, 11)), now=0)
    assert out.admitted == [(A, 10), (B, 0), (A, 11)] and out.seeks == {} and out.left_out == 0
    assert (seq.commit_offset(A), seq.commit_offset(B)) == (10, 0)  # not durable yet
    seq.applied({A, B})
    assert (seq.commit_offset(A), seq.commit_offset(B)) == (12, 1)  # never beyond what was applied


def test_a_record_after_a_hole_is_left_out_with_the_rest_of_its_partition_and_sought_back():
    seq = Sequencer()
    seq.reset({A: 10, B: 0})
    out = seq.admit(batch((A, 10), (A, 12), (B, 0), (A, 11), (A, 13)), now=0)
    # 11 is missing when 12 arrives: 12 and everything after it on A waits for the re-read
    assert out.admitted == [(A, 10), (B, 0)]
    assert out.seeks == {A: 11} and out.left_out == 3
    seq.applied({A, B})
    assert seq.commit_offset(A) == 11
    # the re-read starts with stale copies still in flight: no second seek before RESEEK_AFTER
    out = seq.admit(batch((A, 13)), now=RESEEK_AFTER / 2)
    assert out.admitted == [] and out.seeks == {}
    out = seq.admit(batch((A, 10), (A, 11), (A, 12)), now=RESEEK_AFTER / 2)
    assert out.admitted == [(A, 10), (A, 11), (A, 12)]  # 10 is a replay: the rules skip it
    assert seq.expected[A] == 13


def test_a_seek_whose_record_never_comes_back_is_made_again():
    seq = Sequencer()
    seq.reset({A: 5})
    assert seq.admit(batch((A, 7)), now=0).seeks == {A: 5}
    assert seq.admit(batch((A, 8)), now=RESEEK_AFTER - 0.1).seeks == {}
    assert seq.admit(batch((A, 9)), now=RESEEK_AFTER + 0.1).seeks == {A: 5}


def test_records_of_partitions_not_assigned_are_left_out():
    seq = Sequencer()
    seq.reset({A: 0})
    out = seq.admit(batch((B, 0), (A, 0)), now=0)
    assert out.admitted == [(A, 0)] and out.left_out == 1 and out.unassigned == {B}
    assert seq.commit_offset(B) is None  # and never committed from here


def test_a_new_assignment_restarts_the_account_from_the_committed_offsets():
    seq = Sequencer()
    seq.reset({A: 0, B: 0})
    seq.admit(batch((A, 0), (A, 1), (A, 2)), now=0)
    seq.applied({A})
    seq.reset({A: 1})  # B moved away; A resumes from its commit (a replay of 1 and 2)
    assert seq.expected == {A: 1} and (seq.commit_offset(A), seq.commit_offset(B)) == (1, None)
    assert seq.admit(batch((A, 1), (A, 2), (A, 3)), now=0).admitted == [(A, 1), (A, 2), (A, 3)]


def test_a_failed_batch_is_read_again_from_what_was_durable():
    seq = Sequencer()
    seq.reset({A: 3})
    seq.admit(batch((A, 3), (A, 4)), now=0)
    assert seq.failed({A}) == {A: 3}
    assert seq.expected[A] == 3 and seq.commit_offset(A) == 3


def test_a_partition_whose_next_record_never_arrives_is_sought_back():
    """The tail case: the last records were dropped, no later record reveals the hole."""
    seq = Sequencer()
    seq.reset({A: 4, B: 0})
    ends = {A: 6, B: 0}
    assert seq.stalled(ends, now=0) == {}
    assert seq.stalled(ends, now=STALL_AFTER - 0.1) == {}
    assert seq.stalled(ends, now=STALL_AFTER + 0.1) == {A: 4}
    # progress resets the clock; at the end nothing is sought
    seq.admit(batch((A, 4)), now=STALL_AFTER + 0.2)
    assert seq.stalled(ends, now=STALL_AFTER + 0.3) == {}
    seq.admit(batch((A, 5)), now=STALL_AFTER + 0.4)
    assert seq.stalled(ends, now=10 * STALL_AFTER) == {}


def test_a_run_is_applied_whole_when_it_holds_the_next_offset():
    seq = Sequencer()
    seq.reset({A: 10})
    out = seq.admit(runs((A, 10, 19), (A, 20, 20)), now=0)
    assert out.admitted == [(A, 10, 19), (A, 20, 20)] and seq.expected[A] == 21
    # after a seek back to a committed offset inside an earlier run: the run that starts
    # below the expected offset and reaches past it is partly a replay, partly new
    seq.reset({A: 15})
    out = seq.admit(runs((A, 15, 30)), now=0)
    assert out.admitted == [(A, 15, 30)] and seq.expected[A] == 31
    out = seq.admit(runs((A, 3, 12)), now=0)
    assert out.admitted == [(A, 3, 12)] and seq.expected[A] == 31  # all a replay
    # offsets the log does not hold between a run's records (transaction markers) are no hole
    out = seq.admit(runs((A, 31, 40)), now=0)
    assert out.left_out == 0 and seq.expected[A] == 41


def test_a_run_beyond_the_next_offset_is_a_hole():
    seq = Sequencer()
    seq.reset({A: 10})
    out = seq.admit(runs((A, 12, 20), (A, 21, 25)), now=0)
    assert out.admitted == [] and out.left_out == 2 and out.seeks == {A: 10}
