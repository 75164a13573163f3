"""The papers' loops, each readable top to bottom like its algorithm box."""
