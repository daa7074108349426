"""The DICOM front: pynetdicom server, handlers, C-FIND matching, retrieval."""
