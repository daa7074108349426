"""Every DICOMweb route through dicomweb-client (ImagingDataCommons), a real client, against a real
`appliance serve`: the test corpus stored by STOW-RS, queried back with the C-FIND matching cases,
every instance retrieved byte-exact, metadata as pydicom reads the stored instance, frames,
rendered images, bulk data, WADO-URI, the metrics and log lines of each route."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pydicom
import pytest
import requests
from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

import corpus
from conftest import dicom_test_files, prometheus_samples, run_cli, set_config
from support.dicom_server import corpus_study, free_port, storable

from support.dicomweb import WebServer, add_token, as_sent

from appliance.admin import home as home_mod


def _writable(files) -> list[Path]:
    out = []
    for path, _ in files:
        try:
            as_sent(path)
        except Exception:  # noqa: BLE001 - a corpus file pydicom cannot write back is not sent
            continue
        out.append(path)
    return out


def _batches(paths: list[Path]) -> list[list[Path]]:
    """Paths in order, cut so that no batch holds two versions of one instance: the last one sent
    is the current one."""
    batches, seen = [[]], set()
    for path in paths:
        sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        if sop in seen or len(batches[-1]) >= 25:
            batches.append([])
            seen = set()
        seen.add(sop)
        batches[-1].append(path)
    return batches


@pytest.fixture(scope="module")
def stocked(tmp_path_factory):
    """A server holding the test corpus, stored by STOW-RS, and a CT and an MR study."""
    root = tmp_path_factory.mktemp("dicomweb")
    home = root / "home"
    home_mod.init(home)
    metrics_port = free_port()
    set_config(home, "  # node_exporter's textfile collector.\n  port: 0",
               f"  # node_exporter's textfile collector.\n  port: {metrics_port}")
    token = add_token(home, "tester", "store,query,retrieve")
    server = WebServer(home).start()
    server.metrics_port = metrics_port
    client = server.client(token)
    paths = _writable(storable(dicom_test_files()))
    current, sent = {}, set()
    for batch in _batches(paths):
        response = client.store_instances([pydicom.dcmread(p) for p in batch])
        referenced = {item.ReferencedSOPInstanceUID for item in response.get("ReferencedSOPSequence", [])}
        for path in batch:
            sop = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
            sent.add(sop)
            if sop in referenced:
                current[sop] = path
    assert set(current) == sent  # every instance sent was stored
    ct = corpus.ct_study(root / "ct", 3, patient_name="Doe^Jane", patient_id="PID1")
    mr = corpus.mr_series(root / "mr", 2, patient_name="Roe^Richard", patient_id="PID2")
    client.store_instances([pydicom.dcmread(p) for p in ct + mr])
    # JPEG 2000 lossless, multi-frame and not, in a study of their own (the corpus reuses their UIDs)
    j2k = corpus_study(root / "j2k", names=("emri_small_jpeg_2k_lossless.dcm", "MR_small_jp2klossless.dcm"))
    client.store_instances([pydicom.dcmread(p) for p in j2k])
    current.update({pydicom.dcmread(p).SOPInstanceUID: p for p in j2k})
    yield server, token, current, ct, mr, j2k
    assert server.stop() == 0


def test_the_corpus_is_stored_by_stow_rs(stocked):
    server, token, current = stocked[:3]
    assert len(current) > 100
    status = json.loads(run_cli("status", "--json", home=server.home).stdout)
    assert status["instances"] == len(current) + 5


def test_every_instance_comes_back_byte_exact_with_transfer_syntax_star(stocked):
    server, token, current = stocked[:3]
    client = server.client(token)
    for sop, path in current.items():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        [part] = client.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, sop,
                                          media_types=(("application/dicom", "*"),)) and [None]
        raw = server.get(f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{sop}",
                         token, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        assert raw.status_code == 200
        assert _parts(raw) == [as_sent(path)], path.name


def _parts(response: requests.Response) -> list[bytes]:
    """The bodies of a multipart/related response."""
    boundary = response.headers["Content-Type"].split("boundary=")[1].split(";")[0].strip('"').encode()
    body = response.content
    pieces = body.split(b"--" + boundary)
    out = []
    for piece in pieces[1:]:
        if piece.startswith(b"--"):
            break
        head, _, content = piece.partition(b"\r\n\r\n")
        out.append(content[:-2] if content.endswith(b"\r\n") else content)
    return out


def test_a_study_comes_back_whole_and_a_compressed_instance_is_transcoded_when_asked(stocked):
    server, token, current, ct = stocked[:4]
    client = server.client(token)
    study = pydicom.dcmread(ct[0]).StudyInstanceUID
    instances = client.retrieve_study(study, media_types=(("application/dicom", "*"),))
    assert sorted(i.SOPInstanceUID for i in instances) == sorted(pydicom.dcmread(p).SOPInstanceUID for p in ct)
    ds = pydicom.dcmread(stocked[5][1])
    assert ds.file_meta.TransferSyntaxUID == JPEG2000Lossless
    plain = client.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                                     media_types=(("application/dicom", ExplicitVRLittleEndian),))
    assert plain.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert (plain.pixel_array == ds.pixel_array).all()
    refused = server.get(f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                         f"/instances/{ds.SOPInstanceUID}", token,
                         headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'})
    assert refused.status_code == 406


def _without_bulk(mine: dict, theirs: dict) -> tuple[dict, dict]:
    """Both JSON data sets without the elements `mine` gives as BulkDataURIs (at any depth)."""
    a, b = {}, {}
    for tag, element in mine.items():
        if "BulkDataURI" in element:
            continue
        if element.get("vr") == "SQ" and "Value" in element:
            pairs = [_without_bulk(x, y) for x, y in zip(element["Value"], theirs.get(tag, {}).get("Value", []))]
            a[tag] = {"vr": "SQ", "Value": [x for x, _ in pairs]}
            b[tag] = {**theirs.get(tag, {}), "Value": [y for _, y in pairs]}
        else:
            a[tag], b[tag] = element, theirs.get(tag)
    extra = {tag for tag, element in theirs.items() if tag not in mine}
    return a, {**b, **{tag: theirs[tag] for tag in extra}}


def test_metadata_is_pydicoms_json_of_the_stored_instance_bulk_data_aside(stocked):
    server, token, current = stocked[:3]
    client = server.client(token)
    for sop, path in current.items():
        ds = pydicom.dcmread(io.BytesIO(as_sent(path)))
        expected = json.loads(json.dumps(ds.to_json_dict()))
        for answer in ("computed", "from the cache"):
            metadata = client.retrieve_instance_metadata(ds.StudyInstanceUID, ds.SeriesInstanceUID, sop)
            mine, theirs = _without_bulk(metadata, expected)
            assert mine == theirs, (path.name, answer)
    ct_uid = pydicom.dcmread(stocked[3][0]).StudyInstanceUID
    assert len(client.retrieve_study_metadata(ct_uid)) == 3


def test_bulk_data_uris_give_the_values(stocked):
    server, token, current, ct = stocked[:4]
    ds = pydicom.dcmread(ct[0])
    metadata = server.client(token).retrieve_instance_metadata(ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                                                ds.SOPInstanceUID)
    uri = metadata["7FE00010"]["BulkDataURI"]
    response = requests.get(uri, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    assert response.status_code == 200 and _parts(response) == [ds.PixelData]


def test_frames_of_an_uncompressed_and_a_jpeg_2000_instance(stocked):
    server, token, current, ct = stocked[:4]
    client = server.client(token)
    ds = pydicom.dcmread(ct[1])
    [frame] = client.retrieve_instance_frames(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, [1])
    assert frame == ds.PixelData
    ds = pydicom.dcmread(stocked[5][0])
    frames = client.retrieve_instance_frames(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, [1, 3])
    expected = ds.pixel_array
    assert frames == [expected[0].tobytes(), expected[2].tobytes()]
    stored = client.retrieve_instance_frames(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, [2],
                                             media_types=(("application/octet-stream", "*"),))
    assert stored == [pydicom.encaps.get_frame(ds.PixelData, 1, number_of_frames=int(ds.NumberOfFrames))]
    missing = server.get(f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                         f"/instances/{ds.SOPInstanceUID}/frames/99", token)
    assert missing.status_code == 404


def test_rendered_images_decode(stocked):
    server, token, current, ct = stocked[:4]
    client = server.client(token)
    ds = pydicom.dcmread(ct[0])
    jpeg = client.retrieve_instance_rendered(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    image = Image.open(io.BytesIO(jpeg))
    assert image.format == "JPEG" and image.size == (ds.Columns, ds.Rows)
    assert max(image.getextrema()) > 100  # not a blank picture
    png = client.retrieve_instance_frames_rendered(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                                                   [1], media_types=("image/png",))
    assert Image.open(io.BytesIO(png)).format == "PNG"


def test_wado_uri_gives_the_instance_and_a_jpeg(stocked):
    server, token, current, ct = stocked[:4]
    ds = pydicom.dcmread(ct[2])
    query = {"requestType": "WADO", "studyUID": ds.StudyInstanceUID, "seriesUID": ds.SeriesInstanceUID,
             "objectUID": ds.SOPInstanceUID}
    dicom = server.get("/wado", token, params={**query, "contentType": "application/dicom"})
    assert dicom.status_code == 200 and dicom.content == as_sent(ct[2])
    jpeg = server.get("/wado", token, params=query)
    assert jpeg.headers["Content-Type"] == "image/jpeg" and Image.open(io.BytesIO(jpeg.content)).format == "JPEG"
    assert server.get("/wado", token, params={**query, "requestType": "X"}).status_code == 400


def _uids(answers, tag="0020000D") -> list[str]:
    return sorted(answer[tag]["Value"][0] for answer in answers)


def test_qido_at_every_level_with_the_c_find_matching_rules(stocked):
    server, token, _, ct, mr = stocked[:5]
    client = server.client(token)
    ct_study, mr_study = pydicom.dcmread(ct[0]).StudyInstanceUID, pydicom.dcmread(mr[0]).StudyInstanceUID

    def studies(**filters):
        return _uids(client.search_for_studies(search_filters=filters))

    ours = {ct_study, mr_study}  # the corpus has other Does: only these two studies are looked at
    assert ours & set(studies(PatientName="doe*")) == {ct_study}
    assert studies(PatientName="?OE^*", PatientID="PID*") == sorted(ours)
    for name in ("DOE^JANE^^", "doe^j*", "Doe^Jane"):  # exact and prefix, through the name index
        assert ours & set(studies(PatientName=name)) == {ct_study}, name
    assert studies(StudyDate="-19000101") == []
    assert studies(StudyInstanceUID=f"{ct_study},{mr_study},1.2.3") == sorted([ct_study, mr_study])
    [mr_only] = client.search_for_studies(search_filters={"ModalitiesInStudy": "MR", "PatientID": "PID2"})
    assert mr_only["00201208"]["Value"] == [2] and mr_only["00100010"]["Value"] == [{"Alphabetic": "Roe^Richard"}]
    assert mr_only["00081190"]["Value"] == [f"{server.url}/studies/{mr_study}"]
    [series] = client.search_for_series(ct_study)
    assert series["00080060"]["Value"] == ["CT"] and series["00201209"]["Value"] == [3]
    series_uid = series["0020000E"]["Value"][0]
    second = pydicom.dcmread(ct[1]).SOPInstanceUID
    assert _uids(client.search_for_instances(ct_study, series_uid, search_filters={"InstanceNumber": "2"}),
                 "00080018") == [second]
    everywhere = client.search_for_series(search_filters={"Modality": "MR", "PatientID": "PID2"})
    assert len(everywhere) == 1 and "00100020" in everywhere[0]  # study attributes come with /series
    assert len(client.search_for_instances(ct_study)) == 3


def test_qido_pages_includes_fields_and_says_what_it_does_not_do(stocked):
    server, token, _, ct = stocked[:4]
    client = server.client(token)
    every = client.search_for_studies()
    page = client.search_for_studies(offset=1, limit=2)
    assert [a["0020000D"] for a in page] == [a["0020000D"] for a in every[1:3]]
    response = server.get("/dicom-web/studies", token, params={"limit": "1"})
    assert "additional results" in response.headers["Warning"]
    fuzzy = server.get("/dicom-web/studies", token, params={"fuzzymatching": "true", "PatientID": "PID1"})
    assert fuzzy.status_code == 200 and "fuzzymatching" in fuzzy.headers["Warning"]
    [study] = client.search_for_studies(search_filters={"PatientID": "PID1"}, fields=["StudyDescription", "00100030"])
    assert "00081030" in study and "00100030" in study
    [study] = client.search_for_studies(search_filters={"PatientID": "PID1"}, fields=["all"])
    assert "00080062" in study  # SOPClassesInStudy: only with includefield=all
    for bad in ({"NoSuchKeyword": "1"}, {"StudyDate": "2020x"}, {"limit": "-1"}):
        assert server.get("/dicom-web/studies", token, params=bad).status_code == 400, bad


def test_each_route_is_counted_and_logged_without_uids(stocked):
    server, token, _, ct = stocked[:4]
    ds = pydicom.dcmread(ct[0])
    server.get(f"/dicom-web/studies/{ds.StudyInstanceUID}/metadata", token)
    log = server.log.read_text()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith('{"event": "http"')]
    assert any(line["service"] == "WADO-RS metadata" and line["status"] == 200 for line in lines)
    assert ds.StudyInstanceUID not in log and "Doe" not in log and token not in log
    metrics = requests.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=30).text
    samples = prometheus_samples(metrics)
    route = "/dicom-web/studies/{study}/metadata"
    assert samples[("pacs_vault_http_responses_total", frozenset({"route": route, "status": "200"}.items()))] >= 1
    assert samples[("pacs_vault_requests_total", frozenset({"service": "STOW-RS", "outcome": "success"}.items()))] >= 1
    assert samples[("pacs_vault_request_duration_seconds_count", frozenset({"service": "QIDO-RS studies"}.items()))] >= 1
