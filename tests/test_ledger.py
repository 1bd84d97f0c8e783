"""The FLOP ledger: known sums, the amortised total, cumulative per round."""
import pytest

from jest_curate import ledger


def test_round_ledger_sums_every_component():
    entry = ledger.round_ledger(reference_training=1000, reference_scoring=200,
                                learner_scoring=300, selection=7, training=500)
    assert entry["all_in"] == 2007 and entry["amortised"] == 1007
    assert set(ledger.COMPONENTS) <= set(entry)
    with pytest.raises(ValueError, match=">= 0"):
        ledger.round_ledger(reference_training=-1, reference_scoring=0, learner_scoring=0,
                            selection=0, training=0)


def test_run_ledger_is_cumulative_and_counts_one_off_costs_once():
    records = [{"train_flops": 100, "scoring_flops": 40, "selection_flops": 3},
               {"train_flops": 200, "scoring_flops": 0, "selection_flops": 3},
               {"train_flops": 300, "scoring_flops": 40}]  # An older record: no selection.
    out = ledger.run_ledger(records, reference_training=1000, reference_scoring=50,
                            filter_flops=9)
    assert [e["learner_scoring"] for e in out] == [40, 40, 80]
    assert [e["selection"] for e in out] == [12, 15, 15]
    assert [e["training"] for e in out] == [100, 200, 300]
    assert [e["all_in"] for e in out] == [1000 + 50 + 40 + 12 + 100, 1000 + 50 + 40 + 15 + 200,
                                          1000 + 50 + 80 + 15 + 300]
    assert all(e["all_in"] - e["amortised"] == 1000 for e in out)
    assert ledger.reference_training_flops(None, None) == 0
    assert ledger.reference_training_flops("ignored", 77) == 77
