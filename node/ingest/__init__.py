"""node/ingest"""
