"""Live intake from the PACS: the DICOM node (C-STORE, C-ECHO), the HL7 report feed, the DICOMweb import.

Everything received goes through a durable inbox inside the index folder (:mod:`index.node.inbox`)
and is indexed by the same intake as ``index add`` (:mod:`index.node.worker`): ``scp`` (the
pynetdicom Storage SCP), ``hl7`` (ORU^R01 over MLLP), ``dicomweb`` (QIDO-RS / WADO-RS import),
``runtime`` (a running node), ``commands`` (the CLI). Needs ``pip install -e '.[node]'``.
"""
