"""DICOM networking, the service, SEG encoding and the command line of segnode."""
