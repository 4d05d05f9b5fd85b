"""PACS sources: query (C-FIND / QIDO-RS) and retrieve (C-MOVE, C-GET / WADO-RS) on demand (docs/sources.md)."""
