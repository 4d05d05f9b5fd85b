"""node/dicom_in"""
