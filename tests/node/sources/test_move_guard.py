"""A C-MOVE the node asked for stores only the series it asked for (Orthanc as the PACS, a running node).

The node registers each C-MOVE's Message ID in its index with the study and
series it asks for (:meth:`segnode.storage.index.Index.expect_move`); the PACS
names the node and that Message ID as the Move Originator of each C-STORE
sub-operation, and the node's receiver refuses what the move did not ask for.
A PACS that sends another series under the move's Message ID, or sub-operations
of a move the node never asked for, gets 0xC000 for each instance and nothing
is stored.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove  # type: ignore[attr-defined]
from segnode.node.config import NodeConfig
from segnode.node.ingest.store import NOT_REQUESTED, StoreHandler, StoreRequest
from segnode.storage.index import Index
from segnode.storage.spool import Spool

from tests.node.sources.helpers import Study, upload, write_study
from tests.peers import OrthancPeer, free_port, node, orthanc, write_node_config

MOVE = StudyRootQueryRetrieveInformationModelMove


def move_as_the_node(pacs: OrthancPeer, study: Study, message_id: int) -> tuple[int, int, int]:
    """A C-MOVE of ``study``'s series to the node's AE, sent as the node (calling AE SEGNODE) with ``message_id``:
    (final status, completed, failed)."""
    ae = AE(ae_title="SEGNODE")
    ae.add_requested_context(MOVE)
    assoc = ae.associate("127.0.0.1", pacs.dicom_port, ae_title=pacs.ae_title)
    assert assoc.is_established
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "SERIES"
    identifier.StudyInstanceUID = study.study_uid
    identifier.SeriesInstanceUID = study.series_uid
    try:
        *_, (final, _) = assoc.send_c_move(identifier, "SEGNODE", MOVE, msg_id=message_id)
    finally:
        assoc.release()
        ae.shutdown()
    return (int(final.Status), int(final.get("NumberOfCompletedSuboperations") or 0),
            int(final.get("NumberOfFailedSuboperations") or 0))


@pytest.mark.peer
def test_the_receiver_stores_only_the_series_the_nodes_move_asked_for(tmp_path: Path) -> None:
    asked = write_study(tmp_path / "asked", "ACC-ASKED", slices=6)
    other = write_study(tmp_path / "other", "ACC-OTHER", slices=4, seed=3)
    port = free_port()
    with orthanc(tmp_path / "orthanc", node_port=port) as pacs:
        upload(pacs, asked)
        upload(pacs, other)
        config = write_node_config(tmp_path / "node.yaml", port=port)
        with node(config) as running:
            index = Index(running.state_dir / "index.sqlite")
            message_id = index.expect_move(asked.study_uid, asked.series_uid, time.time() + 60)
            # the PACS answers the move with another series: refused (Orthanc ends the move at the first
            # refused sub-operation, 0xC000 without counts), none stored
            status, completed, _ = move_as_the_node(pacs, other, message_id)
            assert status != 0x0000 and completed == 0
            # sub-operations of a move the node never asked for (no such Message ID): refused too
            status, completed, _ = move_as_the_node(pacs, asked, message_id + 1)
            assert status != 0x0000 and completed == 0
            assert index.study_series(other.study_uid) == [] and index.study_series(asked.study_uid) == []
            # the series asked for, under the move's Message ID: stored
            status, completed, failed = move_as_the_node(pacs, asked, message_id)
            assert (status, completed, failed) == (0x0000, asked.count, 0)
            assert [s.series_uid for s in index.study_series(asked.study_uid)] == [asked.series_uid]
            index.end_move(message_id)
            assert index.expected_move(message_id) is None
            index.close()


def test_a_push_and_another_aes_move_are_not_judged(tmp_path: Path) -> None:
    """Only sub-operations naming this node as the Move Originator are checked against its moves."""
    config = NodeConfig(state_dir=tmp_path / "state")
    index = Index(config.index_path)
    store = StoreHandler(config, Spool(config.spool_dir), index)
    request = StoreRequest("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.1", "PACS", "SEGNODE",
                           "127.0.0.1", "1.2.840.10008.5.1.4.1.1.2")
    uids = {"StudyInstanceUID": "1.2.3", "SeriesInstanceUID": "1.2.3.1"}
    assert store._check_move(request, uids) is None  # a push
    other_ae = replace(request, move_originator=("WORKSTATION", 7))
    assert store._check_move(other_ae, uids) is None  # a move another AE asked the PACS for
    ours = replace(request, move_originator=("SEGNODE", 7))
    assert store._check_move(ours, uids) is NOT_REQUESTED  # no move 7 of the node's
    message_id = index.expect_move("1.2.3", "1.2.3.1", time.time() + 60)
    mine = replace(request, move_originator=("SEGNODE", message_id))
    assert store._check_move(mine, uids) is None
    assert store._check_move(mine, {**uids, "SeriesInstanceUID": "1.2.3.2"}) is NOT_REQUESTED
    index.close()
