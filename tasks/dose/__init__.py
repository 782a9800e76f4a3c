"""Dose files: MOQUI raw dose -> DICOM RTDOSE (`write`), reading and collecting (`read`), plan sums
(`plansum`), validation (`validate`), and the case's outputs with their provenance (`outputs`)."""
