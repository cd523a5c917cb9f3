"""Report texts shared by the report tests (``test_reports.py``, ``test_report_files.py``)."""

#: A full MIMIC-CXR free-text report: header line, indication/technique/comparison, findings and impression.
MIMIC_FULL = (
    "                                 FINAL REPORT\n"
    " EXAMINATION:  CHEST (PA AND LAT)\n"
    " \n"
    " INDICATION:  ___F with new onset ascites  // eval for infection\n"
    " \n"
    " TECHNIQUE:  Chest PA and lateral\n"
    " \n"
    " COMPARISON:  None.\n"
    " \n"
    " FINDINGS: \n"
    " \n"
    " There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral\n"
    " nodular opacities that most likely represent nipple shadows.\n"
    " \n"
    " IMPRESSION: \n"
    " \n"
    " No acute cardiopulmonary process.\n"
)
