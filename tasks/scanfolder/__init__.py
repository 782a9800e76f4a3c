"""The scan folder as the file sensor sees it: case folders, their content keys, readiness."""
