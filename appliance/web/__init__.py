"""The DICOMweb front (PS3.18): QIDO-RS, WADO-RS, STOW-RS and WADO-URI on the same archive
as the DICOM front, with the same guarantees, and the OHIF viewer beside them.

- app.py: the ASGI app (starlette): routes, bearer tokens, metrics and a log line per request;
- server.py: uvicorn inside `appliance serve`, started and drained with the DICOM front;
- stow.py: STOW-RS, multipart parts streamed into the archive's ingest (multipart.py);
- qido.py: QIDO-RS through the C-FIND query and matching (appliance.dicom.query);
- wado.py: WADO-RS and WADO-URI (instances, metadata, frames, bulk data, rendered);
- pixels.py: frames and rendered images of a stored instance, in memory only;
- dicomjson.py: DICOM JSON (PS3.18 F.2) with BulkDataURIs;
- tokens.py: `appliance token`; viewer.py: the OHIF viewer at /viewer.
"""
