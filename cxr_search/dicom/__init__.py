"""DICOM input: from a file to a normalised header and a display-ready 8-bit radiograph.

Headers are read without pixel data (fast enough to scan a PACS export of millions of files); pixels
go through the photometric chain a viewer applies (modality LUT, VOI LUT / window, MONOCHROME1
inversion, min-max to uint8). Every parser of header values is total: what it cannot understand
becomes ``None`` (or ``"UNKNOWN"`` for a view), never an exception.

Modules:

* ``header``: :class:`~cxr_search.dicom.header.DicomHeader` and ``read_dicom_header`` (header-only
  reads, with or without the preamble; files that are not DICOM are refused).
* ``values``: normalisation of single header values: age, dates, sex, pixel spacing, view position.
* ``read``: ``read_dicom``: pixel decoding and the photometric chain.
* ``codecs``: decoders pydicom does not offer: reduced-resolution JPEG 2000, 12-bit JPEG with GDCM.
"""
