"""Reports beside the MQTT result: DICOM SR, FHIR and the heat-map, written per result.

The hospital's systems read DICOM Structured Reports and FHIR resources,
and radiologists want to see where the model looked. Each module turns one
committed result (plus the source image's header, for DICOM scans) into one
kind of object; :mod:`.writer` writes them into ``Reports.Path`` before the
result is committed, so every link in a result names a file that exists.

* :mod:`.uids` -- deterministic UIDs under ``Reports.UidRoot`` (a result analysed
  again yields the same SR, so a PACS stores it once).
* :mod:`.sr` -- the TID 1500 / IHE AI Results Comprehensive 3D SR (highdicom).
* :mod:`.fhir` -- the DiagnosticReport + Observations, mapped from that SR.
* :mod:`.heatmap` -- the class-activation overlay as PNG and Secondary Capture.
"""
