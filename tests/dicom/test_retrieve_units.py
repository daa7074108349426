"""C-GET / C-MOVE sub-operations as units (dicom/retrieve.py): the counts a response carries,
the contexts a C-MOVE proposes, and how a data set is cut into PDUs."""

from __future__ import annotations

from appliance.dicom import pdu, retrieve
from appliance.format import transcode

CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT, IMPLICIT, J2K = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.90"


def test_sub_operations_count_each_outcome_and_list_the_failed():
    subops = retrieve.SubOperations(4)
    for uid, status in (("a", 0x0000), ("b", 0xB000), ("c", 0xA700), ("d", None)):
        subops.record(uid, status)
    assert subops.counts() == {"NumberOfCompletedSuboperations": 1, "NumberOfFailedSuboperations": 2,
                               "NumberOfWarningSuboperations": 1, "NumberOfRemainingSuboperations": 0}
    assert subops.failed_uids == ["c", "d"]
    assert "NumberOfRemainingSuboperations" not in subops.counts(remaining=False)


def test_a_move_proposes_each_stored_syntax_and_one_fallback_per_class():
    proposals = retrieve.move_contexts({(CT, J2K), (CT, EXPLICIT), (MR, EXPLICIT)})
    assert [(p.abstract_syntax, tuple(p.transfer_syntaxes)) for p in proposals] == [
        (CT, (EXPLICIT,)), (CT, (J2K,)), (MR, (EXPLICIT,)),
        (CT, tuple(ts for ts in transcode.UNCOMPRESSED if transcode.can_transcode(J2K, ts))),
        (MR, (IMPLICIT,))]
    assert all(p.context_id % 2 == 1 for p in proposals)  # odd ids, as PS3.8 asks of a requestor
    assert len({p.context_id for p in proposals}) == len(proposals)


def test_a_move_of_too_many_pairs_is_not_proposed():
    assert retrieve.move_contexts({(f"1.2.3.{n}", EXPLICIT) for n in range(129)}) is None


def test_a_data_set_is_cut_into_pdus_that_fit_and_only_the_last_says_so():
    chunks = [b"a" * 10, b"b" * 25, b"c" * 3]
    pdus = list(retrieve._data_pdus(1, iter(chunks), fragment_max=8))
    fragments = [bytes(p[1]) for p in pdus]
    assert b"".join(fragments) == b"".join(chunks) and all(len(f) <= 8 for f in fragments)
    flags = [p[0][-1] & pdu.LAST for p in pdus]
    assert flags == [0] * (len(pdus) - 1) + [pdu.LAST]
