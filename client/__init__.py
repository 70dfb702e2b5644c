"""The hospital side: ingest, client daemon, prediction. Imports ``common`` only."""
