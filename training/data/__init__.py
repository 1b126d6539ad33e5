"""Data stage: read the X-ray sets, labels and patient-disjoint splits; torch-free, so tools reuse it."""
