"""The MOQUI engine contract: its input file, the beam data around it, its command line and its verdict."""
