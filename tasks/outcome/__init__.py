"""How a case ended, as the physicist reads it: the beam table, the summary, the final message."""
